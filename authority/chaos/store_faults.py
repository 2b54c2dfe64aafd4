"""Scenario 4, store faults on a single node (the embedded SQLite store, STATE_DIR/authority.db).

The state directory lives on a small tmpfs the scenario mounts (it runs as root in CI), so it
can fill the file system under a running server and make it read-only between runs:

1. disk full while serving (a filler file takes the last byte): calls that need the store
   (consumes) are UNAVAILABLE, the log names the file; space returns and service resumes by
   itself;
2. read-only at start (the file system remounted read-only; Linux refuses that while the server
   has the file open for writing, so not while serving): ``serve`` refuses with a message
   naming what it could not write;
3. a corrupted database file at start (its header or a page of a table overwritten, or the file
   cut to half): ``serve`` refuses
   with a message naming the file, and leaves the file as it was (never reset); the original
   put back, every ticket from before still redeems and every consumed one is still REPLAYED.

Without the right to mount (not root), part 1 is skipped (said in ``detail``) and part 2
makes the directory read-only by its mode bits instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.bench.serveproc import ServeProcess
from authority.chaos.core import Outcome
from authority.chaos.load import Load, lost_consumes
from authority.chaos.servers import round_trip, single_settings, time_until

NAME = "store-faults"
DB = "authority.db"
FS_SIZE = "24m"
RECOVERY_BOUND = 2.0
OK = authority_pb2.REDEEM_RESULT_OK
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED


def run(work: Path, quick: bool) -> Outcome:
    """Raises: AssertionError (a server did not start), grpc.RpcError (it never came back),
    OSError (the work directory)."""
    out = Outcome(NAME, "disk full, read-only, corrupt db")
    outage = 2.0 if quick else 10.0
    with _file_system(work / "fs") as (fs, mounted):
        server = ServeProcess(work, "a", single_settings(fs / "a"))
        server.state = fs / "a"   # on the small file system; its config and log are not
        server.serve()
        try:
            before, consumed = _tickets(server)
            if mounted:
                _while_serving(out, server, "disk full", lambda: _fill(fs),
                               lambda: (fs / "filler").unlink(), outage)
            else:
                out.detail = "disk full skipped: cannot mount a file system (not root)"
            server.stop()
            _read_only_at_start(out, server, fs, mounted)
            _corrupt_at_start(out, server)
            server.serve()
            _still_answers(out, server, before, consumed)
        finally:
            server.stop()
    return out


# -- faults while serving -----------------------------------------------------------------------

def _while_serving(out: Outcome, server: ServeProcess, what: str,
                   inject: Callable[[], object], repair: Callable[[], object],
                   outage: float) -> None:
    """Inject under load, ``outage`` seconds, repair; record calls, wrong answers, lost
    consumes, whether consumes failed and the log named the file, the recovery time."""
    logged = _log_size(server)
    with Load([lambda: server.tickets], max_seconds=4 * outage + 20) as load:
        time.sleep(0.5)
        inject()
        failing = time_until(lambda: _consume_fails(server), 10.0)
        out.check(f"{what}: consumes UNAVAILABLE", failing is not None)
        time.sleep(outage)
        repair()
        back = time_until(lambda: round_trip(server) and _consume_works(server), 30.0)
        time.sleep(0.5)
    tally = load.tally
    out.check(f"{what}: service back within {RECOVERY_BOUND} s of the repair",
              back is not None and back <= RECOVERY_BOUND)
    out.recovery_s = max(out.recovery_s or 0.0, back or 0.0)
    out.check(f"{what}: the log names {DB}", DB in _log_since(server, logged))
    out.calls += tally.calls
    out.wrong += len(tally.wrong)
    out.lost += lost_consumes(tally, server.tickets)
    if tally.wrong:
        out.detail = f"{what}: " + "; ".join(tally.wrong[:3])
    key = what.split()[0].replace("-", "_")
    out.figures.update({f"{key}_failing_calls": tally.failing,
                        f"{key}_recovery_s": round(back or -1.0, 3)})


def _consume_fails(server: ServeProcess) -> bool:
    """Whether a consume of a fresh ticket answers UNAVAILABLE now (issue must work)."""
    try:
        ticket = server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=_state(1)), timeout=2).ticket
        server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=ticket, consume=True), timeout=2)
    except grpc.RpcError as exc:
        return bool(exc.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def _consume_works(server: ServeProcess) -> bool:
    """Whether a fresh ticket consumes OK, then answers REPLAYED."""
    try:
        ticket = server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=_state(2)), timeout=2).ticket
        results = [server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=ticket, consume=True), timeout=2).result for _ in range(2)]
    except grpc.RpcError:
        return False
    return results == [OK, REPLAYED]


def _fill(fs: Path) -> None:
    """Take every free byte of the file system at ``fs`` with ``fs``/filler."""
    chunk = b"\0" * (1 << 20)
    with (fs / "filler").open("wb", buffering=0) as filler:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(chunk[:size])


# -- faults at start ----------------------------------------------------------------------------

def _read_only_at_start(out: Outcome, server: ServeProcess, fs: Path, mounted: bool) -> None:
    """``serve`` on a read-only state directory must refuse, naming what it cannot write."""
    if mounted:
        _remount(fs, "ro")
    else:
        os.chmod(server.state, 0o500)
    try:
        refused, said = _refuses(server)
    finally:
        if mounted:
            _remount(fs, "rw")
        else:
            os.chmod(server.state, 0o700)
    out.check("read-only at start: serve refuses", refused)
    out.check("read-only at start: the refusal names a file in the state directory",
              str(server.state) in said)
    if refused and str(server.state) not in said:
        out.detail = f"read-only at start said: {said[-300:]}"


def _corrupt_at_start(out: Outcome, server: ServeProcess) -> None:
    """Corrupt the database three ways (its header overwritten, a page of a table overwritten,
    the file cut to half); each time ``serve`` must refuse naming the file and leave it as it
    was. The original is put back afterwards."""
    db = server.state / DB
    original = db.read_bytes()
    page = int.from_bytes(original[16:18], "big") or 65536
    for what, broken in (("header", _overwritten(original, 0)),
                         ("a table's page", _overwritten(original, 2 * page)),
                         ("file cut to half", original[:len(original) // 2])):
        db.write_bytes(broken)
        digest = hashlib.sha256(broken).hexdigest()
        refused, said = _refuses(server)
        out.check(f"corrupt {what}: serve refuses", refused)
        out.check(f"corrupt {what}: the refusal names the file", str(db) in said)
        out.check(f"corrupt {what}: the file is left as it was",
                  hashlib.sha256(db.read_bytes()).hexdigest() == digest)
        if str(db) not in said:
            out.detail = f"corrupt {what} said: {said[-300:]}"
    db.write_bytes(original)


def _overwritten(data: bytes, offset: int) -> bytes:
    """``data`` with 100 random octets at ``offset``."""
    broken = bytearray(data)
    broken[offset:offset + 100] = os.urandom(100)
    return bytes(broken)


def _refuses(server: ServeProcess) -> tuple[bool, str]:
    """Run ``serve``; whether it exited non-zero within 60 s, and what it printed."""
    try:
        done = server.cli("serve", timeout=60)
    except subprocess.TimeoutExpired as exc:
        return False, str(exc.output or "")
    return done.returncode != 0, done.stdout + done.stderr


# -- after ---------------------------------------------------------------------------------------

def _tickets(server: ServeProcess) -> tuple[list[bytes], list[bytes]]:
    """Twenty tickets issued, and ten more issued and consumed, before any fault."""
    def issue(n: int) -> bytes:
        return bytes(server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=_state(n)), timeout=5).ticket)

    before = [issue(n) for n in range(20)]
    consumed = [issue(100 + n) for n in range(10)]
    for ticket in consumed:
        server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=ticket, consume=True), timeout=5)
    return before, consumed


def _still_answers(out: Outcome, server: ServeProcess, before: list[bytes],
                   consumed: list[bytes]) -> None:
    """After every fault: the tickets from before redeem OK, the consumed ones REPLAYED."""
    def redeem(ticket: bytes, consume: bool) -> int:
        return int(server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=ticket, consume=consume), timeout=5).result)

    out.check("tickets issued before the faults redeem OK after them",
              all(redeem(t, False) == OK for t in before))
    out.check("tickets consumed before the faults are still REPLAYED",
              all(redeem(t, True) == REPLAYED for t in consumed))


# -- the file system -----------------------------------------------------------------------------

@contextlib.contextmanager
def _file_system(where: Path) -> Iterator[tuple[Path, bool]]:
    """A ``FS_SIZE`` tmpfs mounted at ``where`` (created) if this process may mount, else the
    plain directory; yields (it, mounted). Unmounted afterwards."""
    where.mkdir(parents=True)
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(where)],
        capture_output=True, check=False).returncode == 0
    try:
        yield where, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _remount(fs: Path, mode: str) -> None:
    """Remount the tmpfs at ``fs`` ``ro`` or ``rw``. Raises: CalledProcessError."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(fs)], capture_output=True,
                   check=True)


def _log_size(server: ServeProcess) -> int:
    try:
        return server.log.stat().st_size
    except OSError:
        return 0


def _log_since(server: ServeProcess, offset: int) -> str:
    with server.log.open("rb") as log:
        log.seek(offset)
        return log.read().decode("utf-8", "replace")


def _state(n: int) -> authority_pb2.ResumptionState:
    from authority.bench.workload import proto_state

    return proto_state(40_000 + n)
