"""Where a unary call's server CPU goes: an aio server (the defaults, embedded SoftHSM2 token)
in this process, a client in a subprocess driving one method at N calls in flight; prints the
CPU per call of each server thread and, with ``--parts``, of the layers of the ticket path
(thread CPU time around each, so the figures are what the loop thread spent there; a layer's
figure includes the layers inside it).

    python tools/unary_profile.py [--seconds S] [--inflight N] [--runs R] [--parts]
                                  [--methods echo,issue,redeem]

Each figure is the median of R runs. The machine is shared: compare methods within one run of
the tool. ``--parts`` wraps the layers (a few µs of its own per wrapper).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from authority.config import Config, KeyPolicy, ServerSettings  # noqa: E402

CLIENT = r"""
import asyncio, sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.bench.workload import issue_request
async def main(address, method, seconds, inflight):
    channel = grpc.aio.insecure_channel(address)
    tickets = authority_pb2_grpc.TicketAuthorityStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    issues = [issue_request(i) for i in range(1000)]
    redeems = [authority_pb2.RedeemTicketRequest(ticket=(await tickets.IssueTicket(r)).ticket)
               for r in issues]
    check = health_pb2.HealthCheckRequest()
    call = {"echo": lambda n: health.Check(check),
            "issue": lambda n: tickets.IssueTicket(issues[n % 1000]),
            "redeem": lambda n: tickets.RedeemTicket(redeems[n % 1000])}[method]
    for n in range(1000):
        await call(n)
    print("ready", flush=True)
    sys.stdin.readline()
    end, count = time.perf_counter() + seconds, 0
    async def worker():
        nonlocal count
        while time.perf_counter() < end:
            await call(count)
            count += 1
    await asyncio.gather(*(worker() for _ in range(inflight)))
    print(count, flush=True)
asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
"""

#: (module, attribute path, label): the layers ``--parts`` times, outermost first
PARTS = [
    ("authority.service.servicers", "TicketAuthorityServicer.IssueTicket", "servicer"),
    ("authority.service.servicers", "TicketAuthorityServicer.RedeemTicket", "servicer"),
    ("authority.service.convert", "state_from_proto", "convert request"),
    ("authority.service.convert", "issue_response", "convert response"),
    ("authority.service.convert", "redeem_response", "convert response"),
    ("authority.sealer", "Sealer.issue_many", "sealer"),
    ("authority.sealer", "Sealer.redeem_many", "sealer"),
    ("authority.sealer", "Sealer._check_live", "sealer: expiry, realm, revocations, consumed"),
    ("authority.backends.pkcs11.backend", "Pkcs11Backend.seal_many", "pkcs11 backend"),
    ("authority.backends.pkcs11.backend", "Pkcs11Backend.unseal_many", "pkcs11 backend"),
    ("authority.backends.pkcs11._gcm", "GcmSession._run", "device: C_*Init + C_Encrypt/Decrypt"),
    ("authority.service.admission", "Gate.admit", "guard: admit"),
    ("authority.service.admission", "Gate.request", "guard: request deadline"),
    ("authority.service.admission", "Gate.charge", "guard: rate limit"),
    ("authority.service.admission", "Gate.observe", "guard: latency metric"),
]


def wrap_parts(spent: dict[str, float]) -> None:
    """Replace each layer of ``PARTS`` by a wrapper adding its thread CPU to ``spent``."""
    import importlib

    for module_name, path, label in PARTS:
        owner: Any = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, name, _timed(getattr(owner, name), label, spent))


def _timed(fn: Callable[..., Any], label: str,
           spent: dict[str, float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start
    return timed


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread id and name."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        out[f"{name}[{task.name}]"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def one_run(method: str, seconds: float, inflight: int, parts: bool) -> dict[str, float]:
    """µs of CPU per call: per server thread (the busiest first), in total and per part."""
    from authority.service.server import build_server

    spent: dict[str, float] = collections.defaultdict(float)
    if parts:
        wrap_parts(spent)
    state = Path(tempfile.mkdtemp(prefix="unary-profile-"))
    config = Config(state_dir=state, keys=KeyPolicy(maintenance_interval=3600.0),
                    server=ServerSettings(listen="127.0.0.1:0", metrics_listen=""))
    running = build_server(config)
    try:
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, f"127.0.0.1:{running.port}", method, str(seconds),
             str(inflight)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=ROOT)
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        spent.clear()
        before = thread_cpu()
        client.stdin.write("\n")
        client.stdin.flush()
        calls = int(client.stdout.readline())
        after = thread_cpu()
        client.wait(30)
    finally:
        running.stop(0)
        shutil.rmtree(state, ignore_errors=True)
    out = {f"thread {k}": (after[k] - before.get(k, 0.0)) / calls * 1e6 for k in after
           if after[k] > before.get(k, 0.0)}
    out["calls/s"] = calls / seconds
    out.update({f"part {k}": v / calls * 1e6 for k, v in spent.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--methods", default="echo,issue,redeem")
    args = parser.parse_args()
    print(f"load {os.getloadavg()}, {os.cpu_count()} cpus; medians of {args.runs} runs")
    for method in args.methods.split(","):
        runs = [subprocess.run(
            [sys.executable, __file__, "--child", method, str(args.seconds),
             str(args.inflight), "1" if args.parts else "0"],
            capture_output=True, text=True, check=True, cwd=ROOT).stdout
            for _ in range(args.runs)]
        table: dict[str, list[float]] = collections.defaultdict(list)
        for text in runs:
            for line in text.splitlines():
                key, _, value = line.rpartition(" ")
                table[key].append(float(value))
        print(f"-- {method}")
        threads = sorted((k for k in table if k.startswith("thread")),
                         key=lambda k: -statistics.median(table[k]))
        for key in ["calls/s", *threads[:4], *sorted(k for k in table if k.startswith("part"))]:
            print(f"   {key:55s} {statistics.median(table[key]):9.1f}")


def child(method: str, seconds: str, inflight: str, parts: str) -> None:
    """One run in a fresh process (so ``--parts`` wrappers never leak into the next)."""
    import logging

    logging.disable(logging.WARNING)
    figures = one_run(method, float(seconds), int(inflight), parts == "1")
    named: dict[str, float] = collections.defaultdict(float)
    for key, value in figures.items():   # threads by name: "python[1234]" -> python #1, ...
        named[key] += value
    threads = sorted((k for k in named if k.startswith("thread")), key=lambda k: -named[k])
    for rank, key in enumerate(threads):
        print(f"thread #{rank} {key.split()[1].split('[')[0]} {named[key]:.1f}")
    for key, value in named.items():
        if not key.startswith("thread"):
            print(f"{key} {value:.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
