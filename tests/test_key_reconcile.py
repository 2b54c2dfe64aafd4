"""The key ring against what the device really holds: a state directory belongs to one backend
and device; a key the device does not list is MISSING, never marked destroyed for it; a sealing
key lost while serving is replaced by itself; a key whose creation never completed is cleaned
up. Real SoftHSM2 token and real swtpm throughout, over real gRPC."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pkcs11
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.app import open_backend, pkcs11_settings
from authority.backends.softhsm import provision_embedded_token
from authority.config import Config
from authority.errors import StartupError
from authority.keyring import CREATING_GRACE
from authority.keys import KeyRecord, KeyState
from authority.store.sqlite import SqliteStore
from tests.conftest import START, Harness, issue, make_config, redeem, sample_state
from tests.tpm_fixtures import requires_tpm

ROOT = Path(__file__).resolve().parent.parent
OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID
LONG = 3600


def audit_actions(h: Harness) -> list[tuple[str, dict[str, object]]]:
    """(action, details) of every line of the harness's audit log."""
    lines = (h.state_dir / "audit.log").read_text().splitlines()
    return [(entry["action"], entry["details"]) for entry in map(json.loads, lines)]


def states(h: Harness) -> dict[str, KeyState]:
    return {r.key_id.hex(): r.state for r in h.authority.ring.records()}


def blob_files(h: Harness, key_id: str) -> list[Path]:
    return sorted(key_dir(h).glob(f"{key_id}.*"))


def key_dir(h: Harness) -> Path:
    return h.state_dir / "tpm" / "keys"


def move(paths: list[Path], to: Path) -> None:
    """Move files into directory ``to`` (made if needed): a key directory's blobs taken away,
    or put back."""
    to.mkdir(exist_ok=True)
    for path in paths:
        path.rename(to / path.name)


def destroy_in_token(config: Config, key_id: bytes) -> None:
    """Destroy a ticket key through a raw python-pkcs11 session of this process (the
    authority's module instance: its login is token-wide), bypassing the authority."""
    settings = pkcs11_settings(config)
    lib = pkcs11.lib(os.path.realpath(settings.module))
    token = lib.get_token(token_label=settings.token_label)
    with token.open(rw=True) as session:
        session.get_key(id=key_id, object_class=pkcs11.ObjectClass.SECRET_KEY).destroy()


# -- a state directory belongs to one backend and device ----------------------------------------

@requires_tpm
@pytest.mark.parametrize(("first", "second"), [("pkcs11", "tpm"), ("tpm", "pkcs11")])
def test_backend_switch_is_refused_and_switching_back_keeps_the_keys(
        tmp_path: Path, first: str, second: str) -> None:
    h = Harness(tmp_path / "state", first)
    h.start()
    try:
        ticket = issue(h.tickets, lifetime=LONG)
        h.stop()
        with pytest.raises(StartupError) as err:
            h.start(make_config(h.state_dir, second))
        message = str(err.value)
        assert message.startswith(f"state_dir: {h.state_dir} belongs to backend {first}")
        assert f"refusing to start with backend {second}" in message
        assert ("token" if first == "pkcs11" else "key dir") in message
        other = "hsm" if second == "pkcs11" else "tpm"
        assert not (h.state_dir / other).exists()   # the refused start made no device
        h.start(make_config(h.state_dir, first))
        assert states(h) == {ticket.key_id: KeyState.ACTIVE}
        assert redeem(h.tickets, ticket.ticket).result == OK
        assert "key.destroyed" not in [action for action, _ in audit_actions(h)]
    finally:
        h.stop()


def test_another_token_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", "pkcs11", "threads")
    h.start()
    try:
        ticket = issue(h.tickets, lifetime=LONG)
        own = h.authority.backend.describe().identity
        h.stop()
        other = provision_embedded_token(tmp_path / "other-hsm")   # same label, new serial
        with pytest.raises(StartupError) as err:
            h.start(replace(h.config, pkcs11=other))
        message = str(err.value)
        assert message.startswith(f"state_dir: {h.state_dir} belongs to backend pkcs11 ({own})")
        assert "refusing to start with backend pkcs11 (token 'ticket-authority' (serial" in message
        assert own in message and message.count("serial") == 2
        h.start(make_config(h.state_dir, "pkcs11", "threads"))
        assert redeem(h.tickets, ticket.ticket).result == OK
    finally:
        h.stop()


@requires_tpm
def test_state_dir_from_before_owners_is_claimed_only_by_a_device_with_its_keys(
        tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", "pkcs11", "threads")
    h.start()
    try:
        ticket = issue(h.tickets, lifetime=LONG)
        h.stop()
        with sqlite3.connect(h.state_dir / "authority.db") as db:   # as an older version left it
            db.execute("DELETE FROM meta WHERE name IN ('backend', 'device')")
        db.close()
        with pytest.raises(StartupError) as err:
            h.start(make_config(h.state_dir, "tpm"))
        assert str(err.value).startswith(f"state_dir: {h.state_dir} records keys "
                                         f"{ticket.key_id}, none of which tpm")
        h.start(make_config(h.state_dir, "pkcs11", "threads"))
        assert redeem(h.tickets, ticket.ticket).result == OK
        h.stop()
        with pytest.raises(StartupError, match="belongs to backend pkcs11"):
            h.start(make_config(h.state_dir, "tpm"))
    finally:
        h.stop()


# -- keys the device does not list at start --------------------------------------------------------

@requires_tpm
def test_key_dir_without_the_keys_marks_them_missing_until_they_return(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", "tpm")
    h.start()
    try:
        old = issue(h.tickets, lifetime=LONG)
        h.stop()
        aside = tmp_path / "aside"
        move(blob_files(h, old.key_id), aside)      # an unmounted or lost key directory
        h.start()
        assert states(h)[old.key_id] == KeyState.MISSING
        fresh = issue(h.tickets)
        assert fresh.key_id != old.key_id
        assert redeem(h.tickets, old.ticket).result == INVALID
        listed = {k.key_id: k.state for k in h.admin.ListKeys(admin_pb2.ListKeysRequest()).keys}
        assert listed[old.key_id] == admin_pb2.KEY_STATE_MISSING
        actions = audit_actions(h)
        assert ("key.missing", {"key_id": old.key_id, "was": "DECRYPT_ONLY"}) in actions
        assert "key.destroyed" not in [action for action, _ in actions]
        move(list(aside.iterdir()), key_dir(h))     # the directory is back
        h.authority.maintain()
        assert states(h)[old.key_id] == KeyState.DECRYPT_ONLY
        assert redeem(h.tickets, old.ticket).result == OK
    finally:
        h.stop()


def test_key_lost_from_the_token_is_missing_and_retire_cleans_it_up(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", "pkcs11", "threads")
    h.start()
    try:
        old = issue(h.tickets, lifetime=LONG)
        destroy_in_token(h.config, bytes.fromhex(old.key_id))   # out of band, while serving
        h.restart()
        assert states(h)[old.key_id] == KeyState.MISSING
        assert redeem(h.tickets, old.ticket).result == INVALID
        assert redeem(h.tickets, issue(h.tickets).ticket).result == OK
        retired = h.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=old.key_id)).key
        assert retired.state == admin_pb2.KEY_STATE_DESTROYED
        assert old.key_id not in [k.key_id for k in
                                  h.admin.ListKeys(admin_pb2.ListKeysRequest()).keys]
        actions = [action for action, _ in audit_actions(h)]
        assert actions.index("key.missing") < actions.index("key.retired")
    finally:
        h.stop()


@requires_tpm
def test_destroyed_key_found_in_the_device_again_is_destroyed(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", "tpm")
    h.start()
    try:
        old = issue(h.tickets, lifetime=LONG).key_id
        h.admin.RotateKey(admin_pb2.RotateKeyRequest())
        aside = tmp_path / "aside"
        move(blob_files(h, old), aside)
        h.authority.maintain()
        assert states(h)[old] == KeyState.MISSING
        h.clock.advance(h.config.tickets.max_lifetime)   # its window closes while it is away
        h.authority.maintain()
        assert states(h)[old] == KeyState.DESTROYED
        move(list(aside.iterdir()), key_dir(h))
        h.authority.maintain()
        assert blob_files(h, old) == []
        assert ("key.destroyed", {"key_id": old, "reason": "destroyed key found in the device"}
                ) in audit_actions(h)
    finally:
        h.stop()


# -- a sealing key lost while serving (issue 12.4) ---------------------------------------------

def _lose_sealing_key(h: Harness) -> str:
    """Remove the sealing key from the device behind the authority's back; return its id."""
    key_id = h.authority.ring.primary_id
    if h.backend == "pkcs11":
        destroy_in_token(h.config, key_id)
    else:  # the TPM's own destroy (flush, blobs deleted): what a lost key directory comes to
        h.authority.backend.destroy_key(key_id)
    return key_id.hex()


def test_sealing_key_lost_while_serving_is_replaced_by_itself(harness: Harness) -> None:
    stub = harness.tickets
    lost = _lose_sealing_key(harness)
    with pytest.raises(grpc.RpcError) as err:
        issue(stub)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert lost in (err.value.details() or "")
    fresh = issue(stub)
    assert fresh.key_id != lost and redeem(stub, fresh.ticket).result == OK
    assert states(harness)[lost] == KeyState.MISSING
    assert ("key.created", {"key_id": fresh.key_id,
                            "reason": "sealing key missing from the device"}
            ) in audit_actions(harness)
    again = _lose_sealing_key(harness)                      # now through a batch
    batch = authority_pb2.IssueTicketsRequest(items=[
        authority_pb2.IssueTicketRequest(state=sample_state(n)) for n in range(3)])
    with pytest.raises(grpc.RpcError) as err:
        stub.IssueTickets(batch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    items = stub.IssueTickets(batch).items
    assert len(items) == 3 and all(i.ticket.key_id not in (lost, again) for i in items)
    assert {i.ticket.key_id for i in items} == {harness.authority.ring.primary_id.hex()}


@requires_tpm
def test_removed_blobs_of_the_sealing_key_are_noticed_by_maintenance(tmp_path: Path) -> None:
    """A TPM key whose blob files are removed stays loaded in the TPM (its seals still work)
    until the next maintenance pass finds it missing and replaces it."""
    h = Harness(tmp_path / "state", "tpm")
    h.start()
    try:
        old = issue(h.tickets).key_id
        for path in blob_files(h, old):
            path.unlink()
        h.authority.maintain()
        assert states(h)[old] == KeyState.MISSING
        fresh = issue(h.tickets)
        assert fresh.key_id != old and redeem(h.tickets, fresh.ticket).result == OK
    finally:
        h.stop()


# -- keys whose creation never completed (issue 12.9) --------------------------------------------

@pytest.mark.parametrize("backend", ["pkcs11", pytest.param("tpm", marks=requires_tpm)])
def test_creating_key_is_destroyed_after_the_grace_and_unrecorded_keys_are_left(
        tmp_path: Path, backend: str) -> None:
    h = Harness(tmp_path / "state", backend, "threads")
    h.start()
    recorded = set(states(h))
    h.stop()
    pending, foreign = bytes.fromhex("00000000000000e1"), bytes.fromhex("00000000000000f2")
    store = SqliteStore(h.state_dir / "authority.db")
    store.save_keys([KeyRecord(pending, KeyState.CREATING, h.clock.now())])
    store.close()
    device = open_backend(h.config)
    try:
        device.create_key(pending)     # created, never recorded as ACTIVE: a crash, a timeout
        device.create_key(foreign)     # not the ring's at all (a shared token)
    finally:
        device.close()
    h.start()
    try:
        assert pending in h.authority.backend.list_keys()  # within the grace: left alone
        assert set(states(h)) == recorded
        h.clock.advance(CREATING_GRACE)
        h.authority.maintain()
        present = h.authority.backend.list_keys()
        assert pending not in present and foreign in present
        assert {bytes.fromhex(k) for k in recorded} <= present
        assert pending not in {r.key_id for r in SqliteStore(
            h.state_dir / "authority.db").load_keys()}
        assert ("key.abandoned", {"key_id": pending.hex(), "in_device": True}
                ) in audit_actions(h)
    finally:
        h.stop()


CRASH = """
import os, sys
from pathlib import Path
from authority.app import Authority, open_backend
from authority.clock import ManualClock
from authority.store.sqlite import SqliteStore
from tests.conftest import START, make_config

class CrashAfterCreate:
    def __init__(self, inner):
        self._inner = inner
    def create_key(self, key_id):
        self._inner.create_key(key_id)
        print(key_id.hex(), flush=True)
        os._exit(9)                  # killed between the device and the key ring
    def __getattr__(self, name):
        return getattr(self._inner, name)

config = make_config(Path(sys.argv[1]), "pkcs11", "threads")
config.state_dir.mkdir(mode=0o700)
backend = CrashAfterCreate(open_backend(config))
store = SqliteStore(config.state_dir / "authority.db")
Authority(config, backend, store, ManualClock(START)).ring.load()
"""


def test_crash_between_create_and_record_leaves_nothing_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-c", CRASH, str(state)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 9, done.stderr
    orphan = bytes.fromhex(done.stdout.split()[-1])
    h = Harness(state, "pkcs11", "threads")
    assert h.clock.now() == START
    h.start()
    try:
        assert orphan in h.authority.backend.list_keys()
        h.clock.advance(CREATING_GRACE)
        h.authority.maintain()
        present = h.authority.backend.list_keys()
        assert orphan not in present
        assert present == {bytes.fromhex(k) for k, s in states(h).items()
                           if s != KeyState.DESTROYED}
    finally:
        h.stop()
