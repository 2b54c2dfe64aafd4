"""Scenario: a rolling restart. Three replicas on one SoftHSM2 token and a devdb PostgreSQL
(authority/chaos/replicas.py) under load from several threads (each issues on one replica,
redeems on the next, consumes every third ticket and consumes it again on the third: calls in
flight and arriving at every replica all the time); the replicas are SIGTERMed and started
again one after another, each only once the previous one serves again, each several times.

Expected: every call answers OK or UNAVAILABLE -- a replica that stops gracefully drains
(authority/service/interceptors.py ``Drain``): calls in flight complete, calls arriving are
UNAVAILABLE, never the gRPC core's CANCELLED (grpc/grpc#41785) -- 0 wrong answers, 0
acknowledged consumes lost (each consumed again afterwards must be REPLAYED), each replica
exits 0 within ``server.grace_seconds`` plus a margin and serves again.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2_grpc
from authority.bench.serveproc import ServeProcess
from authority.chaos.core import Outcome
from authority.chaos.load import Load, Tally, lost_consumes
from authority.chaos.replicas import replicas
from authority.chaos.servers import SERVING, health, time_until

NAME = "rolling-restart"
LOADS = 3              # load threads
GRACE = 5.0            # server.grace_seconds (the default)
STOP_BOUND = GRACE + 5.0   # seconds from SIGTERM to exit at most
SERVE_BOUND = 30.0     # seconds from the new start to SERVING at most
SETTLE = 0.5           # seconds of load before the first and after the last restart
DRAINED = re.compile(r"drained for ([\d.]+) s: (\d+) new calls answered UNAVAILABLE")


class Channels:
    """One channel per address a replica listened on, kept open until the scenario ends (a
    channel closed under a call in flight fails it CANCELLED on the client's side: the load
    must not). Stubs resolve the replica's current address at each call."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, server: ServeProcess) -> authority_pb2_grpc.TicketAuthorityStub:
        """A stub on ``server``'s current address. Never raises."""
        channel = self._channels.get(server.address)
        if channel is None:
            channel = self._channels[server.address] = grpc.insecure_channel(server.address)
        return authority_pb2_grpc.TicketAuthorityStub(channel)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def run(work: Path, quick: bool) -> Outcome:
    """Raises: StartupError (PostgreSQL), AssertionError (a replica did not start),
    grpc.RpcError (the consumes could not be checked)."""
    from authority.devdb import DevPostgres

    out = Outcome(NAME, "replicas SIGTERMed one after another")
    rounds = 2 if quick else 5
    channels = Channels()
    with DevPostgres.launch(prefix="ta-pgr-") as db:
        dsn = db.dsn(db.create_database())
        with replicas(work, dsn) as servers:
            try:
                stubs = [lambda s=s: channels.stub(s) for s in servers]
                loads = [Load(stubs, max_calls=1_000_000, max_seconds=60.0 if quick else 300.0)
                         for _ in range(LOADS)]
                for load in loads:
                    load.start()
                time.sleep(SETTLE)
                times = [_restart(out, server) for _ in range(rounds) for server in servers]
                time.sleep(SETTLE)
                tallies = [load.stop() for load in loads]
                _judge(out, tallies, times, servers, rounds)
                out.lost = sum(lost_consumes(tally, servers[0].tickets) for tally in tallies)
            finally:
                channels.close()
    return out


def _restart(out: Outcome, server: ServeProcess) -> tuple[float, float]:
    """SIGTERM ``server``, wait for its exit, start it again, wait until SERVING; returns
    (seconds to exit, seconds from SIGTERM to SERVING). Raises: AssertionError (it did not
    start again)."""
    assert server.proc is not None
    start = time.monotonic()
    server.signal(signal.SIGTERM)
    try:
        status: int | None = server.proc.wait(timeout=STOP_BOUND)
    except subprocess.TimeoutExpired:
        server.kill()
        status = None
    stopped = time.monotonic() - start
    out.check(f"{server.name} exited 0 within {STOP_BOUND:.0f} s of SIGTERM "
              f"(status {status}, {stopped:.2f} s)", status == 0 and stopped < STOP_BOUND)
    server.serve()
    serving = time_until(lambda: health(server) == SERVING, SERVE_BOUND)
    out.check(f"{server.name} SERVING again within {SERVE_BOUND:.0f} s", serving is not None)
    return stopped, time.monotonic() - start


def _judge(out: Outcome, tallies: list[Tally], times: list[tuple[float, float]],
           servers: list[ServeProcess], rounds: int) -> None:
    """The counts, the checks on the answers and the drains, the figures."""
    out.calls = sum(t.calls for t in tallies)
    wrong = [w for t in tallies for w in t.wrong]
    out.wrong = len(wrong)
    out.detail = "; ".join(wrong[:3])
    codes: dict[str, int] = {}
    for tally in tallies:
        for code, count in tally.failing_codes.items():
            codes[code] = codes.get(code, 0) + count
    out.check(f"every failing call answered UNAVAILABLE (failing: {codes})",
              set(codes) <= {"UNAVAILABLE"})
    drains = [m for s in servers for m in DRAINED.finditer(s.log.read_text(errors="replace"))]
    out.check(f"every SIGTERM drained first ({len(drains)} drains in the logs for "
              f"{len(times)} SIGTERMs)", len(drains) == len(times))
    out.check("calls answered OK between the restarts", sum(t.ok for t in tallies) > 0)
    out.recovery_s = max(serving for _, serving in times)
    out.figures.update({
        "restarts": len(times), "rounds": rounds, "loads": LOADS,
        "ok_calls": sum(t.ok for t in tallies), "unavailable_calls": codes.get("UNAVAILABLE", 0),
        "refused_in_drains": sum(int(m.group(2)) for m in drains),
        "longest_drain_s": max((float(m.group(1)) for m in drains), default=0.0),
        "longest_exit_s": round(max(stopped for stopped, _ in times), 2),
        "acknowledged_consumes": sum(len(t.consumed) for t in tallies)})
