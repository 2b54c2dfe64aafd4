"""Coalescing in the gateway-side clients (authority/client/coalesce.py) against real servers:
the conftest Harness (real SoftHSM2 token) and, where the timing must be certain, the same real
servicer behind a thread-pool gRPC server that holds each call for a while (``Paced``). RPCs are
counted with real client interceptors, batch sizes by the paced servicer."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2_grpc
from authority.bench import gateway
from authority.client import (
    AsyncTicketClient,
    AuthorityDeadlineExceeded,
    AuthorityRejected,
    AuthorityUnavailable,
    Backoff,
    IssuedTicket,
    Redeemed,
    RedeemResult,
    TicketClient,
    coalesce,
)
from authority.config import Config
from authority.metrics import Metrics
from authority.service.admission import Gate, Limits
from authority.service.guard import ThreadGuard
from authority.service.ratelimit import TokenBuckets
from authority.service.servicers import TicketAuthorityServicer
from tests.conftest import Harness, at_once, sample_state
from tests.test_client import AsyncCounting, Counting, free_port, run

FAST = Backoff(base=0.01, cap=0.02)
WIDE = 0.5   # a window long enough that timing never decides a test


class Paced(TicketAuthorityServicer):
    """The real servicer, each ticket call held ``delay`` seconds first; records the size of
    every batch it serves."""

    def __init__(self, authority: Any, delay: float) -> None:
        super().__init__(authority)
        self.delay = delay
        self.batches: list[int] = []
        self.arrived: list[float] = []   # when each batch came (time.monotonic)

    def _hold(self) -> None:
        threading.Event().wait(self.delay)

    def IssueTicket(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._hold()
        return super().IssueTicket(request, context)

    def RedeemTicket(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._hold()
        return super().RedeemTicket(request, context)

    def IssueTickets(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.batches.append(len(request.items))
        self.arrived.append(time.monotonic())
        self._hold()
        return super().IssueTickets(request, context)

    def RedeemTickets(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.batches.append(len(request.items))
        self.arrived.append(time.monotonic())
        self._hold()
        return super().RedeemTickets(request, context)

    def ConsumeTicket(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._hold()
        return super().ConsumeTicket(request, context)

    def ConsumeTickets(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.batches.append(len(request.items))
        self.arrived.append(time.monotonic())
        self._hold()
        return super().ConsumeTickets(request, context)


class WithoutConsumeTickets(Paced):
    """A server of a release before ConsumeTickets: that method is UNIMPLEMENTED."""

    ConsumeTickets = authority_pb2_grpc.TicketAuthorityServicer.ConsumeTickets


PacedServer = Callable[..., tuple[Paced, str]]


def serve_paced(authority: Any, delay: float, buckets: TokenBuckets | None = None,
                kind: type[Paced] = Paced) -> tuple[Paced, grpc.Server, str]:
    """A started thread-pool server for ``kind(authority, delay)``, with a token-bucket rate
    limit when ``buckets`` is given."""
    servicer = kind(authority, delay)
    gate = Gate(Metrics(), Limits.of(Config(state_dir=Path(".")), threads=True),
                buckets=buckets)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         interceptors=[ThreadGuard(gate)], options=[("grpc.so_reuseport", 0)])
    authority_pb2_grpc.add_TicketAuthorityServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return servicer, server, f"127.0.0.1:{port}"


@pytest.fixture
def paced(pkcs11_harness: Harness) -> Iterator[PacedServer]:
    """``serve_paced`` on the harness's authority; stopped at teardown."""
    servers: list[grpc.Server] = []

    def start(delay: float, buckets: TokenBuckets | None = None,
              kind: type[Paced] = Paced) -> tuple[Paced, str]:
        servicer, server, where = serve_paced(pkcs11_harness.authority, delay, buckets, kind)
        servers.append(server)
        return servicer, where

    yield start
    for server in servers:
        server.stop(None)


def address(harness: Harness) -> str:
    assert harness.running is not None
    return harness.running.address


def tickets(harness: Harness, count: int, realm: str = "", per_batch: int = 1000) -> list[bytes]:
    with TicketClient(address(harness), coalesce_window=0, max_batch_items=per_batch) as client:
        issued = client.issue_many([sample_state(n) for n in range(count)], realm=realm)
    return [i.ticket for i in issued if isinstance(i, IssuedTicket)]


def tampered(ticket: bytes) -> bytes:
    return ticket[:-1] + bytes([ticket[-1] ^ 1])


def in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """``at_once``, each call's exception returned in place of its result."""
    def catching(call: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            try:
                return call()
            except Exception as exc:   # the test looks at it
                return exc
        return wrapped

    return at_once([catching(c) for c in calls])


# -- each caller gets its own answer -------------------------------------------------------------


def _is_session(n: int, result: Any) -> bool:
    return bool(result.ok and result.state.gateway_data == f"session={n}".encode())


def _is_issued(lifetime: int, result: Any) -> bool:
    return isinstance(result, IssuedTicket) and result.lifetime == lifetime


def _mixed_calls(client: Any, good: list[bytes], east: bytes
                 ) -> tuple[list[Callable[[], Any]], list[Callable[[Any], bool]]]:
    """Calls of every kind, each with the check of what that caller alone should get."""
    calls: list[Callable[[], Any]] = []
    checks: list[Callable[[Any], bool]] = []

    def add(call: Callable[[], Any], check: Callable[[Any], bool]) -> None:
        calls.append(call)
        checks.append(check)

    for n, ticket in enumerate(good):
        add(partial(client.redeem, ticket), partial(_is_session, n))
        add(partial(client.redeem, tampered(ticket)), lambda r: r.result is RedeemResult.INVALID)
    add(lambda: client.redeem(b""), lambda e: isinstance(e, AuthorityRejected)
        and e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details.startswith("ticket:"))
    add(lambda: client.redeem(east, realm="east"), lambda r: r.ok and r.realm == "east")
    add(lambda: client.redeem(east), lambda r: r.result is RedeemResult.INVALID)
    for n in range(6):
        add(partial(client.issue, sample_state(100 + n), lifetime=60 + n),
            partial(_is_issued, 60 + n))
    add(lambda: client.issue(sample_state(sk_d=b"\x00" * 20)),
        lambda e: isinstance(e, AuthorityRejected) and e.code == grpc.StatusCode.INVALID_ARGUMENT
        and e.details.startswith("state.sk_d: must be 32 octets for PRF 5, got 20"))
    return calls, checks


def test_threads_each_get_their_own_result_in_fewer_rpcs(pkcs11_harness: Harness) -> None:
    good = tickets(pkcs11_harness, 12)
    east = tickets(pkcs11_harness, 1, realm="east")[0]
    counting = Counting()
    with TicketClient(address(pkcs11_harness), coalesce_window=0.05,
                      interceptors=[counting]) as client:
        calls, checks = _mixed_calls(client, good, east)
        results = in_threads(calls)
        failed = [(i, r) for i, (r, check) in enumerate(zip(results, checks, strict=True))
                  if not check(r)]
        assert not failed
        issued = [r for r in results if isinstance(r, IssuedTicket)]
        redeemed = in_threads([partial(client.redeem, i.ticket, consume=True)
                               for i in issued])
        assert [r.state.gateway_data for r in redeemed] == [
            f"session={100 + n}".encode() for n in range(6)]
    rpcs = sum(counting.calls.values())
    assert counting.calls["RedeemTickets"] + counting.calls["IssueTickets"] >= 1
    assert rpcs < len(calls) + len(issued)


def test_tasks_each_get_their_own_result_in_fewer_rpcs(pkcs11_harness: Harness) -> None:
    good = tickets(pkcs11_harness, 12)
    east = tickets(pkcs11_harness, 1, realm="east")[0]
    counting = AsyncCounting()

    async def main() -> tuple[list[Any], list[Callable[[Any], bool]], list[Any]]:
        async with AsyncTicketClient(address(pkcs11_harness), coalesce_window=0.05,
                                     interceptors=[counting]) as client:
            calls, checks = _mixed_calls(client, good, east)
            results = await asyncio.gather(*(c() for c in calls), return_exceptions=True)
            issued = [r for r in results if isinstance(r, IssuedTicket)]
            consumed = await asyncio.gather(*(client.redeem(i.ticket, consume=True)
                                              for i in issued))
            return list(results), checks, list(consumed)

    results, checks, consumed = run(main())
    assert [i for i, (r, check) in enumerate(zip(results, checks, strict=True))
            if not check(r)] == []
    assert [r.state.gateway_data for r in consumed] == [
        f"session={100 + n}".encode() for n in range(6)]
    # on one loop, the calls of a lane made in the same round go as one batch (no unary first)
    assert counting.calls["RedeemTicket"] == 0 and counting.calls["IssueTicket"] == 0
    assert counting.calls["RedeemTickets"] == 2 and counting.calls["IssueTickets"] == 1


def test_a_lone_call_is_unary_and_does_not_wait(pkcs11_harness: Harness) -> None:
    counting = Counting()
    with TicketClient(address(pkcs11_harness), coalesce_window=1.0,
                      interceptors=[counting]) as client:
        for n in range(3):
            begun = time.monotonic()
            assert client.redeem(client.issue(sample_state(n)).ticket).ok
            assert time.monotonic() - begun < 0.5
    assert dict(counting.calls) == {"IssueTicket": 3, "RedeemTicket": 3}


def test_window_zero_is_unary_only(pkcs11_harness: Harness) -> None:
    good = tickets(pkcs11_harness, 8)
    counting = Counting()
    with TicketClient(address(pkcs11_harness), coalesce_window=0,
                      interceptors=[counting]) as client:
        assert all(r.ok for r in at_once([partial(client.redeem, t) for t in good]))
    assert dict(counting.calls) == {"RedeemTicket": 8}


def test_the_window_is_validated() -> None:
    for bad in (-0.001, math.nan, math.inf, 2.0, "0.1", True):
        for make in (TicketClient, AsyncTicketClient):
            with pytest.raises(ValueError, match="coalesce_window"):
                make("127.0.0.1:1", coalesce_window=bad)  # type: ignore[arg-type]
    TicketClient("127.0.0.1:1", coalesce_window=0).close()


# -- merging, cancellation and deadlines (paced server) ------------------------------------------


def test_followers_merge_while_a_call_is_in_flight(pkcs11_harness: Harness,
                                                   paced: PacedServer) -> None:
    servicer, where = paced(0.2)
    good = tickets(pkcs11_harness, 8)
    counting = Counting()
    with TicketClient(where, coalesce_window=WIDE, interceptors=[counting]) as client:
        results = at_once([partial(client.redeem, t) for t in good])
    assert [_is_session(n, r) for n, r in enumerate(results)] == [True] * 8
    assert counting.calls["RedeemTicket"] + counting.calls["RedeemTickets"] < 8
    assert max(servicer.batches) >= 2


def test_a_full_group_goes_at_once(pkcs11_harness: Harness, paced: PacedServer) -> None:
    """max_batch_items 3: T0 goes alone (held 0.3 s); of the seven that wait for it, each
    group of three goes as soon as it is full, before T0 answers; the last one when the lane
    is idle."""
    servicer, where = paced(0.3)
    good = tickets(pkcs11_harness, 8)
    with TicketClient(where, coalesce_window=WIDE, max_batch_items=3) as client:
        begun = time.monotonic()
        results = at_once([partial(client.redeem, t) for t in good])
    assert [_is_session(n, r) for n, r in enumerate(results)] == [True] * 8
    assert sorted(servicer.batches) == [3, 3]
    assert all(when - begun < 0.2 for when in servicer.arrived)


def test_a_task_cancelled_mid_batch(pkcs11_harness: Harness, paced: PacedServer) -> None:
    """T0 goes alone (0.3 s); T1-T4 wait in a group, T3 is cancelled there; the group goes
    when T0 answers, T2 is cancelled while that batch is in flight. T2 and T3 get
    CancelledError, the others their tickets' states; T3's item was never sent."""
    servicer, where = paced(0.3)
    good = tickets(pkcs11_harness, 5)

    async def main() -> list[Any]:
        async with AsyncTicketClient(where, coalesce_window=2.0, timeout=5.0) as client:
            tasks = [asyncio.create_task(client.redeem(good[0]))]
            await asyncio.sleep(0.05)
            tasks += [asyncio.create_task(client.redeem(t)) for t in good[1:]]
            await asyncio.sleep(0.1)
            tasks[3].cancel()
            await asyncio.sleep(0.3)   # T0 answered at 0.3 s: the batch is in flight
            tasks[2].cancel()
            return list(await asyncio.gather(*tasks, return_exceptions=True))

    results = run(main())
    assert isinstance(results[2], asyncio.CancelledError)
    assert isinstance(results[3], asyncio.CancelledError)
    assert [results[i].state.gateway_data for i in (0, 1, 4)] == [
        b"session=0", b"session=1", b"session=4"]
    assert servicer.batches == [3]


def test_a_deadline_shorter_than_the_window_is_not_held(pkcs11_harness: Harness,
                                                        paced: PacedServer) -> None:
    _, where = paced(0.2)
    good = tickets(pkcs11_harness, 2)
    counting = Counting()
    with TicketClient(where, coalesce_window=WIDE, timeout=3.0,
                      interceptors=[counting]) as client:
        first = threading.Thread(target=client.redeem, args=(good[0],))
        first.start()
        time.sleep(0.05)   # the lane is busy: a caller with time to spare would wait
        begun = time.monotonic()
        assert client.redeem(good[1], timeout=0.4).ok
        assert time.monotonic() - begun < 0.35
        first.join()
    assert dict(counting.calls) == {"RedeemTicket": 2}


def test_a_deadline_passing_mid_batch_fails_only_its_caller(pkcs11_harness: Harness,
                                                            paced: PacedServer) -> None:
    """Window 0.1 s, each call held 0.4 s: T1 and T2 go together at 0.1 s; T2's deadline
    (0.3 s) passes while the batch is in flight, T1 gets its answer."""
    _, where = paced(0.4)
    good = tickets(pkcs11_harness, 3)
    with TicketClient(where, coalesce_window=0.1, timeout=3.0) as client:
        out: dict[int, Any] = {}

        def call(n: int, timeout: float) -> None:
            try:
                out[n] = client.redeem(good[n], timeout=timeout)
            except AuthorityDeadlineExceeded as exc:
                out[n] = (exc, time.monotonic() - begun)

        begun = time.monotonic()
        threads = [threading.Thread(target=call, args=(0, 3.0))]
        threads[0].start()
        time.sleep(0.02)
        threads += [threading.Thread(target=call, args=(1, 3.0)),
                    threading.Thread(target=call, args=(2, 0.3))]
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
    assert out[0].ok and out[1].ok
    exc, when = out[2]
    assert exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.25 < when < 0.45


def test_async_deadline_passing_mid_batch(pkcs11_harness: Harness, paced: PacedServer) -> None:
    _, where = paced(0.4)
    good = tickets(pkcs11_harness, 3)

    async def main() -> list[Any]:
        async with AsyncTicketClient(where, coalesce_window=0.1, timeout=3.0) as client:
            first = asyncio.create_task(client.redeem(good[0]))
            await asyncio.sleep(0.02)
            rest = [client.redeem(good[1]), client.redeem(good[2], timeout=0.3)]
            return list(await asyncio.gather(first, *rest, return_exceptions=True))

    results = run(main())
    assert results[0].ok and results[1].ok
    assert isinstance(results[2], AuthorityDeadlineExceeded)


# -- whole-batch failures --------------------------------------------------------------------------


def test_a_refused_batch_fails_each_of_its_callers(pkcs11_harness: Harness,
                                                   paced: PacedServer) -> None:
    """Rate limit: a bucket of 3, nearly no refill. T0 (alone) takes one token; the batch of
    the seven that waited for it needs 3: RESOURCE_EXHAUSTED for the whole batch, so for each
    of its callers, as a unary call of theirs would have got on an empty bucket."""
    _, where = paced(0.2, TokenBuckets(rate=0.001, burst=3))
    good = tickets(pkcs11_harness, 8)
    counting = Counting()
    with TicketClient(where, coalesce_window=WIDE, retries=3, backoff=FAST,
                      interceptors=[counting]) as client:
        results = in_threads([partial(client.redeem, t) for t in good])
    served = [r for r in results if isinstance(r, Redeemed)]
    refused = [r for r in results if not isinstance(r, Redeemed)]
    assert len(served) == 1 and served[0].ok
    assert len(refused) == 7
    assert all(isinstance(e, AuthorityRejected) and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
               for e in refused)
    assert counting.calls["RedeemTickets"] == 1   # one batch, refused once, not retried


def test_a_batch_too_large_for_the_server_is_split(tmp_path: Path) -> None:
    """The server takes at most 2 items per batch, the client would send 1000: T0 goes alone,
    the eleven that waited for it go as one batch, refused for its size. That is not the
    callers' error: the client learns the limit and each caller gets its answer."""
    h = Harness(tmp_path / "state")
    h.start(replace(h.config, server=replace(h.config.server, max_batch_items=2)))
    servicer, server, where = serve_paced(h.authority, 0.2)
    try:
        good = tickets(h, 12, per_batch=2)
        with TicketClient(where, coalesce_window=WIDE) as client:
            results = at_once([partial(client.redeem, t) for t in good])
            limit = client._lanes.max_items   # what it learned
        assert [_is_session(n, r) for n, r in enumerate(results)] == [True] * 12
        assert limit == 2
        assert servicer.batches[0] == 11 and max(servicer.batches[1:]) == 2
    finally:
        server.stop(None)
        h.stop()


def test_server_down_each_caller_unavailable_after_retries() -> None:
    counting = Counting()
    with TicketClient(f"127.0.0.1:{free_port()}", retries=2, backoff=FAST,
                      coalesce_window=0.05, interceptors=[counting]) as client:
        errors = in_threads([partial(client.issue, sample_state(n)) for n in range(6)]
                            + [partial(client.redeem, bytes(80), consume=True)
                               for _ in range(4)])
    assert all(isinstance(e, AuthorityUnavailable) and e.code == grpc.StatusCode.UNAVAILABLE
               and e.attempts == 3 for e in errors)
    assert all(e.maybe_sent is False for e in errors[6:])
    assert counting.calls["RedeemTicket"] + counting.calls["RedeemTickets"] == 0  # never sent


def test_store_down_idempotent_retried_consumes_not(pkcs11_harness: Harness,
                                                    paced: PacedServer) -> None:
    """The server answers UNAVAILABLE (its store closed): each caller of an idempotent redeem
    gets it after its retries, each consuming caller after one sending, as unary calls do."""
    _, where = paced(0.1)
    good = tickets(pkcs11_harness, 8)
    with TicketClient(address(pkcs11_harness), coalesce_window=0) as client:
        # consumed, so each later redeem of them reads the store (an id missing from the
        # server's consumed index needs no query, and would still be answered)
        assert all(client.redeem(t, consume=True).ok for t in good[:4])
    pkcs11_harness.authority.store.close()
    counting = Counting()
    with TicketClient(where, retries=2, backoff=FAST, coalesce_window=WIDE,
                      interceptors=[counting]) as client:
        plain = in_threads([partial(client.redeem, t) for t in good[:4]])
        consuming = in_threads([partial(client.redeem, t, consume=True) for t in good[4:]])
    assert all(isinstance(e, AuthorityUnavailable) and e.attempts == 3 for e in plain)
    assert all(isinstance(e, AuthorityUnavailable) and e.attempts == 1 and e.maybe_sent
               and "not retried" in e.details for e in consuming)
    assert counting.calls["RedeemTickets"] >= 2   # merged, retried merged


def test_async_server_down_each_caller_unavailable() -> None:
    counting = AsyncCounting()

    async def main() -> list[Any]:
        async with AsyncTicketClient(f"127.0.0.1:{free_port()}", retries=2, backoff=FAST,
                                     coalesce_window=0.05, interceptors=[counting]) as client:
            calls: list[Any] = [client.issue(sample_state(n)) for n in range(4)]
            calls += [client.redeem(bytes(80), consume=True) for _ in range(3)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    errors = run(main())
    assert all(isinstance(e, AuthorityUnavailable) and e.attempts == 3 for e in errors)
    assert all(e.maybe_sent is False for e in errors[4:])
    assert counting.calls["RedeemTicket"] + counting.calls["RedeemTickets"] == 0


# -- the sync client: who sends a group, and how its callers are woken -----------------------------


class SentFrom(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the thread that makes each batch RPC; raises ``interrupt`` (once) in the thread
    that sends the first batch, as a Ctrl-C reaching it mid-RPC would."""

    def __init__(self, interrupt: BaseException | None = None) -> None:
        self.threads: list[str] = []
        self.interrupt = interrupt

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) \
            else details.method
        if method.endswith("Tickets"):
            self.threads.append(threading.current_thread().name)
            if self.interrupt is not None:
                interrupt, self.interrupt = self.interrupt, None
                raise interrupt
        return continuation(details, request)


def _staggered(client: TicketClient, good: list[bytes], timeouts: list[float]
               ) -> dict[int, Any]:
    """T0 alone (the paced server holds it), then T1.. each with its own timeout, 20 ms
    apart, on threads named ``caller-N``; each one's result or exception (BaseException
    included) and when it came (seconds from the start)."""
    out: dict[int, Any] = {}
    begun = time.monotonic()

    def call(n: int) -> None:
        try:
            out[n] = (client.redeem(good[n], timeout=timeouts[n]), time.monotonic() - begun)
        except BaseException as exc:   # the test looks at it
            out[n] = (exc, time.monotonic() - begun)

    threads = []
    for n in range(len(timeouts)):
        threads.append(threading.Thread(target=call, args=(n,), name=f"caller-{n}"))
        threads[-1].start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return out


def test_the_caller_with_the_latest_deadline_sends_its_group(pkcs11_harness: Harness,
                                                             paced: PacedServer) -> None:
    """The batch RPC is made, blocking, by the thread of the group's caller with the latest
    deadline (T2's 8 s here, not the opener T1's 5 s nor a gRPC thread): whoever sends waits
    for the answer until the batch's deadline, which is its own."""
    servicer, where = paced(0.3)
    good = tickets(pkcs11_harness, 4)
    sent_from = SentFrom()
    with TicketClient(where, coalesce_window=WIDE, timeout=10.0,
                      interceptors=[sent_from]) as client:
        out = _staggered(client, good, [10.0, 5.0, 8.0, 6.0])
    assert [_is_session(n, out[n][0]) for n in range(4)] == [True] * 4
    assert servicer.batches == [3]
    assert sent_from.threads == ["caller-2"]


def test_callers_of_a_batch_are_woken_past_one_whose_deadline_passed(
        pkcs11_harness: Harness, paced: PacedServer) -> None:
    """Window 0.1 s, each call held 0.4 s: T1-T5 go as one batch at 0.1 s; T3's deadline
    (0.3 s) passes while it is in flight. The callers after T3 are still woken with their
    answers as the batch answers (~0.5 s), not at their own deadlines (3 s)."""
    _, where = paced(0.4)
    good = tickets(pkcs11_harness, 6)
    with TicketClient(where, coalesce_window=0.1, timeout=3.0) as client:
        out = _staggered(client, good, [3.0, 3.0, 3.0, 0.3, 3.0, 3.0])
    exc, when = out[3]
    assert isinstance(exc, AuthorityDeadlineExceeded) and 0.25 < when < 0.5
    assert all(_is_session(n, out[n][0]) for n in (0, 1, 2, 4, 5))
    assert all(out[n][1] < 1.5 for n in (1, 2, 4, 5))


def test_a_sender_interrupted_mid_batch_fails_each_caller_at_once(pkcs11_harness: Harness,
                                                                  paced: PacedServer) -> None:
    """The thread sending a batch is interrupted (KeyboardInterrupt) as it sends: it gets the
    interrupt, each other caller of the batch CANCELLED at once (no one waits for an answer
    that cannot come), and the lane keeps working."""
    _, where = paced(0.2)
    good = tickets(pkcs11_harness, 5)
    sent_from = SentFrom(KeyboardInterrupt())
    with TicketClient(where, coalesce_window=WIDE, timeout=5.0,
                      interceptors=[sent_from]) as client:
        out = _staggered(client, good[:4], [5.0, 5.0, 5.0, 5.0])
        after = client.redeem(good[4])
    assert _is_session(0, out[0][0])
    sender = int(sent_from.threads[0].rsplit("-", 1)[1])
    assert isinstance(out[sender][0], KeyboardInterrupt)
    others = [out[n] for n in (1, 2, 3) if n != sender]
    assert all(isinstance(exc, AuthorityRejected) and exc.code == grpc.StatusCode.CANCELLED
               and when < 1.0 for exc, when in others)
    assert _is_session(4, after)


def test_threads_answered_together_call_again_as_one_batch(pkcs11_harness: Harness,
                                                          paced: PacedServer) -> None:
    """Six threads redeem twice each. T0 finds the lane idle and goes alone; the five that
    wait for it go once T0, answered, is back with its second call (one batch of six, not the
    five and then T0 alone); the six answered by that batch call again, and the five second
    calls go together (T0 made both of its calls): one unary call and two batches in all."""
    servicer, where = paced(0.1)
    good = tickets(pkcs11_harness, 6)
    counting = Counting()
    with TicketClient(where, coalesce_window=WIDE, interceptors=[counting]) as client:
        client._rounds.grace = 0.2   # a busy machine's scheduling cannot end a round early

        def twice(ticket: bytes) -> Any:
            client.redeem(ticket)
            return client.redeem(ticket)

        results = at_once([partial(twice, t) for t in good])
    assert [_is_session(n, r) for n, r in enumerate(results)] == [True] * 6
    assert servicer.batches == [6, 5]
    assert dict(counting.calls) == {"RedeemTicket": 1, "RedeemTickets": 2}


def test_a_caller_gone_elsewhere_holds_its_round_only_briefly(pkcs11_harness: Harness,
                                                              paced: PacedServer) -> None:
    """Window 0.25 s, each call held 0.1 s. T2 goes alone, T0 and T1 wait for it, and go as
    one batch (T2 never calls again: its round ends without it). That batch answers both; T1
    then sleeps 0.5 s (it went to do something else) while T0 calls again at once: T0 waits for
    T1 no longer than ``ROUND_GRACE`` (not T1's second, nor the window), and its call goes
    alone, as the unary call."""
    servicer, where = paced(0.1)
    good = tickets(pkcs11_harness, 3)
    counting = Counting()
    took: list[float] = []
    with TicketClient(where, coalesce_window=0.25, interceptors=[counting]) as client:
        def call(n: int, then: Callable[[], None]) -> None:
            assert client.redeem(good[n]).ok
            then()

        def again() -> None:
            begun = time.monotonic()
            assert client.redeem(good[0]).ok
            took.append(time.monotonic() - begun)

        threads = [threading.Thread(target=call, args=(2, lambda: None))]
        threads[0].start()
        time.sleep(0.02)
        threads += [threading.Thread(target=call, args=(0, again)),
                    threading.Thread(target=call, args=(1, partial(time.sleep, 0.5)))]
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert servicer.batches == [2]
    assert dict(counting.calls) == {"RedeemTicket": 2, "RedeemTickets": 1}
    assert len(took) == 1 and took[0] < 0.2   # ~0.1 s: its own hold, no window, not T1's 0.5 s


def test_a_caller_not_answered_in_the_open_round_goes_at_once(pkcs11_harness: Harness,
                                                              paced: PacedServer) -> None:
    """Window 0.25 s, each call held 0.2 s. T2 goes alone, T0 and T1 wait for it and go as
    one batch when their window is over (~0.27 s; T2 never calls again); once it answered them
    (~0.47 s), both go to do something else (0.6 s). A call from the main thread, made while
    their round is still open (its grace made 5 s once that batch reached the server), is not held
    for them: it was not answered with them, it finds the lane idle, and goes at once as the
    unary call."""
    servicer, where = paced(0.2)
    good = tickets(pkcs11_harness, 4)
    counting = Counting()
    answered = threading.Barrier(3)
    with TicketClient(where, coalesce_window=0.25, interceptors=[counting]) as client:
        def call(n: int, then: Callable[[], None]) -> None:
            assert client.redeem(good[n]).ok
            then()

        def elsewhere() -> None:
            answered.wait(timeout=10)
            time.sleep(0.6)

        threads = [threading.Thread(target=call, args=(2, lambda: None))]
        threads[0].start()
        time.sleep(0.02)
        threads += [threading.Thread(target=call, args=(n, elsewhere)) for n in (0, 1)]
        begun = time.monotonic()
        for thread in threads[1:]:
            thread.start()
        while not servicer.batches and time.monotonic() - begun < 5:
            time.sleep(0.005)        # until T0 and T1's batch is in flight (held 0.2 s)
        client._rounds.grace = 5.0   # their round stays open for as long as the test lasts
        answered.wait(timeout=10)    # T0 and T1 are answered, and away
        begun = time.monotonic()
        assert client.redeem(good[3]).ok
        took = time.monotonic() - begun
        for thread in threads:
            thread.join(timeout=10)
    assert servicer.batches == [2]
    assert dict(counting.calls) == {"RedeemTicket": 2, "RedeemTickets": 1}
    assert took < 0.4   # ~0.2 s: its own hold, not the round's 5 s


def test_rounds_end_when_the_last_caller_is_back_or_none_came_back_for_the_grace() -> None:
    rounds = coalesce.Rounds(grace=0.01)
    first = rounds.answered(coalesce.REDEEM, 2, now=1.0)
    assert rounds.holds(coalesce.REDEEM) and not rounds.holds(coalesce.ISSUE)
    assert rounds.until(coalesce.REDEEM) == 1.01 and rounds.until(coalesce.ISSUE) is None
    second = rounds.answered(coalesce.REDEEM, 1, now=1.005)   # while it is open: the same one
    assert second is first and rounds.until(coalesce.REDEEM) == 1.015
    assert not rounds.back(first, now=1.006) and not rounds.back(first, now=1.007)
    assert not rounds.stalled(now=1.016)       # a caller came back at 1.007
    assert rounds.back(first, now=1.008)       # the last one: over
    assert not rounds.holds(coalesce.REDEEM) and rounds.until(coalesce.REDEEM) is None
    assert not rounds.back(first, now=1.009)   # a mark of a round that is over counts nothing
    late = rounds.answered(coalesce.REDEEM, 1, now=2.0)
    other = rounds.answered(coalesce.ISSUE, 1, now=2.005)
    assert late is not first and not rounds.stalled(now=2.009)
    assert rounds.stalled(now=2.01) and late.over and not other.over   # each lane its own
    assert rounds.holds(coalesce.ISSUE) and not rounds.back(late, now=2.02)
    assert rounds.stalled(now=2.015) and not rounds.holds(coalesce.ISSUE)


def test_the_gateway_bench_counts_each_runs_context_switches(pkcs11_harness: Harness) -> None:
    """authority/bench/gateway.py, against a real server: each run counts the gateway
    process's context switches, per resumption in its JSON, and rounds add them up."""
    good = tickets(pkcs11_harness, 16)
    run = gateway.sync_run(address(pkcs11_harness), good, 8, 80, True, coalesce.DEFAULT_WINDOW)
    assert run.failed == 0 and run.switches > 0   # every caller that waits is a switch
    doc = run.as_json()
    assert doc["switches_per_resumption"] == pytest.approx(run.switches / 80)
    assert run.plus(run).as_json()["switches_per_resumption"] == pytest.approx(run.switches / 80)
    alone = gateway.aio_run(address(pkcs11_harness), good, 1, 20, False, None)
    assert alone.failed == 0 and alone.switches > 0


# -- the aio client: the calls of one loop round go together ---------------------------------------


def test_async_lone_call_is_unary_and_does_not_wait(pkcs11_harness: Harness) -> None:
    counting = AsyncCounting()

    async def main() -> list[float]:
        took = []
        async with AsyncTicketClient(address(pkcs11_harness), coalesce_window=1.0,
                                     interceptors=[counting]) as client:
            for n in range(3):
                begun = time.monotonic()
                assert (await client.redeem((await client.issue(sample_state(n))).ticket)).ok
                took.append(time.monotonic() - begun)
        return took

    assert max(run(main())) < 0.5
    assert dict(counting.calls) == {"IssueTicket": 3, "RedeemTicket": 3}


def test_async_calls_of_one_round_go_as_one_batch(pkcs11_harness: Harness,
                                                  paced: PacedServer) -> None:
    """Tasks that call in the same loop round (here: woken together by one batch's answer)
    go as one batch, without a unary call first; the next round's calls again."""
    servicer, where = paced(0.1)
    good = tickets(pkcs11_harness, 6)
    counting = AsyncCounting()

    async def main() -> list[Any]:
        async with AsyncTicketClient(where, coalesce_window=WIDE,
                                     interceptors=[counting]) as client:
            async def twice(ticket: bytes) -> Any:
                await client.redeem(ticket)
                return await client.redeem(ticket)
            return list(await asyncio.gather(*(twice(t) for t in good)))

    results = run(main())
    assert [_is_session(n, r) for n, r in enumerate(results)] == [True] * 6
    assert servicer.batches == [6, 6]
    assert dict(counting.calls) == {"RedeemTickets": 2}


def test_async_opener_cancelled_in_its_round_the_others_still_go(pkcs11_harness: Harness,
                                                                  paced: PacedServer) -> None:
    """T0 finds the lane idle and opens a group for its round; T1-T3 join it; T0 is
    cancelled before the round ends. T0 gets CancelledError, the others their answers, and
    the batch carries their three items only."""
    servicer, where = paced(0.1)
    good = tickets(pkcs11_harness, 4)

    async def main() -> list[Any]:
        async with AsyncTicketClient(where, coalesce_window=WIDE, timeout=5.0) as client:
            tasks = [asyncio.create_task(client.redeem(t)) for t in good]
            await asyncio.sleep(0)   # each made its call: T0 waits for the round's end
            tasks[0].cancel()
            return list(await asyncio.gather(*tasks, return_exceptions=True))

    results = run(main())
    assert isinstance(results[0], asyncio.CancelledError)
    assert [_is_session(n, results[n]) for n in (1, 2, 3)] == [True] * 3
    assert servicer.batches == [3]


# -- consumes ------------------------------------------------------------------------------------


def handles(harness: Harness, count: int) -> list[bytes]:
    """Consume handles of ``count`` fresh tickets (each redeemed once, not consumed)."""
    with TicketClient(address(harness), coalesce_window=0) as client:
        return [client.redeem(t).ticket_id for t in tickets(harness, count)]


def test_consumes_merge_into_consume_tickets(pkcs11_harness: Harness,
                                             paced: PacedServer) -> None:
    """Eight threads consume at once: each gets OK, in fewer RPCs than callers (a batch of
    ConsumeTickets among them); consuming the same handles again: each REPLAYED."""
    servicer, where = paced(0.2)
    ids = handles(pkcs11_harness, 8)
    counting = Counting()
    with TicketClient(where, coalesce_window=WIDE, interceptors=[counting]) as client:
        first = at_once([partial(client.consume, i) for i in ids])
        again = at_once([partial(client.consume, i) for i in ids])
    assert first == [RedeemResult.OK] * 8 and again == [RedeemResult.REPLAYED] * 8
    assert counting.calls["ConsumeTicket"] + counting.calls["ConsumeTickets"] < 16
    assert counting.calls["ConsumeTickets"] >= 2 and max(servicer.batches) >= 2


def test_async_consumes_of_one_round_go_as_one_batch(pkcs11_harness: Harness) -> None:
    ids = handles(pkcs11_harness, 6)
    counting = AsyncCounting()

    async def go() -> list[Any]:
        async with AsyncTicketClient(address(pkcs11_harness), coalesce_window=WIDE,
                                     interceptors=[counting]) as client:
            return list(await asyncio.gather(*(client.consume(i) for i in [*ids, ids[0]])))

    assert run(go()) == [RedeemResult.OK] * 6 + [RedeemResult.REPLAYED]
    assert counting.calls == {"ConsumeTickets": 1}


def test_a_server_without_consume_tickets_makes_the_lane_unary(pkcs11_harness: Harness,
                                                               paced: PacedServer) -> None:
    """An older server answers ConsumeTickets UNIMPLEMENTED (nothing consumed): the callers of
    that batch go again alone, each gets OK, and later consumes of the client go unary; the
    other lanes still merge."""
    _, where = paced(0.2, kind=WithoutConsumeTickets)
    ids = handles(pkcs11_harness, 12)
    counting = Counting()
    with TicketClient(where, coalesce_window=WIDE, interceptors=[counting]) as client:
        first = at_once([partial(client.consume, i) for i in ids[:6]])
        batches = counting.calls["ConsumeTickets"]
        later = at_once([partial(client.consume, i) for i in ids[6:]])
        redeemed = at_once([partial(client.redeem, t) for t in tickets(pkcs11_harness, 6)])
    assert first == [RedeemResult.OK] * 6 and later == [RedeemResult.OK] * 6
    assert batches >= 1 and counting.calls["ConsumeTickets"] == batches
    assert counting.calls["ConsumeTicket"] >= 11
    assert all(r.ok for r in redeemed) and counting.calls["RedeemTickets"] >= 1
