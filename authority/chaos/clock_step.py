"""Scenario 7, clock step: two replicas (one SoftHSM2 token, one PostgreSQL) under load; the
system clock of replica B jumps forward by minutes, then back by twice that, then returns (through
the service's clock seam, ``TICKET_AUTHORITY_TEST_CLOCK_OFFSET_FILE``: the host's clock is left
alone). Tickets with a short lifetime, issued on A and on B before and during each step, are
redeemed on both replicas around their expiry.

Expected: no ticket answers EXPIRED earlier, nor OK later, than its expiry (its issue time by
the scenario's clock plus its lifetime) by more than the documented bound: 1 s (tickets carry
whole seconds) plus the replicas' clock offset (0 here: one host) plus the polling's resolution;
no wrong answer under the load.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.bench.serveproc import ServeProcess
from authority.chaos.core import Outcome
from authority.chaos.load import Load
from authority.chaos.replicas import settings

NAME = "clock-step"
STEP = 300.0             # seconds the clock jumps
BOUND = 1.0              # documented: whole seconds in the ticket (+ the replicas' offset: 0)
SLACK = 0.3              # the polling's resolution and a call's latency
POLL = 0.1
EXPIRED = authority_pb2.REDEEM_RESULT_EXPIRED
OK = authority_pb2.REDEEM_RESULT_OK


@dataclass
class Edge:
    """A ticket whose expiry the scenario watches: where it was issued, when (the scenario's
    clock), its lifetime, and when each replica first answered EXPIRED / last answered OK."""

    label: str
    ticket: bytes
    issued: float
    lifetime: int
    first_expired: dict[str, float]
    last_ok: dict[str, float]

    @property
    def expiry(self) -> float:
        return self.issued + self.lifetime


def run(work: Path, quick: bool) -> Outcome:
    """Raises: StartupError (PostgreSQL), AssertionError (a replica did not start)."""
    from authority import devdb
    from authority.backends.softhsm import provision_embedded_token

    out = Outcome(NAME, f"replica B's clock +{STEP:.0f} s, then -{2 * STEP:.0f} s, then back")
    lifetime = 6 if quick else 20
    with devdb.DevPostgres.launch() as database:
        dsn_file = work / "dsn"
        dsn_file.write_text(database.dsn(database.create_database()))
        dsn_file.chmod(0o600)
        token = provision_embedded_token(work / "hsm")
        offset = work / "clock-offset"
        offset.write_text("0")
        a, b = (ServeProcess(work, n, settings(work / n, token, dsn_file)) for n in ("a", "b"))
        b.env = {"TICKET_AUTHORITY_TEST_CLOCK_OFFSET_FILE": str(offset)}
        try:
            a.serve()
            b.serve()
            _scenario(out, a, b, offset, lifetime)
        finally:
            b.stop()
            a.stop()
    return out


def _scenario(out: Outcome, a: ServeProcess, b: ServeProcess, offset: Path,
              lifetime: int) -> None:
    replicas = {"a": a, "b": b}
    edges: list[Edge] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(edges, replicas, stop), daemon=True)
    with Load([lambda: a.tickets, lambda: b.tickets], max_seconds=6 * lifetime + 30) as load:
        watcher.start()
        for step in (0.0, STEP, -STEP, 0.0):
            offset.write_text(str(step))
            time.sleep(0.5)        # the seam is read every 50 ms; let both replicas see it
            for name, server in replicas.items():
                edges.append(_issue(f"on {name}, B's clock {step:+.0f} s", server, lifetime))
            time.sleep(lifetime / 2)
        deadline = max(e.expiry for e in edges) + BOUND + 2 * SLACK
        while time.time() < deadline:
            time.sleep(POLL)
        stop.set()
        watcher.join(timeout=30)
    tally = load.tally
    out.calls, out.wrong = tally.calls, len(tally.wrong)
    out.detail = "; ".join(tally.wrong[:3])
    _judge(out, edges)


def _issue(label: str, server: ServeProcess, lifetime: int) -> Edge:
    from authority.bench.workload import proto_state

    issued = time.time()
    reply = server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
        state=proto_state(7), lifetime_seconds=lifetime), timeout=5)
    return Edge(label, bytes(reply.ticket), issued, lifetime, {}, {})


def _watch(edges: list[Edge], replicas: dict[str, ServeProcess], stop: threading.Event) -> None:
    """Redeem every watched ticket on every replica each POLL seconds near its expiry."""
    while not stop.is_set():
        for edge in list(edges):
            if abs(time.time() - edge.expiry) > BOUND + 3 * SLACK + 1:
                continue
            for name, server in replicas.items():
                _look(edge, name, server)
        stop.wait(POLL)


def _look(edge: Edge, name: str, server: ServeProcess) -> None:
    try:
        result = server.tickets.RedeemTicket(
            authority_pb2.RedeemTicketRequest(ticket=edge.ticket), timeout=2).result
    except grpc.RpcError:
        return
    now = time.time()
    if result == EXPIRED:
        edge.first_expired.setdefault(name, now)
    elif result == OK:
        edge.last_ok[name] = now


def _judge(out: Outcome, edges: list[Edge]) -> None:
    """Each edge on each replica: first EXPIRED no earlier than expiry - BOUND - SLACK, last OK
    no later than expiry + SLACK (a ticket never outlives its expiry by more than the
    polling), both seen."""
    worst_early = worst_late = 0.0
    for edge in edges:
        for name in ("a", "b"):
            expired = edge.first_expired.get(name)
            ok = edge.last_ok.get(name)
            seen = expired is not None and ok is not None
            out.check(f"ticket issued {edge.label} seen OK then EXPIRED on {name}", seen)
            if expired is None or ok is None:
                continue
            early, late = edge.expiry - expired, ok - edge.expiry
            worst_early, worst_late = max(worst_early, early), max(worst_late, late)
            out.check(f"ticket issued {edge.label}, redeemed on {name}: EXPIRED {early:.2f} s "
                      f"before its expiry (bound {BOUND + SLACK:.1f})", early <= BOUND + SLACK)
            out.check(f"ticket issued {edge.label}, redeemed on {name}: OK {late:.2f} s after "
                      f"its expiry (bound {SLACK:.1f})", late <= SLACK)
    out.figures.update({"worst_early_expiry_s": round(worst_early, 3),
                        "worst_late_ok_s": round(worst_late, 3), "step_s": STEP})
