"""The phases measured over gRPC, in order: warm-up, (a)+(b) interleaved unary rounds,
(c) batched and streamed redeem, (f) open-loop latency, (e) the storm and the store."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from authority.bench import storm as storm_phase
from authority.bench.device import OneSession
from authority.bench.loops import (
    Call,
    StreamPlan,
    Tally,
    Tick,
    closed_loop,
    open_loop,
    percentile,
    streams,
)
from authority.bench.options import Options
from authority.bench.procstat import CpuMeter
from authority.bench.progress import Bar, Progress
from authority.bench.results import Results
from authority.bench.rpc import Client, batch_items
from authority.bench.workload import cycled_batches, redeemed_ok

WARM_UP = 0.3      # seconds of unary calls before measuring (sessions, caches, the pool)
ROUND = 1.0        # seconds per slice of the interleaved echo / issue / redeem rounds


@dataclass
class Run:
    """Where the phases run: the client, the server's pid (for CPU and RSS), how to read its
    store's size, the bench's own PostgreSQL's pid (for its CPU), and the load offered to
    every server of the run (``--store postgresql``: half of the first server's saturated
    unary redeem rate; None: not compared), which (f) offers too when it differs from half of
    this server's own rate. ``device``: the one-session device loop of the unary ceiling,
    run as a fourth slice of each unary round."""

    client: Client
    pid: int | None
    store_size: Callable[[], int | None]
    options: Options
    results: Results
    progress: Progress
    db_pid: int | None = None
    latency_rate: float | None = None
    storm_tickets: list[bytes] = field(default_factory=list)   # (e)'s, once issued
    device: OneSession | None = None   # (d) the one-session loop, run in the unary rounds

    def meter(self) -> CpuMeter:
        """A CPU meter of this client, the server and the database."""
        return CpuMeter(self.pid, self.db_pid)


def _tick(bar: Bar, what: str, unit: str = "") -> Tick:
    def tick(tally: Tally) -> None:
        bar.update(bar.elapsed, f"{what} {tally.ok:,}{unit}")

    return tick


async def measured(call: Call, t: Run, seconds: float, bar: Bar, what: str) -> Tally:
    """A closed loop at the configured concurrency, with client and server CPU."""
    with t.meter() as meter:
        tally = await closed_loop(call, t.options.concurrency, seconds, _tick(bar, what))
    meter.charge(tally)
    return tally


async def warm_up(t: Run, pool: list[bytes]) -> None:
    """Echo and unary issue calls for a moment; the issued tickets start the redeem pool."""
    bar = t.progress.bar("warm-up", 2 * WARM_UP)
    echo = await closed_loop(t.client.echo(), t.options.concurrency, WARM_UP)
    issue = await closed_loop(t.client.issue(pool, t.options.pool_size),
                              t.options.concurrency, WARM_UP)
    echo.merge(issue)
    t.results.phases["warm_up"] = echo
    bar.close(f"{echo.ok:,} calls, {len(pool):,} tickets in the pool"
              + (f", error: {echo.first_error}" if echo.first_error else ""))


async def unary_rounds(t: Run, pool: list[bytes]) -> None:
    """(a) echo and (b) unary issue and redeem, interleaved in rounds of one second each
    so that a noisy neighbour hurts all three alike; the sums give the rates. With a
    one-session device loop (``t.device``, the unary ceiling's device rate) it is a fourth
    slice of each round (run in this thread: the channel is idle meanwhile)."""
    opts = t.options
    rounds = max(1, int(opts.duration / ROUND))
    calls = {"echo": t.client.echo(), "unary_issue": t.client.issue(pool, opts.pool_size),
             "unary_redeem": t.client.redeem(pool)}
    slices = len(calls) + (t.device is not None)
    bar = t.progress.bar("(a,b) echo/issue/redeem", slices * opts.duration)
    for name in calls:
        t.results.phases[name] = Tally()
    for _ in range(rounds):
        for name, call in calls.items():
            if name == "unary_redeem" and not pool:
                continue
            tally = await measured(call, t, opts.duration / rounds, bar, name)
            t.results.phases[name].merge(tally)
        _device_slice(t, opts.duration / rounds)
    r = t.results
    if not r.phases["unary_redeem"].calls:
        r.skipped["unary_redeem"] = "no ticket could be issued"
    bar.close(f"echo {_rate(r, 'echo')}, issue {_rate(r, 'unary_issue')}, "
              f"redeem {_rate(r, 'unary_redeem')} calls/s")


def _device_slice(t: Run, seconds: float) -> None:
    """One slice of the one-session device loop (if any); a failure is one of the run's
    errors and ends the loop for this run."""
    if t.device is None:
        return
    try:
        tally = t.device.run(seconds)
    except Exception as exc:
        t.results.errors.append(f"raw device, one session: {type(exc).__name__}: {exc}")
        t.device = None
        return
    t.results.phases.setdefault("raw_device_one_session", Tally()).merge(tally)


async def batched(t: Run, pool: list[bytes]) -> None:
    """(c) RedeemTickets batches (closed loop) and RedeemTicketStream (pipelined streams)."""
    opts = t.options
    batches = cycled_batches(pool, opts.batch_size)
    bar = t.progress.bar("(c) batched redeem", opts.duration)
    t.results.phases["batch_redeem"] = await measured(
        t.client.redeem_batch(batches), t, opts.duration, bar, "tickets")
    bar.close(f"{_rate(t.results, 'batch_redeem')} tickets/s")
    bar = t.progress.bar("(c) streamed redeem", opts.duration)
    source = itertools.cycle(batches)
    plan = StreamPlan(open=t.client.redeem_stream, next_request=lambda: next(source),
                      check=redeemed_ok, items=batch_items,
                      deadline=time.perf_counter() + opts.duration)
    with t.meter() as meter:
        tally = await streams(plan, opts.concurrency, _tick(bar, "tickets"))
    meter.charge(tally)
    t.results.phases["stream_redeem"] = tally
    bar.close(f"{_rate(t.results, 'stream_redeem')} tickets/s")


async def latency(t: Run, pool: list[bytes]) -> None:
    """(f) Unary redeem offered open-loop at half the saturated rate of (b); then, when the
    run compares servers at one load (``latency_rate``) that differs, at that rate; then echo
    at the first rate, the baseline that tells the ticket work from gRPC and the machine."""
    saturated = t.results.rate("unary_redeem")
    if not saturated or not pool:
        t.results.skipped["latency"] = "no saturated unary redeem rate"
        return
    rate, seconds = saturated / 2, 2 * t.options.duration
    bar = t.progress.bar(f"(f) latency @{rate:,.0f}/s", seconds)
    with t.meter() as meter:
        lat = await open_loop(t.client.redeem(pool), rate, seconds, _tick(bar, "calls"))
    meter.charge(lat.tally)
    t.results.latency = t.results.same_load = lat
    t.results.phases["latency"] = lat.tally
    bar.close(f"{len(lat.seconds):,} redeems, p99 {_p99(lat.seconds)}")
    if t.latency_rate is not None and round(t.latency_rate) != round(rate):
        await _same_load(t, pool, t.latency_rate)
    bar = t.progress.bar(f"(f) echo @{rate:,.0f}/s", t.options.duration)
    with t.meter() as meter:
        echo = await open_loop(t.client.echo(), rate, t.options.duration, _tick(bar, "calls"))
    meter.charge(echo.tally)
    t.results.echo_latency, t.results.phases["latency_echo"] = echo, echo.tally
    bar.close(f"{len(echo.seconds):,} echoes, p99 {_p99(echo.seconds)}")


async def _same_load(t: Run, pool: list[bytes], rate: float) -> None:
    """(f) again at the load offered to the first server of the run, for ``duration``."""
    bar = t.progress.bar(f"(f) latency @{rate:,.0f}/s (first server's)", t.options.duration)
    with t.meter() as meter:
        same = await open_loop(t.client.redeem(pool), rate, t.options.duration,
                               _tick(bar, "calls"))
    meter.charge(same.tally)
    t.results.same_load, t.results.phases["latency_same_load"] = same, same.tally
    bar.close(f"{len(same.seconds):,} redeems, p99 {_p99(same.seconds)}")


def _p99(seconds: list[float]) -> str:
    value = percentile(seconds, 0.99)
    return "-" if value is None else f"{value * 1000:.2f} ms"


async def storm(t: Run) -> None:
    """(e) Issue N tickets (untimed), redeem them all (timed), then consume them all."""
    await storm_issue(t)
    await storm_redeem(t)
    await consume(t)


async def storm_issue(t: Run) -> None:
    """(e) Issue the storm's N tickets (IssueTickets batches, not timed)."""
    opts = t.options
    n, batch, conc = opts.storm_tickets, opts.batch_size, opts.concurrency
    bar = t.progress.bar("(e) storm: issue", n, "tickets")
    with t.meter() as meter:
        t.storm_tickets, issued = await storm_phase.pre_issue(
            t.client, n, batch, conc, lambda x: bar.update(x.ok, "issued"))
    meter.charge(issued)
    t.results.phases["storm_issue"] = issued
    bar.close(f"{len(t.storm_tickets):,} tickets issued in {issued.seconds:.1f} s")


async def storm_redeem(t: Run) -> None:
    """(e) Redeem every ticket of the storm once (timed, server RSS sampled)."""
    opts, tickets = t.options, t.storm_tickets
    bar = t.progress.bar("(e) storm: redeem", len(tickets), "tickets")
    tally, peak = await storm_phase.redeem_storm(
        t.client, tickets, opts.batch_size, opts.concurrency, t.pid,
        lambda x: bar.update(x.ok, "redeemed"), db_pid=t.db_pid)
    t.results.storm = storm_phase.StormRun(t.results.phases["storm_issue"], tally,
                                           len(tickets), peak,
                                           storm_phase.server_memory(t.pid))
    t.results.phases["storm"] = tally
    bar.close(f"{tally.ok:,} OK, {tally.failed:,} failed in {tally.seconds:.2f} s")


async def consume(t: Run) -> None:
    """(e) Consume every ticket of the storm; the store's growth per entry."""
    run, tickets = t.results.storm, t.storm_tickets
    assert run is not None
    bar = t.progress.bar("(e) consume all", len(tickets), "tickets")
    with t.meter() as meter:
        run.consume, run.store_growth = await storm_phase.consume_all(
            t.client, tickets, t.options.batch_size, t.options.concurrency, t.store_size,
            lambda x: bar.update(x.ok, "consumed"))
    meter.charge(run.consume)
    t.results.phases["consume"] = run.consume
    per = run.store_bytes_per_ticket
    bar.close(f"{run.consume.ok:,} consumed; store "
              + (f"{per:.1f} bytes/ticket" if per is not None else "not measured"))


def _rate(results: Results, phase: str) -> str:
    rate = results.rate(phase)
    return f"{rate:,.0f}" if rate is not None else "-"


async def run_all(t: Run) -> None:
    """Every gRPC phase, in order."""
    t.results.backend_info = await t.client.status()
    pool: list[bytes] = []
    await warm_up(t, pool)
    await unary_rounds(t, pool)
    await _redeem_phases(t, pool)
    await storm(t)


async def _redeem_phases(t: Run, pool: list[bytes]) -> None:
    """(c) and (f), when the pool holds tickets to redeem."""
    if pool:
        await batched(t, pool)
        await latency(t, pool)
    else:
        t.results.skipped["batch_redeem"] = "no ticket could be issued"


def _without_pool(step: Callable[[Run], Awaitable[None]]
                  ) -> Callable[[Run, list[bytes]], Awaitable[None]]:
    async def run(t: Run, _: list[bytes]) -> None:
        await step(t)

    return run


async def run_interleaved(runs: list[Run]) -> None:
    """Every gRPC phase against several servers running at once, phase by phase: a phase runs
    against each server in turn (the other way round for the next phase) before the next
    phase starts, so that a neighbour's load on a shared machine hurts them alike; (e) is
    three phases (issue, redeem, consume), so no server's storm runs after another's
    consumes (PostgreSQL's autovacuum and checkpoints would follow those writes). (f) also
    offers each server after the first half of the first server's saturated unary redeem
    rate (``latency_rate``)."""
    for t in runs:
        t.results.backend_info = await t.client.status()
    pools: list[list[bytes]] = [[] for _ in runs]
    order = list(range(len(runs)))

    async def each(step: Callable[[Run, list[bytes]], Awaitable[None]]) -> None:
        for index in order:
            await step(runs[index], pools[index])
        order.reverse()

    await each(warm_up)
    await each(unary_rounds)
    first = runs[0].results.rate("unary_redeem")
    for t in runs[1:]:
        t.latency_rate = first / 2 if first else None
    await each(_redeem_phases)
    # no server's consumes (PostgreSQL's writes) before another's storm
    for step in (storm_issue, storm_redeem, consume):
        await each(_without_pool(step))
