"""(e) The failover storm, and what its tickets cost the consumed-ticket store.

N tickets are issued beforehand (IssueTickets batches, not timed), then redeemed as fast as
possible through pipelined RedeemTicketStream batches (timed, server RSS sampled). Afterwards
every ticket is consumed (RedeemTickets with consume=True) and the store's growth (the SQLite
files, or PostgreSQL's consumed table) is divided by the entries added.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authority.bench.loops import StreamPlan, Tally, Tick, drain, streams
from authority.bench.procstat import CpuMeter, RssSampler, tree_mb
from authority.bench.rpc import Client, batch_items
from authority.bench.workload import issue_batches, redeem_batches, redeemed_ok


@dataclass
class StormRun:
    """Pre-issue, storm and consume tallies; server memory; store growth."""

    issued: Tally
    storm: Tally
    tickets: int
    peak_rss_mb: float | None = None
    vmhwm_mb: float | None = None
    consume: Tally | None = None
    store_growth: int | None = None

    @property
    def store_bytes_per_ticket(self) -> float | None:
        """Store growth per consumed-ticket entry (None when not measured)."""
        if self.store_growth is None or self.consume is None or not self.consume.ok:
            return None
        return self.store_growth / self.consume.ok


async def pre_issue(client: Client, count: int, batch_size: int, concurrency: int,
                    tick: Tick | None) -> tuple[list[bytes], Tally]:
    """Issue ``count`` tickets with IssueTickets batches; return them and the tally."""
    tickets: list[bytes] = []
    tally = await drain(issue_batches(count, batch_size), client.issue_into(tickets),
                        concurrency, batch_items, tick)
    return tickets, tally


async def redeem_storm(client: Client, tickets: list[bytes], batch_size: int,
                       concurrency: int, server_pid: int | None,
                       tick: Tick | None, db_pid: int | None = None
                       ) -> tuple[Tally, float | None]:
    """Redeem every ticket once through ``concurrency`` pipelined streams; return the tally
    (with CPU; the database's too with ``db_pid``) and the peak server VmRSS sampled
    meanwhile."""
    queue = iter(redeem_batches(tickets, batch_size))
    plan = StreamPlan(open=client.redeem_stream, next_request=lambda: next(queue, None),
                      check=redeemed_ok, items=batch_items)
    with RssSampler(server_pid) as rss, CpuMeter(server_pid, db_pid) as meter:
        tally = await streams(plan, concurrency, tick)
    meter.charge(tally)
    return tally, rss.peak_mb


async def consume_all(client: Client, tickets: list[bytes], batch_size: int,
                      concurrency: int, size: Callable[[], int | None],
                      tick: Tick | None) -> tuple[Tally, int | None]:
    """Consume every ticket (RedeemTickets, consume=True); return the tally and the growth in
    bytes of the store as ``size`` reads it (``store_size`` of the SQLite file, or PostgreSQL's
    consumed table), when it can."""
    before = size()
    tally = await drain(redeem_batches(tickets, batch_size, consume=True),
                        client.redeem_request, concurrency, batch_items, tick)
    after = size()
    growth = after - before if before is not None and after is not None else None
    return tally, growth


def store_size(db_path: Path | None) -> int | None:
    """Bytes of the database and its WAL after a TRUNCATE checkpoint (from our own
    connection; SQLite allows it while the server is idle), or None if unreadable."""
    if db_path is None or not db_path.exists():
        return None
    try:
        db = sqlite3.connect(db_path, timeout=30)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    wal = db_path.with_name(db_path.name + "-wal")
    return db_path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def server_memory(server_pid: int | None) -> float | None:
    """The peak resident size so far (VmHWM) of the server and its child processes, MB."""
    return tree_mb(server_pid, "VmHWM")
