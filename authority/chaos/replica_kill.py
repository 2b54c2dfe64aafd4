"""Scenario 6, a replica killed under load: three replicas on one SoftHSM2 token and a devdb
PostgreSQL (authority/chaos/replicas.py: the short intervals of tests/test_cluster_e2e.py, a
scheduled rotation every ``ROTATION`` seconds), load through all of them.

1. kill -9 of the maintenance lease holder: the lease moves to a survivor (its epoch + 1) and
   the periodic work continues there (a scheduled rotation made after the kill).
2. SIGSTOP, longer than the lease, of the new holder at the moment it is about to commit a
   fenced write: its scheduled rotation is pinned, from outside, between the fence it took
   and its commit (the scenario holds an ACCESS EXCLUSIVE lock on the ``replicas`` table
   until ``pg_stat_activity`` shows the holder's connection waiting in the rotation's read of
   the live replicas; it is then stopped and the lock released). The other replica takes the
   lease and rotates; the stopped one, resumed, finishes its rotation: the commit must be
   refused (StaleFence in its log), the key it made must be in neither the ring nor the
   token, and GetStatus on the others shows the lease epoch moved.

Throughout: 0 wrong answers, no acknowledged consume lost (every one REPLAYED afterwards).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psycopg

from authority._proto.ticketauthority.v1 import admin_pb2
from authority.bench.serveproc import CALL, ServeProcess, token_key_ids
from authority.chaos.core import Outcome
from authority.chaos.load import Load, lost_consumes
from authority.chaos.replicas import APPLICATION, LEASE, lease, replicas, status
from authority.chaos.servers import time_until
from authority.keys import KeyState

NAME = "replica-kill"
ROTATION = 2           # keys.rotation_period (seconds)
KEYS = f"rotation_period = {ROTATION}\nmaintenance_interval = 0.3\n"
MOVE_BOUND = LEASE + 2.0      # the lease on a survivor after the kill (lease + heartbeats)
WORK_BOUND = 3 * ROTATION + 5.0   # a scheduled rotation on the new holder
#: how long the stopped holder stays stopped once the lease moved (its audit append waits
#: under postgresql.statement_timeout, 5 s, all along: stopped + this stays below)
STOPPED_AFTER_MOVE = 1.5
STALE = "is no longer held: another replica took it over"   # StaleFence's message
#: an audit append waiting for the table's lock (authority/store/postgres/audit.py)
AUDIT_LOCK = "LOCK TABLE audit%"


def run(work: Path, quick: bool) -> Outcome:
    """Raises: StartupError (PostgreSQL), AssertionError (a replica did not start),
    grpc.RpcError, psycopg.Error."""
    from authority.devdb import DevPostgres

    out = Outcome(NAME, "kill -9 of the lease holder, then SIGSTOP of the next one mid-commit")
    with DevPostgres.launch(prefix="ta-pgk-") as db:
        dsn = db.dsn(db.create_database())
        with replicas(work, dsn, keys=KEYS) as servers:
            ids = {status(s).replica_id: s for s in servers}
            with Load([lambda s=s: s.tickets for s in servers],  # type: ignore[misc]
                      max_seconds=120.0) as load:
                time.sleep(1.0 if quick else 10.0)   # load before the kill
                survivors = _kill_holder(out, servers, ids)
                _stop_holder(out, survivors, ids, dsn, work)
                time.sleep(1.0)
            tally = load.tally
            out.calls, out.wrong = tally.calls, len(tally.wrong)
            out.detail = "; ".join(tally.wrong[:3])
            out.lost = lost_consumes(tally, survivors[0].tickets)
            out.figures.update({"failing_calls": tally.failing,
                                "acknowledged_consumes": len(tally.consumed)})
    return out


def _holder(ids: dict[str, ServeProcess], asked: ServeProcess) -> tuple[ServeProcess | None,
                                                                        int]:
    held, epoch = lease(asked)
    return ids.get(held), epoch


def _kill_holder(out: Outcome, servers: list[ServeProcess],
                 ids: dict[str, ServeProcess]) -> list[ServeProcess]:
    """Phase 1: SIGKILL the holder; the lease moves, a scheduled rotation follows. Returns the
    survivors."""
    victim, epoch = _holder(ids, servers[0])
    assert victim is not None, "no replica holds the maintenance lease"
    survivors = [s for s in servers if s is not victim]
    rotations = {s.name: _rotations(s) for s in survivors}
    victim.signal(signal.SIGKILL)   # not kill(): it closes the channel the load is using
    killed = time.monotonic()
    assert victim.proc is not None
    victim.proc.wait(timeout=30)
    moved = _moved(survivors, victim, epoch, MOVE_BOUND)
    out.recovery_s = None if moved is None else moved - killed
    out.check(f"kill -9: the lease moved to a survivor within {MOVE_BOUND} s",
              moved is not None)
    heir, _ = _holder(ids, survivors[0])
    rotated = heir is not None and time_until(
        lambda: _rotations(heir) > rotations[heir.name], WORK_BOUND) is not None
    out.check("kill -9: the new holder made a scheduled rotation", rotated)
    out.figures["kill_lease_moved_s"] = round(out.recovery_s or -1.0, 2)
    return survivors


def _moved(servers: list[ServeProcess], gone: ServeProcess, epoch: int,
           bound: float) -> float | None:
    """Monotonic time when every one of ``servers`` reports the lease held by one of them at
    a higher epoch than ``epoch``; None if not within ``bound``."""
    ids = {status(s).replica_id for s in servers}

    def moved() -> bool:
        seen = [lease(s) for s in servers]
        return all(h in ids and e > epoch for h, e in seen)

    took = time_until(moved, bound, poll=0.02)
    return None if took is None else time.monotonic()


def _stop_holder(out: Outcome, servers: list[ServeProcess], ids: dict[str, ServeProcess],
                 dsn: str, work: Path) -> None:
    """Phase 2: pin the holder's rotation right before its fenced commit, SIGSTOP it, let the
    lease move, resume it: its commit is refused; the new holder rotates."""
    holder, epoch = _holder(ids, servers[0])
    assert holder is not None, "no survivor holds the maintenance lease"
    other = next(s for s in servers if s is not holder)
    before = _keys(other, destroyed=True)
    rotations = _rotations(other)
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            stopped = _pin_and_stop(conn, holder)
            out.check("SIGSTOP: the holder was stopped inside its rotation, before its "
                      "commit", stopped is not None)
            if stopped is None:
                return
            moved = _moved([other], holder, epoch, MOVE_BOUND)
            out.check(f"SIGSTOP: the lease moved to the other replica within {MOVE_BOUND} s",
                      moved is not None)
            time.sleep(STOPPED_AFTER_MOVE)
            out.figures["stopped_s"] = round(time.monotonic() - stopped, 2)
            out.check("SIGSTOP: stopped longer than the lease",
                      out.figures["stopped_s"] > LEASE)
        finally:
            holder.signal(signal.SIGCONT)
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()   # the audit lock: the resumed holder's append is first
    refused = time_until(lambda: STALE in holder.log.read_text(errors="replace"), 10.0)
    out.check("SIGSTOP: resumed, its fenced commit was refused (StaleFence in its log)",
              refused is not None)
    rotated = time_until(lambda: _rotations(other) > rotations, WORK_BOUND)
    out.check("SIGSTOP: the new holder made a scheduled rotation", rotated is not None)
    out.check("SIGSTOP: GetStatus on the other shows the lease epoch past the stale one",
              lease(other)[1] > epoch)
    made = _created_not_in_ring(other, dsn, before)
    out.check("SIGSTOP: the key its stale rotation made is not in the ring", bool(made))
    token = _token_keys(work)
    out.check("SIGSTOP: ... nor in the token, which holds the ring's keys",
              bool(made) and not (made & token) and _keys(other) <= token)
    out.figures["stale_keys"] = len(made)


def _pin_and_stop(conn: psycopg.Connection[Any], holder: ServeProcess) -> float | None:
    """Take the audit table's lock (in a transaction left open: the caller rolls it back)
    with no key PENDING, until the holder's connection waits for it: its rotation has taken
    its fence, made its key, built its change and audits it; its fenced commit comes next.
    SIGSTOP it then. Returns when (monotonic), None if it did not get there in time."""
    name = f"{APPLICATION}{holder.name}"
    deadline = time.monotonic() + 4 * ROTATION + 10
    while time.monotonic() < deadline:
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE audit IN EXCLUSIVE MODE")
        pending = conn.execute("SELECT count(*) FROM keys WHERE state = %s",
                               (int(KeyState.PENDING),)).fetchone()
        if pending is not None and pending[0] == 0 and _waits(conn, name, 2 * ROTATION):
            holder.signal(signal.SIGSTOP)
            return time.monotonic()
        conn.rollback()
        time.sleep(0.2)
    return None


def _waits(conn: psycopg.Connection[Any], name: str, timeout: float) -> bool:
    """Whether a connection named ``name`` waits for the audit table's lock within
    ``timeout``."""
    def waiting() -> bool:
        conn.execute("SELECT pg_stat_clear_snapshot()")   # else: one snapshot per transaction
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                           "AND wait_event_type = 'Lock' AND query LIKE %s",
                           (name, AUDIT_LOCK)).fetchone()
        return bool(row and row[0])

    return time_until(waiting, timeout, poll=0.01) is not None


def _rotations(server: ServeProcess) -> int:
    """How many scheduled rotations ``server`` logged it made."""
    return server.log.read_text(errors="replace").count("created (scheduled)")


def _keys(server: ServeProcess, destroyed: bool = False) -> set[str]:
    """The key ids ``server``'s ListKeys shows."""
    listed = server.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=destroyed),
                                   timeout=CALL).keys
    return {k.key_id for k in listed}


def _created_not_in_ring(server: ServeProcess, dsn: str, before: set[str]) -> set[str]:
    """Key ids the audit chain (the database's ``audit`` table) says were created, that were
    not listed ``before`` and that ``server``'s ring does not list (destroyed ones included).
    Raises: psycopg.Error."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT details FROM audit WHERE action = 'key.created'").fetchall()
    created = {_details(r[0])["key_id"] for r in rows}
    return created - _keys(server, destroyed=True) - before


def _details(value: Any) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(value) if isinstance(value, str) else dict(value)
    return found


def _token_keys(work: Path) -> set[str]:
    """The ticket key ids (hex) the shared token in ``work``/hsm holds, listed by
    python-pkcs11 in a process of its own (SoftHSM2 reads its configuration once per process).
    Raises: AssertionError (the listing failed)."""
    from authority.backends.softhsm import provision_embedded_token

    token = provision_embedded_token(work / "hsm")
    return token_key_ids(token.module, token.token_label, token.pin.reveal(),
                         token.softhsm2_conf)
