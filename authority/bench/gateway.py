"""(h) The gateway's CPU per resumption: what one RFC 5723 resumption costs the process of a
gateway that uses our client library, at 1, 8 and 64 concurrent resumptions, with and without
the client's coalescing.

One resumption = ``redeem(ticket)`` (no consume, as the demo gateway's IKE_SESSION_RESUME
handler) + a fresh SPIr and Nr (``os.urandom``) + ``derive_resumed_keys`` from the redeemed
state. Not counted: the IKE messages' decoding and encoding, the UDP socket, and the
``consume`` call the gateway makes once the resumed IKE_AUTH verified (a second RPC; or none
with ``redeem(consume=True)``).

The gateway runs in a process of its own (``python -m authority.bench.gateway``, started by
the bench against the server it measures), so that its CPU is the client's alone: per run, the
process's CPU time (``time.process_time``: every thread, gRPC's included) over a fixed number of
resumptions, divided by that number; the tickets are issued and every client warmed up before
the clock starts. Each run also counts the process's context switches (voluntary and not,
every thread: ``getrusage``), per resumption: what a thread's wake-up costs is most of what
separates the blocking client from the asyncio one. Each run's resumptions are done in two
rounds, every run's share in turn and then the other way round, so that a noisy neighbour hurts
all runs alike. The figures the issue names (``gateway_cpu_us_at_N``) are those of the blocking
``TicketClient`` shared by N threads: the demo gateway's model (authority/demo/gateway.py), and
an IKE daemon's worker pool. The asyncio client (N tasks on one loop) is measured the same way,
as ``gateway_aio_cpu_us_at_N``.

Coalescing (the client's ``coalesce_window`` keyword, seconds, 0 = off): "without" passes 0,
"with" the client's default window. A client without the keyword has no coalescing: its
"with" figures are null (``gateway_coalescing`` says why). At 1 resumption at a time there is
nothing to coalesce, so there is one figure.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from authority.bench.workload import state_fields
from authority.client import AsyncTicketClient, IssuedTicket, Redeemed, TicketClient
from authority.ikev2 import derive_resumed_keys
from authority.state import ResumptionState

LEVELS = (1, 8, 64)
POOL = 256          # distinct tickets the resumptions cycle through (no consume)
ROUNDS = 2          # each run's resumptions are done in this many interleaved rounds
TIMEOUT = 30.0      # per client call: a stuck server fails the run instead of hanging it
_NI = os.urandom(32)                  # the initiator's nonce and SPI, as decoded from its
_SPI_I = os.urandom(7) + b"\x01"      # IKE_SESSION_RESUME request


@dataclass
class GatewayRun:
    """One measured run: ``resumptions`` at ``concurrency``, the process CPU they took."""

    client: str          # "sync" or "aio"
    concurrency: int
    coalesced: bool
    window_s: float      # the coalesce_window passed (0: off)
    resumptions: int
    failed: int
    seconds: float
    cpu_s: float
    first_error: str = ""
    switches: int = 0    # the process's context switches during the run

    @property
    def cpu_us(self) -> float | None:
        """Process CPU microseconds per resumption (None: none succeeded)."""
        ok = self.resumptions - self.failed
        return self.cpu_s / self.resumptions * 1e6 if ok > 0 else None

    def plus(self, other: GatewayRun) -> GatewayRun:
        """This run and another round of it, summed."""
        return replace(self, resumptions=self.resumptions + other.resumptions,
                       failed=self.failed + other.failed, seconds=self.seconds + other.seconds,
                       cpu_s=self.cpu_s + other.cpu_s,
                       first_error=self.first_error or other.first_error,
                       switches=self.switches + other.switches)

    def as_json(self) -> dict[str, Any]:
        """Every field, the CPU per resumption, the rate and the context switches per
        resumption."""
        out = asdict(self)
        out["cpu_us"] = self.cpu_us
        out["per_s"] = self.resumptions / self.seconds if self.seconds > 0 else None
        out["switches_per_resumption"] = (self.switches / self.resumptions
                                          if self.resumptions > 0 else None)
        return out


def context_switches() -> int:
    """This process's context switches so far, voluntary and not, every thread's (ended
    threads' included). Never raises."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def coalesce_window(client_class: type) -> float | None:
    """The default ``coalesce_window`` of ``client_class``'s constructor; None when it has no
    such keyword (no coalescing). Never raises."""
    try:
        parameter = inspect.signature(client_class).parameters.get("coalesce_window")
    except (TypeError, ValueError):
        return None
    if parameter is None:
        return None
    default = parameter.default
    return float(default) if isinstance(default, int | float) else 0.0


def _settings(coalesced: bool, window: float | None) -> dict[str, Any]:
    """The constructor keywords of a run: nothing without the keyword, else the window."""
    if window is None:
        return {}
    return {"coalesce_window": window if coalesced else 0.0}


def _resume(redeemed: Redeemed) -> bool:
    """The gateway's work after the redeem: derive the resumed SA's keys. False: not OK."""
    state = redeemed.state
    if not redeemed.ok or state is None:
        return False
    derive_resumed_keys(state.prf_id, state.sk_d, _NI, os.urandom(32), _SPI_I,
                        os.urandom(8), state.encr_id, state.encr_key_bits, state.integ_id)
    return True


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- the blocking client, N threads -----------------------------------------------------------

def sync_run(address: str, tickets: list[bytes], concurrency: int, count: int,
             coalesced: bool, window: float | None) -> GatewayRun:
    """``count`` resumptions by ``concurrency`` threads sharing one ``TicketClient``, after a
    warm-up of two per thread. Never raises for a failed call (counted)."""
    with TicketClient(address, timeout=TIMEOUT, **_settings(coalesced, window)) as client:
        _threads(client, tickets, concurrency, 2 * concurrency)
        failed, error, seconds, cpu, switches = _threads(client, tickets, concurrency, count)
    return GatewayRun("sync", concurrency, coalesced and window is not None,
                      (window or 0.0) if coalesced else 0.0, count, failed, seconds, cpu, error,
                      switches)


def _threads(client: TicketClient, tickets: list[bytes], concurrency: int,
             count: int) -> tuple[int, str, float, float, int]:
    """``count`` resumptions from ``concurrency`` threads, released together once all have
    started; (failed, first error, wall seconds, process CPU seconds, context switches) from
    the release to the last thread's end (starting the threads is not counted)."""
    numbers = itertools.count()
    failures: list[str] = []
    started = threading.Barrier(concurrency + 1)
    go = threading.Event()

    def work() -> None:
        started.wait()
        go.wait()
        while (n := next(numbers)) < count:
            try:
                ok = _resume(client.redeem(tickets[n % len(tickets)]))
            except Exception as exc:
                failures.append(_describe(exc))
                continue
            if not ok:
                failures.append("redeem not OK")

    workers = [threading.Thread(target=work, name=f"gateway-{i}") for i in range(concurrency)]
    for worker in workers:
        worker.start()
    started.wait()
    switches, cpu, began = context_switches(), time.process_time(), time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    switches = context_switches() - switches
    return len(failures), failures[0] if failures else "", seconds, cpu, switches


# -- the asyncio client, N tasks ---------------------------------------------------------------

def aio_run(address: str, tickets: list[bytes], concurrency: int, count: int,
            coalesced: bool, window: float | None) -> GatewayRun:
    """``count`` resumptions by ``concurrency`` tasks on one loop sharing one
    ``AsyncTicketClient``, after a warm-up of two per task. Never raises for a failed call."""
    return asyncio.run(_aio_run(address, tickets, concurrency, count, coalesced, window))


async def _aio_run(address: str, tickets: list[bytes], concurrency: int, count: int,
                   coalesced: bool, window: float | None) -> GatewayRun:
    async with AsyncTicketClient(address, timeout=TIMEOUT,
                                 **_settings(coalesced, window)) as client:
        await _tasks(client, tickets, concurrency, 2 * concurrency)
        switches, cpu, began = context_switches(), time.process_time(), time.perf_counter()
        failed, error = await _tasks(client, tickets, concurrency, count)
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        switches = context_switches() - switches
    return GatewayRun("aio", concurrency, coalesced and window is not None,
                      (window or 0.0) if coalesced else 0.0, count, failed, seconds, cpu, error,
                      switches)


async def _tasks(client: AsyncTicketClient, tickets: list[bytes], concurrency: int,
                 count: int) -> tuple[int, str]:
    numbers = itertools.count()
    failures: list[str] = []

    async def work() -> None:
        while (n := next(numbers)) < count:
            try:
                ok = _resume(await client.redeem(tickets[n % len(tickets)]))
            except Exception as exc:
                failures.append(_describe(exc))
                continue
            if not ok:
                failures.append("redeem not OK")

    await asyncio.gather(*(work() for _ in range(concurrency)))
    return len(failures), failures[0] if failures else ""


# -- the whole phase (in the gateway process) -------------------------------------------------

Runner = Callable[[str, list[bytes], int, int, bool, "float | None"], GatewayRun]


def measure(address: str, count: int, rounds: int = ROUNDS) -> dict[str, Any]:
    """Issue the pool, then every run: each client (sync, aio), each level, without and (above
    one at a time) with coalescing; ``count`` resumptions per run (at least 10 per caller),
    in ``rounds`` rounds that each do every run's share in turn (the other way round in the
    next), so that a noisy neighbour hurts them alike; a run's figures are its rounds' sums.

    Raises: TicketClientError when the pool cannot be issued; RuntimeError when no ticket
    was issued."""
    with TicketClient(address, timeout=TIMEOUT) as client:
        issued = client.issue_many([ResumptionState(**state_fields(n)) for n in range(POOL)])
    tickets = [item.ticket for item in issued if isinstance(item, IssuedTicket)]
    if not tickets:
        raise RuntimeError(f"no ticket issued for the gateway runs: {issued[0]}")
    plan: list[tuple[Runner, int, bool, float | None]] = []
    clients: list[tuple[Runner, type]] = [(sync_run, TicketClient), (aio_run, AsyncTicketClient)]
    for runner, client_class in clients:
        window = coalesce_window(client_class)
        for level in LEVELS:
            for coalesced in (False, True) if level > 1 else (False,):
                if not (coalesced and window is None):
                    plan.append((runner, level, coalesced, window))
    runs: dict[int, GatewayRun] = {}
    for number in range(rounds):
        order = list(enumerate(plan))
        for index, (runner, level, coalesced, window) in order[::-1] if number % 2 else order:
            share = -(-max(count, 10 * level) // rounds)
            done = runner(address, tickets, level, share, coalesced, window)
            runs[index] = runs[index].plus(done) if index in runs else done
    return {"runs": [runs[i].as_json() for i in sorted(runs)], "rounds": rounds,
            "coalesce_window_s": {"sync": coalesce_window(TicketClient),
                                  "aio": coalesce_window(AsyncTicketClient)}}


def figures(measured: dict[str, Any] | None, why_not: str = "") -> dict[str, Any]:
    """The flat JSON keys from a ``measure`` document (None: not measured, ``why_not``):
    ``gateway_cpu_us_at_N`` (sync client, without coalescing), ``..._coalesced`` (with),
    ``gateway_aio_cpu_us_at_N[_coalesced]``, and ``gateway`` (every run, the windows, notes)."""
    out: dict[str, Any] = {}
    runs = (measured or {}).get("runs", [])
    for prefix, client in (("gateway_cpu_us_at_", "sync"), ("gateway_aio_cpu_us_at_", "aio")):
        for level in LEVELS:
            for coalesced in (False, True) if level > 1 else (False,):
                key = f"{prefix}{level}" + ("_coalesced" if coalesced else "")
                out[key] = next((r["cpu_us"] for r in runs if r["client"] == client
                                 and r["concurrency"] == level
                                 and r["coalesced"] == coalesced), None)
    windows = (measured or {}).get("coalesce_window_s", {})
    notes = [f"{name} client has no coalesce_window: no coalescing, the _coalesced figures "
             "are null" for name in ("sync", "aio") if measured and windows.get(name) is None]
    if measured is None:
        notes.append(f"not measured: {why_not}")
    out["gateway"] = {"client": "TicketClient shared by N threads (gateway_cpu_us_at_N); "
                                "AsyncTicketClient, N tasks (gateway_aio_cpu_us_at_N)",
                      "coalesce_window_s": windows, "rounds": (measured or {}).get("rounds"),
                      "runs": runs, "notes": notes}
    return out


def failures(measured: dict[str, Any]) -> list[str]:
    """One line per run with failed resumptions."""
    return [f"gateway {r['client']} x{r['concurrency']}"
            f"{' coalesced' if r['coalesced'] else ''}: {r['failed']:,} of "
            f"{r['resumptions']:,} resumptions failed ({r['first_error']})"
            for r in measured.get("runs", []) if r["failed"]]


def run_process(address: str, count: int, env: dict[str, str],
                timeout: float = 600.0) -> dict[str, Any]:
    """Run ``measure`` in a gateway process of its own and return its document.

    Raises: RuntimeError (the process failed: its stderr's tail), subprocess.TimeoutExpired."""
    done = subprocess.run([sys.executable, "-m", "authority.bench.gateway", address,
                           "--resumptions", str(count)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"gateway process exited with {done.returncode}: "
                           f"{done.stderr.strip()[-600:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m authority.bench.gateway ADDRESS [--resumptions N]``: the runs as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("address")
    parser.add_argument("--resumptions", type=int, default=2000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.address, args.resumptions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
