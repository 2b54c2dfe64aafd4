"""The audit chain of replicas sharing a PostgreSQL database (authority/audit_pg.py): one chain
in the database that never forks when replicas append at once, entries in the file's format
(one verifier for both), tampering named by seq, fail-closed appends, ``audit verify --config``
over the database. A real PostgreSQL (tests/postgres_fixtures.py); nothing mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2
from authority.audit import GENESIS, AuditLog, AuditUnavailable, canonical, verify
from authority.cli import main
from authority.config import PostgresSettings, Secret
from authority.errors import ConfigError, StartupError
from authority.store.postgres import PostgresStore
from tests.audit_helpers import admin_actions_refused, run_together
from tests.conftest import START, Harness, issue, load_toml, make_config
from tests.postgres_fixtures import (  # noqa: F401
    PostgresServer,
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.test_store_contract import in_threads


def settings(dsn: str, **changes: Any) -> PostgresSettings:
    return replace(PostgresSettings(dsn=Secret(dsn), pool_size=4), **changes)


@pytest.fixture
def open_store(postgres_dsn: str) -> Iterator[Callable[..., PostgresStore]]:
    """Opens stores on this test's database (each its own pool: a replica); closed after."""
    opened: list[PostgresStore] = []

    def make(**changes: Any) -> PostgresStore:
        opened.append(PostgresStore(settings(postgres_dsn, **changes)))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def rows(dsn: str) -> list[dict[str, Any]]:
    """The audit table's entries in seq order, as the file would hold them."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT seq, time, actor, action, details::text, prev, hash "
                             "FROM audit ORDER BY seq").fetchall()
    keys = ("seq", "time", "actor", "action", "details", "prev", "hash")
    return [dict(zip(keys, (*r[:4], json.loads(r[4]), *r[5:]), strict=True)) for r in found]


def tamper(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Change the table as someone holding the database owner's rights would: past the
    append-only trigger."""
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
        conn.execute(sql, params or None)  # type: ignore[arg-type]
        conn.execute("ALTER TABLE audit ENABLE TRIGGER USER")


def write_three(store: PostgresStore) -> None:
    from authority.audit_pg import PostgresAuditLog

    log = PostgresAuditLog(store, now=lambda: START)
    for n in range(3):
        log.record("spiffe://example.org/admin/alice", "key.rotated", {"key_id": f"{n:016x}"})
    log.close()


# -- the chain in the database -----------------------------------------------------------------


def test_entries_are_the_files_lines(tmp_path: Path, open_store: Callable[..., PostgresStore],
                                     postgres_dsn: str) -> None:
    """The same records give the same entries, byte for byte, in the table as in a file: one
    format, one hash rule, one verifier."""
    write_three(open_store())
    path = tmp_path / "audit.log"
    log = AuditLog(path, now=lambda: START)
    for n in range(3):
        log.record("spiffe://example.org/admin/alice", "key.rotated", {"key_id": f"{n:016x}"})
    log.close()
    assert b"".join(canonical(e) + b"\n" for e in rows(postgres_dsn)) == path.read_bytes()
    assert rows(postgres_dsn)[0]["prev"] == GENESIS
    assert verify(path).ok


def test_replicas_appending_at_once_form_one_chain(open_store: Callable[..., PostgresStore],
                                                  postgres_dsn: str) -> None:
    """Two replicas (two stores, two pools), four threads each, append at once: seq 1..N
    with no gap and no fork, every record once."""
    from authority.audit_pg import PostgresAuditLog, verify_database

    logs = [PostgresAuditLog(open_store()), PostgresAuditLog(open_store())]
    each = 15

    def append(i: int) -> None:
        for n in range(each):
            logs[i % 2].record("system", "test.append", {"writer": i, "n": n})

    in_threads(8, append)
    found = rows(postgres_dsn)
    assert [e["seq"] for e in found] == list(range(1, 8 * each + 1))
    assert sorted((e["details"]["writer"], e["details"]["n"]) for e in found) == [
        (i, n) for i in range(8) for n in range(each)]
    result = verify_database(settings(postgres_dsn))
    assert (result.ok, result.lines, result.last_hash) == (True, 8 * each, found[-1]["hash"])


REPLICA = """
import os, sys
from authority.audit_pg import PostgresAuditLog
from authority.config import PostgresSettings, Secret
from authority.store.postgres import PostgresStore
store = PostgresStore(PostgresSettings(dsn=Secret(os.environ["AUDIT_TEST_DSN"]), pool_size=2))
log = PostgresAuditLog(store)
print("ready", flush=True)
sys.stdin.readline()
for n in range(int(sys.argv[2])):
    log.record("system", "test.append", {"writer": sys.argv[1], "n": n})
store.close()
"""


def test_replica_processes_appending_at_once_form_one_chain(postgres_dsn: str) -> None:
    """Three replica processes, each having read the head at start, append at once."""
    from authority.audit_pg import verify_database

    replicas, each = 3, 20
    env = {**os.environ, "AUDIT_TEST_DSN": postgres_dsn}
    procs = [subprocess.Popen([sys.executable, "-c", REPLICA, str(w), str(each)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for w in range(replicas)]
    run_together(procs)
    found = rows(postgres_dsn)
    assert [e["seq"] for e in found] == list(range(1, replicas * each + 1))
    for w in range(replicas):   # each replica's entries in its own order
        assert [e["details"]["n"] for e in found
                if e["details"]["writer"] == str(w)] == list(range(each))
    assert verify_database(settings(postgres_dsn)).ok


def test_the_table_is_append_only(open_store: Callable[..., PostgresStore],
                                  postgres_dsn: str) -> None:
    write_three(open_store())
    for sql in ("UPDATE audit SET actor = 'x' WHERE seq = 2", "DELETE FROM audit WHERE seq = 3",
                "TRUNCATE audit"):
        with psycopg.connect(postgres_dsn) as conn, pytest.raises(
                psycopg.errors.RaiseException, match="append-only"):
            conn.execute(sql)  # type: ignore[arg-type]
    assert len(rows(postgres_dsn)) == 3


@pytest.mark.parametrize(("sql", "bad_seq", "reason"), [
    ("UPDATE audit SET actor = 'spiffe://example.org/admin/mallory' WHERE seq = 2", 2,
     "hash does not match"),
    ("UPDATE audit SET details = '{\"key_id\":\"00000000000000ff\"}' WHERE seq = 1", 1,
     "hash does not match"),
    ("DELETE FROM audit WHERE seq = 2", 3, "seq is 3, expected 2"),
    ("UPDATE audit SET prev = repeat('1', 64) WHERE seq = 3", 3, "prev does not match"),
    ("UPDATE audit SET seq = 9 WHERE seq = 3", 9, "seq is 9, expected 3"),
])
def test_a_tampered_row_is_named_by_its_seq(open_store: Callable[..., PostgresStore],
                                           postgres_dsn: str, sql: str, bad_seq: int,
                                           reason: str) -> None:
    from authority.audit_pg import verify_database

    write_three(open_store())
    tamper(postgres_dsn, sql)
    result = verify_database(settings(postgres_dsn))
    assert (result.ok, result.first_bad_line) == (False, bad_seq)
    assert reason in result.reason


def test_a_rewritten_row_and_hash_breaks_the_next_link(
        open_store: Callable[..., PostgresStore], postgres_dsn: str) -> None:
    from authority.audit import entry_hash
    from authority.audit_pg import verify_database

    write_three(open_store())
    first = rows(postgres_dsn)[0]
    first["actor"] = "spiffe://example.org/admin/mallory"
    tamper(postgres_dsn, "UPDATE audit SET actor = %s, hash = %s WHERE seq = 1",
           (first["actor"], entry_hash(first)))
    result = verify_database(settings(postgres_dsn))
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "prev does not match" in result.reason


def test_a_damaged_head_refuses_the_start_and_the_append(
        open_store: Callable[..., PostgresStore], postgres_dsn: str) -> None:
    from authority.audit_pg import PostgresAuditLog

    store = open_store()
    write_three(store)
    running = PostgresAuditLog(store)
    tamper(postgres_dsn, "UPDATE audit SET action = 'key.created' WHERE seq = 3")
    with pytest.raises(StartupError, match=r"^audit: the last entry \(seq 3\) .* is damaged "
                                           r"\(hash does not match"):
        PostgresAuditLog(store)
    with pytest.raises(AuditUnavailable, match="last entry is damaged"):
        running.record("local", "key.rotated", {})
    assert len(rows(postgres_dsn)) == 3


# -- an authority on PostgreSQL ----------------------------------------------------------------


def pg_harness(tmp_path: Path, dsn: str, **changes: Any) -> Harness:
    h = Harness(tmp_path / "state")
    h.config = replace(make_config(h.state_dir), postgresql=settings(dsn, **changes))
    return h


def test_an_authority_on_postgresql_audits_in_the_database(tmp_path: Path,
                                                           postgres_dsn: str) -> None:
    h = pg_harness(tmp_path, postgres_dsn)
    h.start()
    try:
        h.admin.RotateKey(admin_pb2.RotateKeyRequest())
        h.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(realm="blue"))
        h.restart()   # the chain goes on from the database's head
        h.admin.RotateKey(admin_pb2.RotateKeyRequest())
        assert h.authority.audit.last_hash == rows(postgres_dsn)[-1]["hash"]
    finally:
        h.stop()
    assert [(e["actor"], e["action"]) for e in rows(postgres_dsn)] == [
        ("system", "key.created"), ("local", "key.created"), ("local", "key.rotated"),
        ("local", "policy.epoch_bump"), ("local", "key.created"), ("local", "key.rotated")]
    assert not (h.state_dir / "audit.log").exists()   # no second, partial chain


def test_audit_log_with_postgresql_is_refused(tmp_path: Path, postgres_dsn: str) -> None:
    """audit_log names a file the service would not write: a setting that does nothing."""
    h = pg_harness(tmp_path, postgres_dsn)
    with pytest.raises(ConfigError, match=r"^audit_log: .*\[postgresql\]"):
        h.start(replace(h.config, audit_log=tmp_path / "audit.log"))
    h.running = None
    h.start(replace(h.config, audit_log=None))   # nothing was left half-open
    h.stop()


def key_states(h: Harness) -> list[tuple[str, int]]:
    listed = h.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=True))
    return [(k.key_id, k.state) for k in listed.keys]


def test_admin_actions_fail_closed_when_the_append_fails(
        tmp_path: Path, postgres_dsn: str) -> None:
    """Another session holds the audit table: the append ends at the statement timeout and
    the action is refused with UNAVAILABLE; nothing changed. Once released, all goes on."""
    h = pg_harness(tmp_path, postgres_dsn, statement_timeout=0.5)
    h.start()
    try:
        old = h.authority.ring.primary_id
        h.admin.RotateKey(admin_pb2.RotateKeyRequest())
        keys_before = key_states(h)
        device_before = h.authority.backend.list_keys()
        entries_before = rows(postgres_dsn)
        revoke = admin_pb2.RevokeTicketsRequest(id_i=b"\x02\x00\x00\x00who", reason="test")
        with psycopg.connect(postgres_dsn) as locker:
            locker.execute("LOCK TABLE audit IN ACCESS EXCLUSIVE MODE")
            for message in admin_actions_refused(h, old):
                assert postgres_dsn not in message
            assert issue(h.tickets).ticket   # tickets are still issued: only admin actions stop
            locker.rollback()
        assert key_states(h) == keys_before
        assert h.authority.backend.list_keys() == device_before
        assert not h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
        assert not h.admin.ListRealms(admin_pb2.ListRealmsRequest()).realms
        assert rows(postgres_dsn) == entries_before
        h.admin.RevokeTickets(revoke)
        assert rows(postgres_dsn)[-1]["action"] == "tickets.revoke"
    finally:
        h.stop()


# -- ticket-authority audit verify over the database -------------------------------------------


def test_verify_command_over_the_database(tmp_path: Path, postgres_server: PostgresServer,
                                          postgres_dsn: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = PostgresStore(settings(postgres_dsn))
    write_three(store)
    store.close()
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(postgres_dsn + "\n")
    toml = tmp_path / "authority.toml"
    toml.write_text(f'[postgresql]\ndsn_file = "{dsn_file}"\n')
    assert load_toml(tmp_path, toml.read_text()).postgresql is not None
    head = rows(postgres_dsn)[-1]["hash"]
    assert main(["audit", "verify", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("postgresql host=") and f"OK, 3 entries, chain head {head}" in out
    tamper(postgres_dsn, "UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    assert main(["audit", "verify", "--config", str(toml)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("postgresql host=") and ": seq 2: hash does not match" in out
    assert postgres_server.password not in out
    # a FILE given explicitly is still the file
    path = tmp_path / "audit.log"
    AuditLog(path).close()
    assert main(["audit", "verify", "--config", str(toml), str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: OK, 0 lines")


def test_verify_command_reads_only(tmp_path: Path, postgres_server: PostgresServer,
                                  postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A database no authority has started on has no chain: exit 2 saying so, and the check
    created nothing (it never migrates). A wrong password: exit 2, the password not shown."""
    toml = tmp_path / "authority.toml"
    toml.write_text(f"[postgresql]\ndsn = '{postgres_dsn}'\n")
    assert main(["audit", "verify", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "cannot read postgresql host=" in err and "no audit table" in err
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT to_regclass('meta')").fetchone() == (None,)
    wrong = postgres_dsn.replace(postgres_server.password, "not-the-password")
    toml.write_text(f"[postgresql]\ndsn = '{wrong}'\n")
    assert main(["audit", "verify", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "cannot read postgresql host=" in err and "not-the-password" not in err
    assert postgres_server.password not in err
