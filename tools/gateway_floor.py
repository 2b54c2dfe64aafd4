"""The blocking client's floor at N threads (issue 14's ``gateway_cpu_us_at_N``): what a
resumption costs a gateway's process when N threads share one connection and every batch is
perfect, against ``TicketClient`` (coalesced) measured in the same run.

    python tools/gateway_floor.py [--threads N] [--resumptions R] [--runs K]

The floor: N threads each redeem (then derive the resumed keys, as the bench's gateway does:
authority/bench/gateway.py); the Nth caller sends one RedeemTickets of the N tickets from its
own thread, blocking, and hands each other caller its item; the others wait on a bare lock and
are woken one after another ("chained", as TicketClient wakes them) or all at once. No timers,
no deadlines, no retries, no lone-call rule: nothing a real client may leave out, so no client
built on grpcio's blocking API and threads can cost less here. A server of its own (``serve``,
the defaults, embedded SoftHSM2) in a temporary directory; process CPU per resumption and
context switches as the bench counts them; the runs interleaved. Prints the machine.

``--aio``: the same for ``AsyncTicketClient`` (N tasks on one loop): its floor is one task
that sends the RedeemTickets of N tickets (grpc.aio, the bench's timeout) and derives the
N resumed keys, batch after batch: no other task, future, timer or bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

from authority._proto.ticketauthority.v1 import authority_pb2_grpc  # noqa: E402
from authority.bench import gateway  # noqa: E402
from authority.bench.serveproc import ServeProcess  # noqa: E402
from authority.bench.workload import issue_request  # noqa: E402
from authority.client import AsyncTicketClient, TicketClient  # noqa: E402
from authority.client.models import Redeemed, redeem_batch, redeemed_batch  # noqa: E402


class PerfectBatches:
    """``redeem`` for ``n`` threads: every batch holds exactly ``n`` tickets (see the module
    docstring). Raises what the RPC raises, in the sender's thread."""

    def __init__(self, stub: Any, n: int, chained: bool) -> None:
        self._stub, self._n, self._chained = stub, n, chained
        self._lock = threading.Lock()
        self._pending: list[tuple[bytes, _Waiter]] = []

    def redeem(self, ticket: bytes) -> Redeemed:
        me = _Waiter()
        with self._lock:
            self._pending.append((ticket, me))
            group = None
            if len(self._pending) >= self._n:
                group, self._pending = self._pending, []
        if group is None:
            return me.wait()
        reply = self._stub.RedeemTickets(redeem_batch([t for t, _ in group], False, 0),
                                         timeout=gateway.TIMEOUT)
        for (_, waiter), item in zip(group, redeemed_batch(reply), strict=True):
            waiter.item = item
        others = [w for _, w in group if w is not me]
        if self._chained:
            for waiter, following in itertools.pairwise(others):
                waiter.next = following
            if others:
                others[0].lock.release()
        else:
            for waiter in others:
                waiter.lock.release()
        assert isinstance(me.item, Redeemed)
        return me.item


class _Waiter:
    __slots__ = ("item", "lock", "next")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.item: Any = None
        self.next: _Waiter | None = None

    def wait(self) -> Redeemed:
        self.lock.acquire()
        if self.next is not None:
            self.next.lock.release()
        assert isinstance(self.item, Redeemed)
        return self.item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--resumptions", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--aio", action="store_true",
                        help="AsyncTicketClient and its floor (N tasks) instead of threads")
    args = parser.parse_args()
    n, count = args.threads, args.resumptions - args.resumptions % args.threads
    print(f"{_machine()}; load {os.getloadavg()}; {n} {'tasks' if args.aio else 'threads'}, "
          f"{count} resumptions per run, medians of {args.runs} runs, interleaved")
    with tempfile.TemporaryDirectory(prefix="gateway-floor-") as tmp:
        server = ServeProcess(Path(tmp), "s", f'state_dir = "{tmp}/s"\n[server]\n'
                                              f'listen = "127.0.0.1:0"\nmetrics_listen = ""\n')
        server.serve()
        try:
            (_measure_aio if args.aio else _measure)(server.address, n, count, args.runs)
        finally:
            server.stop()


def _measure(address: str, n: int, count: int, runs: int) -> None:
    channel = grpc.insecure_channel(address)
    stub = authority_pb2_grpc.TicketAuthorityStub(channel)
    tickets = _issued(stub)
    figures: dict[str, list[tuple[float, float]]] = {}
    for _ in range(runs):
        for label, chained in (("floor, chained wake-ups", True), ("floor, all woken", False)):
            batches = PerfectBatches(stub, n, chained)
            gateway._threads(batches, tickets, n, 2 * n)   # type: ignore[arg-type]
            failed, error, _, cpu, switches = gateway._threads(
                batches, tickets, n, count)   # type: ignore[arg-type]
            if failed:
                raise SystemExit(f"{label}: {failed} failed: {error}")
            figures.setdefault(label, []).append((cpu / count * 1e6, switches / count))
        _add_client(figures, "TicketClient", gateway.sync_run(
            address, tickets, n, count, True, gateway.coalesce_window(TicketClient)))
    channel.close()
    _report(figures)


def _measure_aio(address: str, n: int, count: int, runs: int) -> None:
    with grpc.insecure_channel(address) as channel:
        tickets = _issued(authority_pb2_grpc.TicketAuthorityStub(channel))
    figures: dict[str, list[tuple[float, float]]] = {}
    for _ in range(runs):
        figures.setdefault("floor, one task", []).append(
            asyncio.run(_one_task(address, tickets, n, count)))
        _add_client(figures, "AsyncTicketClient", gateway.aio_run(
            address, tickets, n, count, True, gateway.coalesce_window(AsyncTicketClient)))
    _report(figures)


def _issued(stub: Any) -> list[bytes]:
    """The pool of tickets the resumptions cycle through, as the bench issues them."""
    return [stub.IssueTicket(issue_request(i)).ticket for i in range(gateway.POOL)]


def _add_client(figures: dict[str, list[tuple[float, float]]], client: str,
                run: gateway.GatewayRun) -> None:
    """Record a client's coalesced run (CPU µs and context switches per resumption); exits
    naming the client if a call of it failed."""
    if run.failed or run.cpu_us is None:
        raise SystemExit(f"{client}: {run.failed} failed: {run.first_error}")
    figures.setdefault(f"{client}, coalesced", []).append(
        (run.cpu_us, run.switches / run.resumptions))


async def _one_task(address: str, tickets: list[bytes], n: int,
                    count: int) -> tuple[float, float]:
    """The asyncio floor: batches of ``n`` sent and their keys derived by one task; CPU µs and
    context switches per resumption."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = authority_pb2_grpc.TicketAuthorityStub(channel)
        await stub.RedeemTickets(redeem_batch(tickets[:n], False, 0), timeout=gateway.TIMEOUT)
        switches, cpu = gateway.context_switches(), time.process_time()
        for first in range(0, count, n):
            group = [tickets[(first + i) % len(tickets)] for i in range(n)]
            reply = await stub.RedeemTickets(redeem_batch(group, False, 0),
                                             timeout=gateway.TIMEOUT)
            for item in redeemed_batch(reply):
                if not isinstance(item, Redeemed) or not gateway._resume(item):
                    raise SystemExit(f"floor: a redeem failed: {item}")
        cpu, switches = time.process_time() - cpu, gateway.context_switches() - switches
    return cpu / count * 1e6, switches / count


def _report(figures: dict[str, list[tuple[float, float]]]) -> None:
    for label, values in figures.items():
        cpu = statistics.median(v[0] for v in values)
        switches = statistics.median(v[1] for v in values)
        each = ", ".join(f"{v[0]:.1f}" for v in values)
        print(f"{label:26s} {cpu:7.1f} µs per resumption ({each}), "
              f"{switches:.2f} context switches")


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cpus"


if __name__ == "__main__":
    main()
