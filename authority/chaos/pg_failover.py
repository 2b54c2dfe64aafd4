"""Scenario 5, PostgreSQL primary failover: replicas on a primary with a streaming standby
(authority/chaos/pgpair.py), reached through libpq's multi-host DSN
(``target_session_attrs=read-write``). Under load, the primary's WAL sender is paused (a
network stall between the two servers) for ``STALL`` seconds; right after consumes were
acknowledged the primary is SIGKILLed (postmaster and every process), the standby promoted, and
the replicas reconnect by themselves.

Run twice, the same injection each time:

- synchronous replication (``synchronous_standby_names``): what the row judges. Consumes sent
  during the stall wait for the standby and fail UNAVAILABLE with the kill (never
  acknowledged); 0 acknowledged consumes lost, 0 replays accepted; recovery = from the kill to
  the first acknowledged consume after it (promotion included).
- asynchronous replication: the primary acknowledges consumes the standby never received;
  how many of them answer OK again after the failover (lost) is a figure, in the row's
  injected text and ``async_lost``, not judged: it is why synchronous replication is required.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.bench.serveproc import ServeProcess, wait_for
from authority.chaos.core import Outcome
from authority.chaos.load import OK, Load, lost_consumes
from authority.chaos.pgpair import PgPair
from authority.chaos.replicas import replicas
from authority.chaos.servers import time_until

NAME = "pg-failover"
_SERIAL = itertools.count(70_000)   # the probes' tickets
SETTLE = 0.3           # seconds after the pause before the stall's consumes are counted
STALL = 0.5            # seconds the WAL sender is paused before the kill
RECOVERY_BOUND = 10.0  # seconds from the kill to a consume acknowledged on every replica


@dataclass
class Run:
    """One failover's figures."""

    calls: int = 0
    wrong: list[str] = field(default_factory=list)
    acknowledged: int = 0          # consumes acknowledged in the whole run
    in_stall: int = 0              # ... while the WAL sender was paused
    lost: int = 0
    recovery_s: float | None = None
    promote_s: float = 0.0
    checks: list[tuple[str, bool]] = field(default_factory=list)


def run(work: Path, quick: bool) -> Outcome:
    """Raises: StartupError (PostgreSQL), AssertionError (a replica did not start),
    grpc.RpcError (the replicas never came back)."""
    rounds = 1 if quick else 3
    sync = [_failover(work / f"sync{i}", True, quick) for i in range(rounds)]
    unsync = [_failover(work / f"async{i}", False, quick) for i in range(rounds)]
    lost_async = sum(r.lost for r in unsync)
    acked_async = sum(r.in_stall for r in unsync)
    out = Outcome(NAME, f"primary SIGKILLed, sync standby promoted (async: {lost_async} "
                        f"acked consumes lost, {acked_async} acked in the stall)")
    out.calls = sum(r.calls for r in sync + unsync)
    out.wrong = sum(len(r.wrong) for r in sync)
    out.lost = sum(r.lost for r in sync)
    times = [r.recovery_s for r in sync]
    out.recovery_s = None if None in times else max(t for t in times if t is not None)
    for i, one in enumerate(sync):
        for what, ok in one.checks:
            out.check(f"sync run {i + 1}: {what}", ok)
    for i, one in enumerate(unsync):
        for what, ok in one.checks:   # the async run must still fail over and be measured
            out.check(f"async run {i + 1}: {what}", ok)
        out.check(f"async run {i + 1}: no wrong answer but the lost consumes "
                  f"({'; '.join(one.wrong[:2])})", not one.wrong)
    out.detail = "; ".join(w for r in sync for w in r.wrong[:3])
    out.figures.update({
        "sync_acknowledged": sum(r.acknowledged for r in sync),
        "sync_acknowledged_in_stall": sum(r.in_stall for r in sync),
        "async_acknowledged": sum(r.acknowledged for r in unsync),
        "async_acknowledged_in_stall": acked_async, "async_lost": lost_async,
        "async_recovery_s": max((r.recovery_s or 0.0) for r in unsync),
        "promote_s": max(r.promote_s for r in sync + unsync), "stall_s": STALL})
    return out


def _failover(work: Path, synchronous: bool, quick: bool) -> Run:
    """One pair, replicas on it, the stall, the kill, the promotion. Raises: as ``run``."""
    work.mkdir()
    result = Run()
    names = ("a", "b") if quick else ("a", "b", "c")
    with PgPair.started(synchronous) as pair, replicas(work, pair.dsn, names) as servers:
        mode = ("streaming", "sync" if synchronous else "async")
        streaming = time_until(lambda: (pair.replication() or ("",))[:2] == mode, 30.0)
        result.checks.append((f"the standby streamed {mode[1]}hronously",
                              streaming is not None))
        load = Load([lambda s=s: s.tickets for s in servers],  # type: ignore[misc]
                    max_seconds=60.0)
        with load:
            wait_for("consumes before the stall", lambda: len(load.tally.consumed) >= 30, 30.0)
            sender = pair.replication()
            assert sender is not None
            pair.pause_sender(sender[2])
            time.sleep(SETTLE)        # answers to commits the standby confirmed before the
            before = len(load.tally.consumed)  # pause may still be on their way: not the stall's
            time.sleep(STALL)
            result.in_stall = len(load.tally.consumed) - before
            if synchronous:
                result.checks.append(("no consume acknowledged while the standby received "
                                      "nothing", result.in_stall == 0))
            killed = time.monotonic()
            pair.fail_over()
            result.promote_s = time.monotonic() - killed
            result.recovery_s = _recovered(servers, killed)
            back = time_until(lambda: all(_consumes(s) for s in servers), RECOVERY_BOUND)
            time.sleep(1.0)
        tally = load.tally
        result.calls, result.wrong = tally.calls, list(tally.wrong)
        result.acknowledged = len(tally.consumed)
        result.checks.append((f"every replica consumes again within {RECOVERY_BOUND} s of "
                              "the kill", back is not None))
        result.checks.append(("the killed primary accepts no write",
                              not pair.writable(pair.primary)))
        result.checks.append(("the promoted standby accepts writes",
                              pair.writable(pair.standby)))
        result.lost = lost_consumes(tally, servers[-1].tickets)
    return result


def _recovered(servers: list[ServeProcess], killed: float) -> float | None:
    """Seconds from ``killed`` to the first consume acknowledged on any replica (polled),
    None if none within ``RECOVERY_BOUND``."""
    took = time_until(lambda: any(_consumes(s) for s in servers), RECOVERY_BOUND, poll=0.01)
    return None if took is None else time.monotonic() - killed


def _consumes(server: ServeProcess) -> bool:
    """Whether a ticket issued on ``server`` now consumes OK there (1 s per call)."""
    from authority.bench.workload import proto_state

    try:
        issued = server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=proto_state(next(_SERIAL))), timeout=1.0)
        reply = server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=issued.ticket, consume=True), timeout=1.0)
    except grpc.RpcError:
        return False
    return bool(reply.result == OK)
