"""Where a unary call's server CPU goes: an aio server (the defaults, embedded SoftHSM2 token)
in this process, a client in a subprocess driving one method at N calls in flight; prints the
CPU per call of each server thread and, with ``--parts``, of the layers of the ticket path
(thread CPU time around each, so the figures are what the loop thread spent there; a layer's
figure includes the layers inside it).

    python tools/unary_profile.py [--seconds S] [--inflight N] [--runs R] [--parts]
                                  [--floor backend|raw|none|bare]
                                  [--methods echo,issue,redeem,device]

``--floor backend`` replaces the ticket path by its floor: IssueTicket and RedeemTicket each make
the one device call of a ticket (``seal``/``unseal`` of the backend, the same key, header and
size) and build a reply of the same fields, with no ticket format, key ring, checks or store; the
same server, guard and client otherwise. ``--floor raw``: the device call is the ceiling's own
(the bench's one-session python-pkcs11 decrypt, authority/bench/device.py), inline in the loop;
``--floor none``: no device call at all (what the messages alone cost); ``--floor bare``: the
backend floor's handlers in a bare grpc.aio server (gRPC's health service for echo, no
interceptor, no authority), the reference for what gRPC and the device alone allow.
What a ticket call costs over echo then is what the device call and a ticket's messages cost in
this server: no work on the ticket path can go below it. The method ``device`` is that
one-session loop alone; with ``echo`` it gives the bench's ceiling, 1/(1/echo + 1/device).

Each figure is the median of R runs; the runs of the methods are interleaved, as the machine is
shared. ``--parts`` wraps the layers (a few µs of its own per wrapper).
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


def floor_servicer(raw: Callable[[], Any] | None = None) -> None:
    """Replace IssueTicket and RedeemTicket by their floor (see the module docstring). With
    ``raw`` (the decrypt of a bench ``OneSession``), the device call is ``raw()`` in place of
    the backend's seal or unseal."""
    from authority._proto.ticketauthority.v1 import authority_pb2
    from authority.service.servicers import TicketAuthorityServicer
    from authority.ticket_format import HEADER_LEN, encode_header

    def issue(self: Any, request: Any, context: Any) -> Any:
        sealer = self._sealer
        key_id = sealer._ring.sealing_key()
        header = encode_header(key_id, sealer._backend.format_version)
        plain = request.state.SerializeToString() + bytes(40)   # about a ticket's plaintext
        if raw is not None:
            raw()
            ticket = header + bytes(12) + plain + bytes(16)
        else:
            ticket = header + sealer._backend.seal(key_id, header, plain)
        reply = authority_pb2.IssueTicketResponse(
            ticket=ticket, lifetime_seconds=3600, key_id=key_id.hex(),
            ticket_lt_opaque=bytes(4) + ticket)
        reply.expires_at.seconds = 1_800_000_000
        return reply

    def redeem(self: Any, request: Any, context: Any) -> Any:
        ticket = request.ticket
        header, key_id = ticket[:HEADER_LEN], ticket[4:HEADER_LEN]
        if raw is not None:
            raw()
            plain = ticket[HEADER_LEN + 12:-16]
        else:
            plain = self._sealer._backend.unseal(key_id, header, ticket[HEADER_LEN:])
        reply = authority_pb2.RedeemTicketResponse(result=authority_pb2.REDEEM_RESULT_OK)
        reply.state.ParseFromString(plain[:-40])
        reply.expires_at.seconds = reply.issued_at.seconds = 1_800_000_000
        reply.key_id = key_id.hex()
        reply.ticket_id = plain[-16:]
        return reply

    TicketAuthorityServicer.IssueTicket = issue   # type: ignore[method-assign]
    TicketAuthorityServicer.RedeemTicket = redeem   # type: ignore[method-assign]


class BareServer:
    """``--floor bare``: a bare grpc.aio server in a thread of its own (no interceptor, no
    authority): gRPC's own health service for echo, and IssueTicket/RedeemTicket answered by
    ``floor_servicer``'s handlers, whose device call is a backend ``seal``/``unseal`` (one
    session, the GIL kept, as the aio server's inline calls) under a key made for the run."""

    def __init__(self, config: Config) -> None:
        import asyncio
        import os
        import threading
        from dataclasses import replace

        from authority.app import pkcs11_settings, prepare_state_dir
        from authority.backends.pkcs11 import Pkcs11Backend

        prepare_state_dir(config.state_dir)
        self.backend = Pkcs11Backend.open(replace(pkcs11_settings(config), sessions=1,
                                                  release_gil=False))
        self.key_id = os.urandom(8)
        self.backend.create_key(self.key_id)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> int:
        import grpc.aio
        from grpc_health.v1 import health, health_pb2_grpc

        from authority._proto.ticketauthority.v1 import authority_pb2_grpc
        from authority.service.servicers import TicketAuthorityServicer

        bare = self

        class Ring:
            def sealing_key(self) -> bytes:
                return bare.key_id

        class Sealer:
            _ring, _backend = Ring(), bare.backend

        class Floor(authority_pb2_grpc.TicketAuthorityServicer):  # type: ignore[misc]
            _sealer = Sealer()

            async def IssueTicket(self, request: Any, context: Any) -> Any:  # noqa: N802
                return TicketAuthorityServicer.IssueTicket(self, request, context)

            async def RedeemTicket(self, request: Any, context: Any) -> Any:  # noqa: N802
                return TicketAuthorityServicer.RedeemTicket(self, request, context)

        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), self.server)
        authority_pb2_grpc.add_TicketAuthorityServicer_to_server(Floor(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return int(port)

    def stop(self, grace: float | None) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.backend.destroy_key(self.key_id)
        self.backend.close()


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


def one_run(method: str, seconds: float, inflight: int, parts: bool,
            floor: str = "") -> dict[str, float]:
    """µs of CPU per call: per server thread (the busiest first), in total and per part.
    ``floor``: "" (the ticket path), "backend", "raw", "none" (``floor_servicer``) or "bare"
    (``BareServer``)."""
    from authority.bench.device import OneSession
    from authority.service.server import build_server

    spent: dict[str, float] = collections.defaultdict(float)
    state = Path(tempfile.mkdtemp(prefix="unary-profile-"))
    config = Config(state_dir=state, keys=KeyPolicy(maintenance_interval=3600.0),
                    server=ServerSettings(listen="127.0.0.1:0", metrics_listen=""))
    one = OneSession(config) if floor == "raw" else None
    if floor:   # "none": the same replies, no device call at all
        floor_servicer(one._decrypt if one is not None else
                       (lambda: b"") if floor == "none" else None)
    if parts:
        wrap_parts(spent)
    running: Any = BareServer(config) if floor == "bare" else build_server(config)
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
        if one is not None:
            one.close()
        shutil.rmtree(state, ignore_errors=True)
    out = {f"thread {k}": (after[k] - before.get(k, 0.0)) / calls * 1e6 for k in after
           if after[k] > before.get(k, 0.0)}
    out["calls/s"] = calls / seconds
    out.update({f"part {k}": v / calls * 1e6 for k, v in spent.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--floor", choices=("", "backend", "raw", "none", "bare"), default="",
                        help="the ticket calls' floor: only their device call (see above)")
    parser.add_argument("--methods", default="echo,issue,redeem,device")
    args = parser.parse_args()
    print(f"{machine()}; load {os.getloadavg()}; medians of {args.runs} runs, interleaved"
          + (f"; FLOOR ({args.floor}): ticket calls make only their device call"
             if args.floor else ""))
    methods = args.methods.split(",")
    tables: dict[str, dict[str, list[float]]] = {
        m: collections.defaultdict(list) for m in methods}
    for _ in range(args.runs):   # one run of each method in turn: the machine's load is shared
        for method in methods:
            text = subprocess.run(
                [sys.executable, __file__, "--child", method, str(args.seconds),
                 str(args.inflight), "1" if args.parts else "0", args.floor or "-"],
                capture_output=True, text=True, check=True, cwd=ROOT).stdout
            for line in text.splitlines():
                key, _, value = line.rpartition(" ")
                tables[method][key].append(float(value))
    for method, table in tables.items():
        print(f"-- {method}")
        threads = sorted((k for k in table if k.startswith("thread")),
                         key=lambda k: -statistics.median(table[k]))
        for key in ["calls/s", *threads[:4], *sorted(k for k in table if k.startswith("part"))]:
            print(f"   {key:55s} {statistics.median(table[key]):9.1f}")
    if {"echo", "device"} <= set(tables):
        rate = {m: statistics.median(t["calls/s"]) for m, t in tables.items()}
        ceiling = 1 / (1 / rate["echo"] + 1 / rate["device"])
        print(f"ceiling 1/(1/echo + 1/device) {ceiling:9.1f} calls/s")
        for method in ("issue", "redeem"):
            if method in rate:
                print(f"{method} / ceiling {rate[method] / ceiling:6.2f}")


def machine() -> str:
    """The CPU model and count, for the figures' context."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cpus"


def device_run(seconds: float) -> dict[str, float]:
    """The one-session device loop of the bench's ceiling (authority/bench/device.py), on an
    embedded token of its own: decrypts/s and the CPU µs of each."""
    from authority.bench.device import OneSession

    state = Path(tempfile.mkdtemp(prefix="unary-profile-"))
    try:
        loop = OneSession(Config(state_dir=state))
        try:
            loop.run(min(seconds, 0.5))   # warm
            tally = loop.run(seconds)
        finally:
            loop.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return {"calls/s": tally.ok / tally.seconds,
            "thread #0 python": tally.client_cpu / tally.ok * 1e6}


def child(method: str, seconds: str, inflight: str, parts: str, floor: str) -> None:
    """One run in a fresh process (so ``--parts`` wrappers never leak into the next)."""
    import logging

    logging.disable(logging.WARNING)
    if method == "device":
        for key, value in device_run(float(seconds)).items():
            print(f"{key} {value:.1f}")
        return
    figures = one_run(method, float(seconds), int(inflight), parts == "1",
                      "" if floor == "-" else floor)
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
        child(*sys.argv[2:7])
    else:
        main()
