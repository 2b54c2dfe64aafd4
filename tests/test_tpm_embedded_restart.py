"""The embedded swtpm is supervised (issue 16, brief 16D): when it exits, the process that owns
it starts it again on its state, at once, then with a growing delay while it keeps dying; health
stays NOT_SERVING meanwhile; nothing is left running, unreaped or open. Real swtpm, real
``ticket-authority serve`` over real gRPC. (The kill -9 under load, with and without a device
process, is chaos scenario device-tpm-embedded: tests/test_chaos_device_tpm.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.bench.serveproc import ServeProcess, wait_for
from authority.bench.workload import proto_state
from authority.chaos.servers import SERVING, health, round_trip, single, time_until
from tests.tpm_fixtures import HAVE_PYTSS, HAVE_SWTPM, requires_tpm

if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.tpm import SwtpmProcess
    from authority.backends.tpm.swtpm import PID_FILE
    from authority.chaos.device_tpm import tpm_facts

pytestmark = requires_tpm

PERMALL = "tpm2-00.permall"     # the swtpm's TPM state: zeroed, it exits at once at start
FAILED = "starting it again failed"
RESTARTED = "started again on its state"


def _pid(state: Path) -> int:
    return int((state / PID_FILE).read_text("ascii").strip())


def _redeem_is_unavailable(server: ServeProcess, ticket: bytes) -> bool:
    """Redeem ``ticket``; True when UNAVAILABLE. Raises: AssertionError for any other answer
    (a valid ticket must never be INVALID, nor OK without a TPM)."""
    try:
        reply = server.tickets.RedeemTicket(
            authority_pb2.RedeemTicketRequest(ticket=ticket), timeout=5)
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
        return True
    raise AssertionError(f"redeemed {authority_pb2.RedeemResult.Name(reply.result)} without "
                         "a TPM")


def _times(log: Path, marker: str) -> list[float]:
    """Timestamps (seconds) of the server log's lines containing ``marker``."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            found.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return found


def test_a_swtpm_that_keeps_dying_is_restarted_with_a_growing_delay_while_not_serving(
        tmp_path: Path) -> None:
    """The embedded swtpm's state zeroed, then the swtpm killed -9: every restart exits at once.
    Restarts come at once, then 0.05 s, 0.1 s, ... apart (a handful in 4 s, not a busy loop);
    calls are UNAVAILABLE and health NOT_SERVING throughout; with the state put back, the next
    restart serves again and tickets from before redeem. Before: no restart at all (0 attempts
    logged, never served again)."""
    server = single(tmp_path, "a", backend="tpm")
    state = tmp_path / "a" / "tpm" / "swtpm"
    try:
        ticket = server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=proto_state(1)), timeout=5).ticket
        good = (state / PERMALL).read_bytes()
        (state / PERMALL).write_bytes(bytes(len(good)))
        os.kill(_pid(state), signal.SIGKILL)
        assert time_until(lambda: _redeem_is_unavailable(server, ticket)
                          and health(server) not in (SERVING, None), 5.0) is not None
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            assert _redeem_is_unavailable(server, ticket)
            assert health(server) not in (SERVING, None)
            time.sleep(0.1)
        failed = _times(server.log, FAILED)
        gaps = [later - earlier for earlier, later in pairwise(failed)]
        print(f"restart attempts {len(failed)}, gaps {[round(g, 3) for g in gaps]}")
        assert 4 <= len(failed) <= 10, failed
        assert all(later >= earlier for earlier, later in pairwise(gaps)), gaps
        (state / PERMALL).write_bytes(good)
        back = time_until(lambda: round_trip(server) and health(server) == SERVING, 10.0)
        print(f"back {back} s after the state was put back")
        assert back is not None, server.log_tail()
        assert server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=ticket), timeout=5).result == authority_pb2.REDEEM_RESULT_OK
        assert len(_times(server.log, RESTARTED)) == 1
    finally:
        server.stop()
    assert not (state / PID_FILE).exists(), "the server left its swtpm running"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _supervisors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("swtpm-supervisor")]


def test_kills_leave_no_zombie_no_open_file_and_no_lockout(tmp_path: Path) -> None:
    """Four kill -9 in a row of a supervised swtpm: each time a new one answers on the same
    state; every killed process is reaped (no zombie), no file stays open, the TPM's lockout
    counter stays where it was; stop() ends the supervision and the last swtpm."""
    state = tmp_path / "swtpm"
    lockout = _facts(state)["lockout_counter"]
    fds = _open_fds()
    swtpm = SwtpmProcess.start(state, supervised=True)
    killed: list[int] = []
    try:
        for _ in range(4):
            killed.append(swtpm.pid)
            os.kill(killed[-1], signal.SIGKILL)
            wait_for("a new swtpm", lambda: swtpm.pid not in killed and swtpm.running, 5.0)
    finally:
        swtpm.stop()
    assert not _supervisors()
    assert [pid for pid in [*killed, swtpm.pid] if Path(f"/proc/{pid}").exists()] == []
    assert _open_fds() == fds
    facts = _facts(state)
    assert not facts["in_lockout"] and facts["lockout_counter"] <= lockout, facts


def test_stop_during_a_restart_delay_ends_supervision_and_starts_nothing(
        tmp_path: Path) -> None:
    """A swtpm in a crash loop (its state zeroed) is stopped while the supervisor waits to
    start it again: stop() does not wait the delay out, the supervisor ends, and no swtpm is
    started on the state afterwards."""
    state = tmp_path / "swtpm"
    swtpm = SwtpmProcess.start(state, supervised=True)
    try:
        good = (state / PERMALL).read_bytes()
        (state / PERMALL).write_bytes(bytes(len(good)))
        swtpm.kill()
        time.sleep(1.0)   # restarts at 0, 0.05, 0.15, 0.35, 0.75 s; the next at 1.55 s
        (state / PERMALL).write_bytes(good)
    finally:
        started = time.monotonic()
        swtpm.stop()
        took = time.monotonic() - started
    print(f"stop took {took:.3f} s")
    assert not _supervisors()
    time.sleep(0.5)
    assert not (state / PID_FILE).exists(), "a swtpm was started after stop()"


def _facts(state: Path) -> dict[str, int]:
    """tpm_facts of the state in ``state``, read with an unsupervised swtpm of our own."""
    swtpm = SwtpmProcess.start(state)
    try:
        return tpm_facts(swtpm.tcti)
    finally:
        swtpm.stop()


@pytest.mark.parametrize("returncode, said", [(-9, "signal 9"), (1, "status 1")])
def test_how_an_exit_is_described(returncode: int, said: str) -> None:
    from authority.backends.tpm.swtpm import _exit_description

    assert _exit_description(returncode) == said
