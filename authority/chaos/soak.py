"""Scenario 8, soak: three replicas (one SoftHSM2 token, one PostgreSQL) under mixed load for 30
minutes (``--quick``: 2): unary issue/redeem/consume across replicas (load.py's checks), batches
of 50 issued on one replica and redeemed on another, a scheduled rotation every 3 minutes, an
admin revocation every 2 minutes (its ticket must then redeem REVOKED everywhere). Every 10 s
the RSS of every process of each replica (the server and its device processes) is sampled; a
probe redeem every 50 ms gives each minute's p99.

Expected: 0 wrong answers; each process's RSS flat after warm-up (the first 5 minutes, 1 in
``--quick``): a least-squares slope under 1 MB per 10 minutes; every minute's p99 within 2x of
the first minute's. Not in CI; docs/reliability.md has the figures.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import grpc

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2, authority_pb2_grpc
from authority.bench.serveproc import ServeProcess
from authority.chaos.core import Outcome
from authority.chaos.load import Load
from authority.chaos.replicas import settings
from authority.devdb import child_pids

NAME = "soak"
SAMPLE = 10.0            # seconds between RSS samples
PROBE = 0.05             # seconds between probe redeems
SLOPE_BOUND = 1.0        # MB per 10 minutes
P99_RATIO = 2.0
ROTATION = 180           # keys.rotation_period
REVOKE_EVERY = 120.0
BATCH = 50
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
OK = authority_pb2.REDEEM_RESULT_OK


def run(work: Path, quick: bool, minutes: float | None = None) -> Outcome:
    """Raises: StartupError (PostgreSQL), AssertionError (a replica did not start)."""
    from authority import devdb
    from authority.backends.softhsm import provision_embedded_token

    minutes = minutes or (2.0 if quick else 30.0)
    warm = 1.0 if minutes < 10 else 5.0
    out = Outcome(NAME, f"{minutes:.0f} min mixed load, 3 replicas")
    with devdb.DevPostgres.launch() as database:
        dsn_file = work / "dsn"
        dsn_file.write_text(database.dsn(database.create_database()))
        dsn_file.chmod(0o600)
        token = provision_embedded_token(work / "hsm")
        keys = f"rotation_period = {ROTATION}\n"
        replicas = [ServeProcess(work, n, settings(work / n, token, dsn_file, keys))
                    for n in "abc"]
        try:
            for replica in replicas:
                replica.serve()
            _soak(out, replicas, minutes * 60.0, warm * 60.0)
        finally:
            for replica in replicas:
                replica.stop()
    return out


def _soak(out: Outcome, replicas: list[ServeProcess], seconds: float, warm: float) -> None:
    stop = threading.Event()
    rss: dict[str, list[tuple[float, float]]] = defaultdict(list)
    probes: dict[int, list[float]] = defaultdict(list)
    extra = {"revocations": 0, "revocation_wrong": 0, "batches": 0, "batch_wrong": 0}
    start = time.monotonic()
    threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in (
        (_sample_rss, (replicas, rss, start, stop)),
        (_probe, (replicas, probes, start, stop)),
        (_batches_and_revocations, (replicas, extra, stop)))]
    with Load([_stub(r) for r in replicas], max_calls=10**9,
              max_seconds=seconds, pause=0.01) as load:
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    tally = load.tally
    out.calls = tally.calls + extra["batches"] * 2 * BATCH + extra["revocations"] * 2
    out.wrong = len(tally.wrong) + extra["revocation_wrong"] + extra["batch_wrong"]
    out.detail = "; ".join(tally.wrong[:3])
    _judge_rss(out, rss, warm)
    _judge_p99(out, probes)
    out.figures.update({k: float(v) for k, v in extra.items()})
    out.figures["rotations_seen"] = float(_rotations(replicas[0]))
    out.check("a scheduled rotation happened", out.figures["rotations_seen"] >= 1
              or seconds < ROTATION)
    out.check("batches ran", extra["batches"] > 0)
    out.check("admin revocations ran", extra["revocations"] > 0 or seconds < REVOKE_EVERY + 5)


def _stub(replica: ServeProcess) -> Callable[[], authority_pb2_grpc.TicketAuthorityStub]:
    return lambda: replica.tickets


def _processes(replica: ServeProcess) -> dict[str, int]:
    """The replica's server process and its children (device processes), by a label."""
    assert replica.proc is not None
    found = {f"{replica.name}:server": replica.proc.pid}
    for i, pid in enumerate(sorted(child_pids(replica.proc.pid))):
        found[f"{replica.name}:child{i}"] = pid
    return found


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _sample_rss(replicas: list[ServeProcess], rss: dict[str, list[tuple[float, float]]],
                start: float, stop: threading.Event) -> None:
    while not stop.is_set():
        for replica in replicas:
            for label, pid in _processes(replica).items():
                value = _rss_mb(pid)
                if value is not None:
                    rss[label].append((time.monotonic() - start, value))
        stop.wait(SAMPLE)


def _probe(replicas: list[ServeProcess], probes: dict[int, list[float]], start: float,
           stop: threading.Event) -> None:
    """A redeem every PROBE seconds (rotating over the replicas), timed, by minute."""
    from authority.bench.workload import proto_state

    ticket = replicas[0].tickets.IssueTicket(
        authority_pb2.IssueTicketRequest(state=proto_state(1)), timeout=5).ticket
    n = 0
    while not stop.is_set():
        n += 1
        began = time.perf_counter()
        with contextlib.suppress(grpc.RpcError):
            replicas[n % len(replicas)].tickets.RedeemTicket(
                authority_pb2.RedeemTicketRequest(ticket=ticket), timeout=5)
        probes[int((time.monotonic() - start) // 60)].append(time.perf_counter() - began)
        stop.wait(PROBE)


def _batches_and_revocations(replicas: list[ServeProcess], extra: dict[str, int],
                             stop: threading.Event) -> None:
    from authority.bench.workload import issue_request

    n, next_revoke = 0, time.monotonic() + REVOKE_EVERY
    while not stop.is_set():
        n += 1
        issuer, redeemer = replicas[n % 3], replicas[(n + 1) % 3]
        try:
            issued = issuer.tickets.IssueTickets(authority_pb2.IssueTicketsRequest(
                items=[issue_request(n * BATCH + i) for i in range(BATCH)]), timeout=10)
            redeemed = redeemer.tickets.RedeemTickets(authority_pb2.RedeemTicketsRequest(
                items=[authority_pb2.RedeemTicketRequest(ticket=i.ticket.ticket)
                       for i in issued.items if i.WhichOneof("outcome") == "ticket"]),
                timeout=10)
            extra["batches"] += 1
            extra["batch_wrong"] += sum(1 for i in redeemed.items
                                        if i.WhichOneof("outcome") == "redeemed"
                                        and i.redeemed.result != OK)
        except grpc.RpcError:
            pass
        if time.monotonic() >= next_revoke:
            next_revoke += REVOKE_EVERY
            _revoke_one(replicas, n, extra)
        stop.wait(0.5)


def _revoke_one(replicas: list[ServeProcess], n: int, extra: dict[str, int]) -> None:
    """Revoke a fresh ticket by its id on one replica; it must redeem REVOKED on all (within
    the propagation bound: a few heartbeats)."""
    from authority.bench.workload import issue_request

    try:
        issued = replicas[n % 3].tickets.IssueTicket(issue_request(10**6 + n), timeout=5)
        redeemed = replicas[n % 3].tickets.RedeemTicket(
            authority_pb2.RedeemTicketRequest(ticket=issued.ticket), timeout=5)
        replicas[(n + 1) % 3].admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(
            ticket_id=redeemed.ticket_id, reason="soak"), timeout=5)
    except grpc.RpcError:
        return
    extra["revocations"] += 1
    time.sleep(2.0)
    for replica in replicas:
        try:
            result = replica.tickets.RedeemTicket(
                authority_pb2.RedeemTicketRequest(ticket=issued.ticket), timeout=5).result
        except grpc.RpcError:
            continue
        extra["revocation_wrong"] += result != REVOKED


def _slope_mb_per_10min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per 10 minutes."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 600.0


def _judge_rss(out: Outcome, rss: dict[str, list[tuple[float, float]]], warm: float) -> None:
    for label, points in sorted(rss.items()):
        after = [p for p in points if p[0] >= warm]
        if len(after) < 3:
            out.check(f"RSS of {label} sampled after warm-up", False)
            continue
        slope = _slope_mb_per_10min(after)
        out.figures[f"rss_{label}_mb_end"] = round(after[-1][1], 1)
        out.figures[f"rss_{label}_slope_mb_per_10min"] = round(slope, 3)
        out.check(f"RSS of {label} flat after warm-up: {slope:+.2f} MB per 10 min "
                  f"(bound {SLOPE_BOUND})", slope < SLOPE_BOUND)


def _judge_p99(out: Outcome, probes: dict[int, list[float]]) -> None:
    minutes = sorted(m for m, v in probes.items() if len(v) >= 20)
    if not minutes:
        out.check("probe redeems were timed", False)
        return
    p99 = {m: statistics.quantiles(probes[m], n=100)[98] * 1000 for m in minutes}
    first = p99[minutes[0]]
    worst = max(p99.values())
    out.figures.update({"p99_first_minute_ms": round(first, 2), "p99_worst_minute_ms":
                        round(worst, 2), "minutes": float(len(minutes))})
    out.check(f"every minute's p99 within {P99_RATIO}x of the first's ({first:.1f} ms; "
              f"worst {worst:.1f} ms)", worst <= P99_RATIO * first)


def _rotations(replica: ServeProcess) -> int:
    try:
        keys = replica.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=True),
                                      timeout=5).keys
    except grpc.RpcError:
        return 0
    return max(0, len(keys) - 1)
