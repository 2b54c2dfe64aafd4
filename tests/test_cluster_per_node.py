"""Per-node tokens (issue 15, ``cluster.per_node_tokens``): two replicas, each a process with its
own embedded SoftHSM2 token in its own state directory (SoftHSM2 keeps one module, one view and
one login per process, as separate machines would), on one real PostgreSQL database, each with
its own manual clock moved in step by the test. The cluster KEK is made in A's token and put
into B's with the security officer (transport key, wrap_kek_for, unwrap_kek) before either
replica starts.

Checked: A's keys are stored wrapped (40 octets, a 16-octet check value) before they leave
CREATING; B unwraps a copy (checked) into its own token and reports it loaded, so a PENDING key
publishes at once; tickets cross both ways; a key B cannot unwrap stays unreported (the PENDING
key then waits for keys.publish_delay); retirement on A removes the blob and B destroys its
copy at its next heartbeat. Plus the setting's validation."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
import pytest

from authority.config import ClusterSettings, PostgresSettings, Secret
from authority.errors import ConfigError
from authority.store.base import Store
from tests.conftest import START, load_toml
from tests.pkcs11_fixtures import requires_softhsm
from tests.postgres_fixtures import (  # noqa: F401
    postgres_dsn_fixture,
    postgres_server_fixture,
)

pytestmark = requires_softhsm

TIMING = ClusterSettings(heartbeat_interval=1.0, replica_timeout=5.0, lease_duration=5.0,
                         per_node_tokens=True)
PUBLISH_DELAY = 30.0


# -- a replica process ---------------------------------------------------------------------------

def _start(held: dict[str, Any], dsn: str) -> None:
    """Open the replica: its token's backend, its store connection, a manual clock; load."""
    from authority.app import Authority
    from authority.backends.pkcs11 import Pkcs11Backend
    from authority.clock import ManualClock
    from authority.store.postgres import PostgresStore
    from tests.conftest import make_config

    state_dir: Path = held["dir"] / "state"
    state_dir.mkdir(mode=0o700)
    config = replace(make_config(state_dir, "pkcs11", "threads", publish_delay=PUBLISH_DELAY),
                     pkcs11=replace(held["token"], sessions=2), cluster=TIMING,
                     postgresql=PostgresSettings(dsn=Secret(dsn)))
    store = PostgresStore(PostgresSettings(dsn=Secret(dsn), pool_size=2))
    held["clock"] = ManualClock(START)
    backend = Pkcs11Backend.open(replace(config.pkcs11, per_node_keys=True))  # as serve's
    held["authority"] = Authority(config, backend, store, held["clock"])
    held["authority"].ring.load()
    held["authority"].policy.load()


def _issue(held: dict[str, Any]) -> tuple[bytes, bytes]:
    from authority._proto.ticketauthority.v1 import authority_pb2
    from authority.service.convert import state_from_proto
    from tests.conftest import sample_state

    state = state_from_proto(authority_pb2.IssueTicketRequest(state=sample_state(7)))
    issued = held["authority"].sealer.issue(state)
    return issued.ticket, issued.key_id


def _call(held: dict[str, Any], command: str, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> Any:
    """One command of the test, in the replica's process."""
    from authority.backends.pkcs11.officer import SecurityOfficer
    from authority.backends.softhsm import SO_PIN_NAME

    authority = held.get("authority")
    commands: dict[str, Callable[..., Any]] = {
        "start": lambda dsn: _start(held, dsn),
        "sync": lambda: authority.ring.sync(),
        "advance": lambda seconds: held["clock"].advance(seconds),
        "rotate": lambda **kw: authority.ring.rotate(**kw)[0].key_id,
        "retire": lambda key_id: authority.ring.retire(key_id).state.name,
        "states": lambda: {r.key_id: r.state.name for r in authority.ring.records()},
        "token_keys": lambda: authority.backend.list_keys(),
        "attributes": lambda key_id: authority.backend.key_attributes(key_id),
        "issue": lambda: _issue(held),
        "redeem": lambda ticket: authority.sealer.redeem(ticket).status.name,
        "officer_open": lambda: held.__setitem__("officer", SecurityOfficer.open(
            held["token"].module, held["token"].softhsm2_conf, held["token"].token_label,
            Secret((held["dir"] / "hsm" / SO_PIN_NAME).read_text("utf-8").strip()))),
        "officer_close": lambda: held.pop("officer").close(),
    }
    if command.startswith("officer."):
        return getattr(held["officer"], command.split(".", 1)[1])(*args)
    return commands[command](*args, **kwargs)


def _serve(root: Path, conn: Connection) -> None:
    """The replica process: provision its token, then answer commands until told to stop."""
    from authority.backends.softhsm import provision_embedded_token

    held: dict[str, Any] = {"dir": root, "token": provision_embedded_token(root / "hsm")}
    conn.send(("ok", None))
    while True:
        command, args, kwargs = conn.recv()
        if command == "stop":
            if "authority" in held:
                held["authority"].close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", _call(held, command, args, kwargs)))
        except Exception as exc:  # every error goes back to the test
            conn.send(("err", f"{type(exc).__name__}: {exc}"))


class Replica:
    """One replica process with its own token."""

    def __init__(self, root: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(root, child), daemon=True)
        self._process.start()
        self._answer()

    def _answer(self) -> Any:
        if not self._conn.poll(120):
            raise TimeoutError("replica did not answer in 120 s")
        status, value = self._conn.recv()
        if status == "err":
            raise ReplicaError(value)
        return value

    def __call__(self, command: str, *args: Any, **kwargs: Any) -> Any:
        self._conn.send((command, args, kwargs))
        return self._answer()

    def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, EOFError, TimeoutError, ReplicaError):
                self("stop")
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)


class ReplicaError(Exception):
    """An exception raised in a replica process ("Class: message")."""


def _share_kek(a: Replica, b: Replica) -> None:
    """A makes the KEK; B receives it wrapped to its transport key (both as officers)."""
    a("officer_open")
    a("officer.make_kek")
    a("officer_close")
    b("officer_open")
    transport = b("officer.new_transport_key")
    a("officer_open")
    wrapped = a("officer.wrap_kek_for", transport.der)
    a("officer_close")
    b("officer.unwrap_kek", wrapped)
    b("officer_close")


@pytest.fixture(name="pair")
def pair_fixture(tmp_path: Path, postgres_dsn: str) -> Iterator[tuple[Replica, Replica]]:
    a, b = Replica(tmp_path / "a"), Replica(tmp_path / "b")
    try:
        _share_kek(a, b)
        a("start", postgres_dsn)
        b("start", postgres_dsn)
        yield a, b
    finally:
        a.stop()
        b.stop()


def _store(dsn: str) -> Store:
    from authority.store.postgres import PostgresStore

    return PostgresStore(PostgresSettings(dsn=Secret(dsn), pool_size=1))


def _loaded(dsn: str) -> list[frozenset[bytes]]:
    store = _store(dsn)
    try:
        return [r.loaded for r in store.load_replicas()]
    finally:
        store.close()


def _wrapped(dsn: str, key_id: bytes) -> Any:
    store = _store(dsn)
    try:
        return store.load_wrapped([key_id]).get(key_id)
    finally:
        store.close()


def _step(*replicas: Replica, seconds: float = 1.0) -> None:
    """Move every replica's clock, then heartbeat each."""
    for replica in replicas:
        replica("advance", seconds)
    for replica in replicas:
        replica("sync")


# -- tests ---------------------------------------------------------------------------------------

def test_keys_are_copied_between_tokens_and_tickets_cross(
        pair: tuple[Replica, Replica], postgres_dsn: str) -> None:
    a, b = pair
    first = next(k for k, s in a("states").items() if s == "ACTIVE")
    # the first key: made by A, stored wrapped before it left CREATING, copied into B at load
    assert first in b("token_keys")
    stored = _wrapped(postgres_dsn, first)
    assert stored is not None and len(stored.blob) == 40 and len(stored.check) == 16
    assert stored.kek_id == "ticket-authority-kek"
    copy = b("attributes", first)
    assert copy["sensitive"] and not copy["extractable"] and not copy["modifiable"]
    # a rotation: PENDING (B is live); B copies it at its heartbeat and reports it loaded, so
    # it publishes at A's next heartbeat, long before the publish delay
    new = a("rotate")
    assert a("states")[new] == "PENDING"
    assert new not in b("token_keys")
    _step(a, b)
    assert new in b("token_keys")
    assert all(new in loaded for loaded in _loaded(postgres_dsn))
    _step(a, b)
    assert a("states")[new] == b("states")[new] == "ACTIVE"
    # tickets cross both ways, under the new key
    ticket, key_id = a("issue")
    assert key_id == new and b("redeem", ticket) == "OK"
    ticket, key_id = b("issue")
    assert key_id == new and a("redeem", ticket) == "OK"
    # 40 octets (32 + RFC 3394's 8): never a bare 32-octet value B's token could show
    assert len(_wrapped(postgres_dsn, new).blob) == 40


def test_retirement_removes_the_blob_and_each_replica_destroys_its_copy(
        pair: tuple[Replica, Replica], postgres_dsn: str) -> None:
    a, b = pair
    old = next(k for k, s in a("states").items() if s == "ACTIVE")
    assert old in b("token_keys")
    a("rotate", immediate=True)
    _step(a, b)
    assert a("states")[old] == b("states")[old] == "DECRYPT_ONLY"
    assert a("retire", old) == "DESTROYED"
    assert old not in a("token_keys")
    assert _wrapped(postgres_dsn, old) is None        # deleted with the key (step 2)
    assert old in b("token_keys")
    _step(a, b)
    assert b("states")[old] == "DESTROYED"
    assert old not in b("token_keys")                 # B destroyed its copy


def test_a_key_replica_b_cannot_unwrap_is_not_reported_and_waits_for_the_delay(
        pair: tuple[Replica, Replica], postgres_dsn: str) -> None:
    """A tampered blob (as a wrong check value would): B's copy is refused, B does not report
    the key, so it stays PENDING until keys.publish_delay."""
    a, b = pair
    new = a("rotate")
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("UPDATE wrapped_keys SET wrapped = set_byte(wrapped, 39, "
                     "get_byte(wrapped, 39) # 1) WHERE key_id = %s", (new,))
    _step(a, b)
    _step(a, b)
    assert new not in b("token_keys")
    assert not all(new in loaded for loaded in _loaded(postgres_dsn))
    assert a("states")[new] == "PENDING"
    _step(a, b, seconds=PUBLISH_DELAY)
    assert a("states")[new] == "ACTIVE"


def test_per_node_tokens_needs_postgresql_and_pkcs11(tmp_path: Path) -> None:
    pg = '[postgresql]\ndsn = "host=/tmp dbname=x user=y"\n'
    on = "[cluster]\nper_node_tokens = true\n"
    assert load_toml(tmp_path, pg).cluster.per_node_tokens is False
    assert load_toml(tmp_path, pg + on).cluster.per_node_tokens is True
    with pytest.raises(ConfigError) as refused:
        load_toml(tmp_path, on)
    assert "cluster.per_node_tokens" in str(refused.value)


def test_per_node_tokens_refuse_several_server_processes_on_one_token(tmp_path: Path) -> None:
    """Each replica process unwraps the keys it lacks at its heartbeat: two processes on one
    token could both unwrap a key, leaving two objects with one id that no replica could then
    use. ``server.processes`` > 1 is refused with per-node tokens, naming the setting."""
    base = ('[postgresql]\ndsn = "host=/tmp dbname=x user=y"\n'
            "[cluster]\nper_node_tokens = true\n")
    assert load_toml(tmp_path, base + "[server]\nprocesses = 1\n").cluster.per_node_tokens
    with pytest.raises(ConfigError) as refused:
        load_toml(tmp_path, base + "[server]\nprocesses = 2\n")
    assert "server.processes" in str(refused.value)
    assert "per_node_tokens" in str(refused.value)
