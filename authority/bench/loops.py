"""Load generators on one asyncio event loop: closed loop (N calls in flight for a time),
drain (N workers through a fixed list), pipelined streams, and open loop (scheduled sends).

Every call reports (OK items, failed items); an RPC error counts the call's items as failed
and keeps the first message. Nothing here knows which RPC it drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

#: one call: given a sequence number, returns (OK items, failed items)
Call = Callable[[int], Awaitable[tuple[int, int]]]
#: called about ten times a second with the running tally (progress bars)
Tick = Callable[["Tally"], None]

ABORT_AFTER = 50  # failed calls with no success: the phase is broken, stop early
_TICK = 0.1


@dataclass
class Tally:
    """What a phase did: items OK and failed, calls, wall seconds, CPU seconds (client, server,
    database), first error, and each successful call's seconds (closed loops)."""

    ok: int = 0
    failed: int = 0
    calls: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float | None = None
    db_cpu: float | None = None       # the bench's own PostgreSQL (postmaster and backends)
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def per_s(self) -> float:
        """OK items per second of wall time."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def broken(self) -> bool:
        """True when calls keep failing and none succeeded (e.g. UNIMPLEMENTED)."""
        return self.ok == 0 and self.failed >= ABORT_AFTER

    def record(self, ok: int, failed: int) -> None:
        """Count one finished call."""
        self.calls += 1
        self.ok += ok
        self.failed += failed

    def error(self, exc: BaseException, items: int = 1) -> None:
        """Count one failed call of ``items`` items and keep the first message."""
        self.record(0, items)
        if not self.first_error:
            self.first_error = describe_error(exc)

    def merge(self, other: Tally) -> None:
        """Add another tally (interleaved rounds of the same phase)."""
        self.ok += other.ok
        self.failed += other.failed
        self.calls += other.calls
        self.seconds += other.seconds
        self.client_cpu += other.client_cpu
        if other.server_cpu is not None:
            self.server_cpu = (self.server_cpu or 0.0) + other.server_cpu
        if other.db_cpu is not None:
            self.db_cpu = (self.db_cpu or 0.0) + other.db_cpu
        self.latencies += other.latencies
        self.first_error = self.first_error or other.first_error


def describe_error(exc: BaseException) -> str:
    """``CODE: details`` for a gRPC error, else the exception's type and text."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


async def _ticker(tally: Tally, tick: Tick | None, done: asyncio.Event) -> None:
    while tick is not None and not done.is_set():
        tick(tally)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), _TICK)


async def _run(workers: list[Awaitable[None]], tally: Tally, tick: Tick | None) -> Tally:
    """Run the workers with a progress ticker; set the tally's wall time."""
    done = asyncio.Event()
    ticker = asyncio.create_task(_ticker(tally, tick, done))
    start = time.perf_counter()
    try:
        await asyncio.gather(*workers)
    finally:
        tally.seconds = time.perf_counter() - start
        done.set()
        await ticker
    return tally


async def closed_loop(call: Call, concurrency: int, seconds: float,
                      tick: Tick | None = None) -> Tally:
    """``concurrency`` workers each call again as soon as their call returns, for ``seconds``
    (calls in flight at the deadline finish and count); each answered call's seconds go to
    ``latencies``."""
    tally = Tally()
    numbers = itertools.count()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (sent := time.perf_counter()) < deadline and not tally.broken:
            try:
                outcome = await call(next(numbers))
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                tally.error(exc)
                continue
            tally.latencies.append(time.perf_counter() - sent)
            tally.record(*outcome)

    return await _run([worker() for _ in range(concurrency)], tally, tick)


async def drain(requests: list[Any], call: Callable[[Any], Awaitable[tuple[int, int]]],
                concurrency: int, items: Callable[[Any], int],
                tick: Tick | None = None) -> Tally:
    """``concurrency`` workers take the next request of the list until none is left."""
    tally = Tally()
    queue = iter(requests)

    async def worker() -> None:
        for request in queue:
            if tally.broken:
                return
            try:
                tally.record(*await call(request))
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                tally.error(exc, items(request))

    return await _run([worker() for _ in range(concurrency)], tally, tick)


@dataclass
class StreamPlan:
    """How to drive pipelined bidirectional streams."""

    open: Callable[[], Any]                    # returns a new stream call (grpc.aio)
    next_request: Callable[[], Any | None]     # None: nothing left to send
    check: Callable[[Any], tuple[int, int]]    # a response's (OK items, failed items)
    items: Callable[[Any], int]                # a request's item count
    window: int = 2                            # messages in flight per stream
    deadline: float | None = None              # perf_counter time to stop sending


async def streams(plan: StreamPlan, concurrency: int, tick: Tick | None = None) -> Tally:
    """``concurrency`` streams, each keeping ``plan.window`` messages in flight; items sent but
    never answered (a failed stream) count as failed."""
    tally = Tally()
    return await _run([_one_stream(plan, tally) for _ in range(concurrency)], tally, tick)


async def _one_stream(plan: StreamPlan, tally: Tally) -> None:
    call = plan.open()
    slots = asyncio.Semaphore(plan.window)
    counts = {"sent": 0, "answered": 0}

    async def writer() -> None:
        while plan.deadline is None or time.perf_counter() < plan.deadline:
            request = plan.next_request()
            if request is None:
                break
            await slots.acquire()
            await call.write(request)
            counts["sent"] += plan.items(request)
        await call.done_writing()

    async def reader() -> None:
        while (reply := await call.read()) is not grpc.aio.EOF:
            ok, failed = plan.check(reply)
            tally.record(ok, failed)
            counts["answered"] += ok + failed
            slots.release()

    try:
        await asyncio.gather(writer(), reader())
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        call.cancel()
        tally.error(exc, max(0, counts["sent"] - counts["answered"]))


@dataclass
class Latencies:
    """Open-loop results: per-call latency (from the send) and how late each send was."""

    tally: Tally
    seconds: list[float]
    lag: list[float]
    offered_per_s: float


async def open_loop(call: Call, rate: float, seconds: float, tick: Tick | None = None,
                    max_outstanding: int = 10_000) -> Latencies:
    """Send at ``rate`` calls/s on a fixed schedule for ``seconds``, whatever the replies do
    (not closed-loop). A send that would exceed ``max_outstanding`` counts as failed."""
    tally = Tally()
    result = Latencies(tally, [], [], rate)
    pending: set[asyncio.Task[None]] = set()

    async def one(number: int, due: float) -> None:
        sent = time.perf_counter()
        result.lag.append(sent - due)
        try:
            outcome = await call(number)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            tally.error(exc)
            return
        result.seconds.append(time.perf_counter() - sent)
        tally.record(*outcome)

    async def schedule() -> None:
        start = time.perf_counter() + 0.01
        for number, due in _times(start, rate, seconds):
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= max_outstanding:
                tally.record(0, 1)
                continue
            task = asyncio.create_task(one(number, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        while pending:
            await asyncio.gather(*list(pending))

    await _run([schedule()], tally, tick)
    return result


def _times(start: float, rate: float, seconds: float) -> Iterator[tuple[int, float]]:
    for number in range(max(1, int(rate * seconds))):
        yield number, start + number / rate


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (``share`` in 0..1) of ``values``, or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(share * len(ordered))))
    return ordered[rank - 1]
