"""The audit log: hash chain, tamper detection naming the line, resume after restart, the
``audit verify`` command, every key lifecycle event with its actor (system, local, the admin
certificate's URI), no secrets in the log, and fail-closed admin actions."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authority._proto.ticketauthority.v1 import admin_pb2, admin_pb2_grpc
from authority.audit import GENESIS, AuditLog, AuditUnavailable, entry_hash, verify
from authority.certs import init_dev_pki
from authority.cli import main
from authority.errors import ConfigError, StartupError
from authority.keys import KeyState
from authority.settings_loader import load_config
from tests.audit_helpers import admin_actions_refused, run_together
from tests.conftest import START, Harness, issue, make_config, sample_state
from tests.test_tls_roles import SERVER_NAME, Tls, tls_settings


def entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def actions(path: Path) -> list[tuple[str, str]]:
    return [(e["actor"], e["action"]) for e in entries(path)]


def write_three(path: Path) -> None:
    log = AuditLog(path, now=lambda: 1_800_000_000.0)
    for n in range(3):
        log.record("spiffe://example.org/admin/alice", "key.rotated", {"key_id": f"{n:016x}"})
    log.close()


# -- the file and its chain -----------------------------------------------------------------------


def test_chain_is_valid_and_documented_rule_holds(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_three(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = entries(path)
    assert [e["seq"] for e in lines] == [1, 2, 3]
    assert lines[0]["prev"] == GENESIS
    assert lines[0]["time"] == "2027-01-15T08:00:00.000000Z"
    for before, after in itertools.pairwise(lines):
        assert after["prev"] == before["hash"]
    for e in lines:  # the documented rule: sha256 over canonical JSON without "hash"
        body = {k: v for k, v in e.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert e["hash"] == hashlib.sha256(canonical.encode()).hexdigest() == entry_hash(e)
    result = verify(path)
    assert (result.ok, result.lines, result.first_bad_line) == (True, 3, None)


@pytest.mark.parametrize(("tamper", "bad_line", "reason"), [
    (lambda ls: ls.__setitem__(1, ls[1].replace("0000000000000001", "00000000000000ff")), 2,
     "hash does not match"),
    (lambda ls: ls.pop(1), 2, "seq is 3, expected 2"),
    (lambda ls: ls.insert(0, ls.pop(2)), 1, "seq is 3, expected 1"),
    (lambda ls: ls.__setitem__(2, ls[2][:-5]), 3, "not JSON"),
    (lambda ls: ls.__setitem__(0, ls[0].replace('"seq":1', '"seq":1,"x":0')), 1, "members"),
])
def test_a_tampered_line_is_named(tmp_path: Path, tamper: Any, bad_line: int,
                                  reason: str) -> None:
    path = tmp_path / "audit.log"
    write_three(path)
    lines = path.read_text().splitlines()
    tamper(lines)
    path.write_text("".join(line + "\n" for line in lines))
    result = verify(path)
    assert not result.ok
    assert result.first_bad_line == bad_line
    assert reason in result.reason
    assert result.lines == bad_line - 1


def test_rewriting_a_line_and_its_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_three(path)
    lines = entries(path)
    lines[0]["actor"] = "spiffe://example.org/admin/mallory"
    lines[0]["hash"] = entry_hash(lines[0])
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
                            for e in lines))
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "prev does not match" in result.reason


def test_reopen_resumes_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_three(path)
    log = AuditLog(path)
    log.record("system", "key.destroyed", {"key_id": "00"})
    log.close()
    assert [e["seq"] for e in entries(path)] == [1, 2, 3, 4]
    assert verify(path).ok


def test_a_damaged_tail_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_three(path)
    with path.open("ab") as fh:
        fh.write(b'{"seq":4,"torn')
    assert verify(path).first_bad_line == 4
    with pytest.raises(StartupError, match=r"audit_log: the last line .* is damaged"):
        AuditLog(path)


def test_an_unwritable_log_refuses(tmp_path: Path) -> None:
    log = AuditLog(Path("/dev/full"))   # every write fails with ENOSPC
    with pytest.raises(AuditUnavailable) as err:
        log.record("local", "key.rotated", {})
    assert err.value.status == "UNAVAILABLE"
    log.close()
    with pytest.raises(AuditUnavailable):
        log.record("local", "key.rotated", {})


WRITER = """
import sys
from pathlib import Path
from authority.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
for n in range(int(sys.argv[3])):
    log.record("system", "test.append", {"writer": sys.argv[2], "n": n})
log.close()
"""


def test_processes_appending_at_once_form_one_chain(tmp_path: Path) -> None:
    """Several processes on one host (server.processes) share one audit file: each opened it
    (and read its head) before any wrote, then all append at once; every line is kept, in one
    chain (today's code forked it: every process went on from the head it read at start)."""
    path = tmp_path / "audit.log"
    write_three(path)
    writers, each = 4, 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(each)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for w in range(writers)]
    run_together(procs)
    result = verify(path)
    assert (result.ok, result.reason) == (True, "")
    assert result.lines == 3 + writers * each
    written = [(e["details"]["writer"], e["details"]["n"]) for e in entries(path)[3:]]
    assert sorted(written) == [(str(w), n) for w in range(writers) for n in range(each)]
    for w in range(writers):   # each writer's lines in its own order
        assert [n for writer, n in written if writer == str(w)] == list(range(each))


def test_a_tail_damaged_while_running_refuses_the_append(tmp_path: Path) -> None:
    """Another process sharing the file left a torn line: the next append is refused (it
    would chain onto nothing), as a start is; once repaired, appends go on."""
    path = tmp_path / "audit.log"
    write_three(path)
    log = AuditLog(path)
    good = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"seq":4,"torn')
    with pytest.raises(AuditUnavailable, match=r"last line is damaged: incomplete line"):
        log.record("local", "key.rotated", {})
    path.write_bytes(good)
    log.record("local", "key.rotated", {})
    log.close()
    assert verify(path).ok and verify(path).lines == 4


SHORT_WRITE = """
import resource, signal, sys
from pathlib import Path
from authority.audit import AuditLog, AuditUnavailable
path = Path(sys.argv[1])
log = AuditLog(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # past the limit: EFBIG, or a short write
size = path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
try:
    log.record("local", "key.rotated", {"reason": "x" * 100})
except AuditUnavailable as exc:
    print(exc)
"""


def test_a_line_written_in_part_is_cut_off(tmp_path: Path) -> None:
    """A write that stops part way (here: the file-size limit, a real short write) refuses
    the action and leaves the file as it was: no torn line for the next append to trip on."""
    path = tmp_path / "audit.log"
    write_three(path)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(path)], capture_output=True,
                          text=True, timeout=60, check=True)
    assert "audit log cannot be written (short write" in done.stdout, done
    assert path.read_bytes() == before
    AuditLog(path).close()   # starts again


def test_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    write_three(path)
    assert main(["audit", "verify", str(path)]) == 0
    assert "OK, 3 lines" in capsys.readouterr().out
    path.write_text(path.read_text().replace("alice", "mallory", 1))
    assert main(["audit", "verify", str(path)]) == 1
    assert f"{path}: line 1: hash does not match" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "missing.log")]) == 2


def test_audit_log_setting(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('audit_log = "logs/audit.jsonl"\n')
    assert load_config(toml, state_dir=tmp_path).audit_log == tmp_path / "logs" / "audit.jsonl"
    toml.write_text("audit_log = 3\n")
    with pytest.raises(ConfigError, match=r"^audit_log:"):
        load_config(toml, state_dir=tmp_path)


# -- the running authority -----------------------------------------------------------------------


def test_key_lifecycle_is_audited_with_its_actor(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    path = h.state_dir / "audit.log"
    first = h.authority.ring.primary_id.hex()
    assert actions(path) == [("system", "key.created")]
    assert entries(path)[0]["details"] == {"key_id": first, "reason": "first key"}
    issued = issue(h.tickets)
    rotated = h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    assert actions(path)[1:] == [("local", "key.created"), ("local", "key.rotated")]
    assert entries(path)[2]["details"]["key_id"] == first
    assert entries(path)[2]["details"]["new_key_id"] == rotated.new_key.key_id
    h.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=first))
    assert actions(path)[3:] == [("local", "key.retired"), ("local", "key.destroyed")]
    h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    h.clock.advance(h.config.tickets.max_lifetime)
    h.authority.maintain()   # scheduled rotation; the second key's window closes
    assert actions(path)[-3:] == [("system", "key.created"), ("system", "key.rotated"),
                                  ("system", "key.destroyed")]
    assert entries(path)[-1]["details"] == {"key_id": rotated.new_key.key_id,
                                            "reason": "decryption window closed"}
    h.restart()              # the chain goes on across restarts
    h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    result = verify(path)
    assert result.ok and result.lines == len(entries(path)) == 12
    text = path.read_text()
    secrets = [issued.ticket, sample_state().sk_d]
    for secret in secrets:
        assert secret.hex() not in text and secret.hex().upper() not in text
    assert base64.b64encode(issued.ticket).decode()[:24] not in text


def test_admin_actions_fail_closed_when_the_log_cannot_be_written(
        pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    old = h.authority.ring.primary_id
    h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    keys_before = h.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=True))
    device_before = h.authority.backend.list_keys()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, h.authority.audit._fd)   # the disk under the audit log is now full
    finally:
        os.close(full)
    admin_actions_refused(h, old)
    h.clock.advance(h.config.tickets.max_lifetime)
    with pytest.raises(AuditUnavailable):
        h.authority.maintain()
    assert h.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=True)) == keys_before
    assert h.authority.backend.list_keys() == device_before
    assert {r.key_id: r.state for r in h.authority.ring.records()}[old] == \
        KeyState.DECRYPT_ONLY
    assert issue(h.tickets).ticket   # tickets are still issued: only admin actions stop
    assert not h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
    assert not h.admin.ListRealms(admin_pb2.ListRealmsRequest()).realms


def test_revocations_and_epoch_bumps_are_audited(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    h.admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(id_i=b"\x02\x00\x00\x00who",
                                                         reason="user left"))
    h.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(realm="blue"))
    assert actions(h.state_dir / "audit.log")[-2:] == [("local", "tickets.revoke"),
                                                        ("local", "policy.epoch_bump")]
    assert verify(h.state_dir / "audit.log").ok


def test_no_start_without_an_audit_log(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StartupError, match=r"^audit_log: cannot open"):
        h.start(replace(make_config(h.state_dir), audit_log=tmp_path / "dir"))
    with pytest.raises(AuditUnavailable):   # cannot record the first key: no key is made
        h.start(replace(make_config(h.state_dir), audit_log=Path("/dev/full")))
    h.running = None
    h.start(make_config(h.state_dir))   # the same device and store start cleanly now
    assert actions(h.state_dir / "audit.log") == [("system", "key.created")]
    h.stop()


def test_the_actor_is_the_admin_certificate_uri(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11")
    running = h.start(replace(make_config(h.state_dir), tls=tls_settings(pki)))
    try:
        tls = Tls(h, pki, running.address)
        admin_pb2_grpc.TicketAdminStub(tls.admin()).RotateKey(admin_pb2.RotateKeyRequest())
        assert actions(h.state_dir / "audit.log")[1:] == [
            (pki.admin_uri, "key.created"), (pki.admin_uri, "key.rotated")]
    finally:
        h.stop()


REFUSED_ADMIN_ACTIONS: list[tuple[str, Any, str]] = [
    ("RevokeTickets", admin_pb2.RevokeTicketsRequest(id_i=b"\x02\x00\x00\x00who",
                                                     reason="x" * 100_000), "reason"),
    ("RevokeTickets", admin_pb2.RevokeTicketsRequest(
        issued_before=Timestamp(seconds=int(START) + 3600)), "issued_before"),
    ("RevokeTickets", admin_pb2.RevokeTicketsRequest(ticket_id=bytes(15)), "ticket_id"),
    ("RevokeTickets", admin_pb2.RevokeTicketsRequest(reason="no selector"), "selector"),
    ("BumpPolicyEpoch", admin_pb2.BumpPolicyEpochRequest(realm="blue\x07"), "realm"),
    ("BumpPolicyEpoch", admin_pb2.BumpPolicyEpochRequest(realm="b" * 65), "realm"),
]


def test_refused_admin_actions_write_no_audit_line(pkcs11_harness: Harness) -> None:
    """Validation comes first: a request refused with INVALID_ARGUMENT leaves the log as it was
    (issue 12 point 6); a valid one is audited with what was done."""
    h = pkcs11_harness
    path = h.state_dir / "audit.log"
    before = path.read_bytes()
    for method, request, field in REFUSED_ADMIN_ACTIONS:
        with pytest.raises(grpc.RpcError) as err:
            getattr(h.admin, method)(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field)
        assert err.value.details().startswith(f"{field}: "), err.value.details()
        assert path.read_bytes() == before, f"{method} refused on {field} was audited"
    assert not h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
    assert not h.admin.ListRealms(admin_pb2.ListRealmsRequest()).realms
    reply = h.admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(
        issued_before=Timestamp(seconds=int(START) - 10), reason="r" * 256))
    h.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(realm="blue"))
    assert actions(path)[-2:] == [("local", "tickets.revoke"), ("local", "policy.epoch_bump")]
    revoked, bumped = entries(path)[-2:]
    assert revoked["details"] == {"selector": "issued_before", "value": "",
                                  "issued_before": START - 10, "reason": "r" * 256,
                                  "expires_at": reply.expires_at.seconds}
    assert bumped["details"] == {"realm": "blue"}
    assert verify(path).ok
