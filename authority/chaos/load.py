"""Bounded load for the chaos scenarios, and the bookkeeping that says what was wrong.

A ``Load`` runs in a thread against one or more servers: it issues a ticket on one, redeems
it on the next, and consumes every third ticket (then redeems it again with consume, which must
be REPLAYED). It stops by itself after ``max_calls`` calls or ``max_seconds``.

What counts as **wrong** (must stay 0 whatever is injected): a valid, unexpired ticket that
redeems INVALID, REVOKED or EXPIRED; an unconsumed one that answers REPLAYED; a consumed one
(consume acknowledged) that redeems with consume OK again; any status other than OK,
UNAVAILABLE, DEADLINE_EXCEEDED or (the rate limiter) RESOURCE_EXHAUSTED; INTERNAL or UNKNOWN
above all. Failing calls (UNAVAILABLE, DEADLINE_EXCEEDED) are counted, never wrong: a fault may
stop service, never falsify it. **Lost acknowledged consumes**: tickets whose consume was
acknowledged OK that, after recovery, consume OK again (:meth:`Load.lost_consumes`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc

OK = authority_pb2.REDEEM_RESULT_OK
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED
FAILING = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
CALL = 5.0


@dataclass
class Tally:
    """What a load saw."""

    calls: int = 0
    ok: int = 0
    failing: int = 0
    failing_codes: dict[str, int] = field(default_factory=dict)   # failing calls by status
    wrong: list[str] = field(default_factory=list)
    consumed: list[bytes] = field(default_factory=list)   # acknowledged consumes
    failing_since: float | None = None   # monotonic time of the first failure of a run
    last_failure: float | None = None    # monotonic time of the last failing call
    first_ok_after: list[float] = field(default_factory=list)  # recoveries: failure -> OK


def _state(n: int) -> Any:
    from authority.bench.workload import proto_state

    return proto_state(n)


class Load:
    """Mixed bounded load in a thread. ``stubs``: callables returning a TicketAuthority stub
    for each server (called per call, so a restarted server's new address is used)."""

    def __init__(self, stubs: Sequence[Callable[[], authority_pb2_grpc.TicketAuthorityStub]],
                 max_calls: int = 20_000, max_seconds: float = 60.0,
                 consume_every: int = 3, pause: float = 0.0) -> None:
        self._stubs = list(stubs)
        self._max_calls = max_calls
        self._max_seconds = max_seconds
        self._consume_every = consume_every
        self._pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self._lock = threading.Lock()
        self.tally = Tally()

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Tally:
        """Stop (waits for the call in flight) and return the tally."""
        self._stop.set()
        self._thread.join(timeout=2 * CALL + 5)
        return self.tally

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline \
                and self.tally.calls < self._max_calls:
            n += 1
            self._one(n)
            if self._pause:
                self._stop.wait(self._pause)

    def _one(self, n: int) -> None:
        servers = len(self._stubs)
        issued = self._call(lambda: self._stubs[n % servers]().IssueTicket(
            authority_pb2.IssueTicketRequest(state=_state(n)), timeout=CALL))
        if issued is None:
            return
        consume = n % self._consume_every == 0
        reply = self._call(lambda: self._stubs[(n + 1) % servers]().RedeemTicket(
            authority_pb2.RedeemTicketRequest(ticket=issued.ticket, consume=consume),
            timeout=CALL))
        if reply is None:
            return
        if reply.result != OK:
            self._wrong(f"a fresh ticket redeemed {authority_pb2.RedeemResult.Name(reply.result)}"
                        f"{' with consume' if consume else ''}")
            return
        if consume:
            with self._lock:
                self.tally.consumed.append(bytes(issued.ticket))
            again = self._call(lambda: self._stubs[(n + 2) % servers]().RedeemTicket(
                authority_pb2.RedeemTicketRequest(ticket=issued.ticket, consume=True),
                timeout=CALL))
            if again is not None and again.result != REPLAYED:
                self._wrong("an acknowledged consume was accepted again: "
                            f"{authority_pb2.RedeemResult.Name(again.result)}")

    def _call(self, call: Callable[[], Any]) -> Any:
        """One RPC, counted; None when it failed (failing or wrong)."""
        with self._lock:
            self.tally.calls += 1
        try:
            reply = call()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in FAILING:
                self._failed(code.name)
            else:
                self._wrong(f"{code.name}: {exc.details()}")
            return None
        self._succeeded()
        return reply

    def _failed(self, code: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.tally.failing += 1
            self.tally.failing_codes[code] = self.tally.failing_codes.get(code, 0) + 1
            self.tally.last_failure = now
            if self.tally.failing_since is None:
                self.tally.failing_since = now

    def _succeeded(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.tally.ok += 1
            if self.tally.failing_since is not None:
                self.tally.first_ok_after.append(now - self.tally.failing_since)
                self.tally.failing_since = None

    def _wrong(self, what: str) -> None:
        with self._lock:
            self.tally.wrong.append(what)


def lost_consumes(tally: Tally, stub: authority_pb2_grpc.TicketAuthorityStub,
                  attempts: int = 20) -> int:
    """How many acknowledged consumes were lost: each consumed ticket is consumed again and
    must be REPLAYED (an expired one would be EXPIRED: the scenarios keep tickets alive).
    UNAVAILABLE is retried up to ``attempts`` times, 0.25 s apart.

    Raises: grpc.RpcError when a call keeps failing (the server did not recover)."""
    lost = 0
    for ticket in tally.consumed:
        for attempt in range(attempts):
            try:
                reply = stub.RedeemTicket(authority_pb2.RedeemTicketRequest(
                    ticket=ticket, consume=True), timeout=CALL)
                break
            except grpc.RpcError as exc:
                if exc.code() not in FAILING or attempt == attempts - 1:
                    raise
                time.sleep(0.25)
        lost += reply.result != REPLAYED
    return lost
