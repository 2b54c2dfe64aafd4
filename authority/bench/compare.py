"""``--store postgresql``: one SQLite replica, one PostgreSQL replica and two PostgreSQL
replicas, running at once and measured phase by phase in turn (authority/bench/phases.py
``run_interleaved``), so that the same run compares them under the same neighbours.

Each server has a state directory of its own (a server holds its directory's lock; each has its
own embedded SoftHSM2 token): SQLite's is the run's state directory, the PostgreSQL servers' are
``bench-pg`` and ``bench-pg2`` inside it. Both PostgreSQL servers use the bench's one PostgreSQL,
each on a fresh database; the servers that are not being measured only heartbeat meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib

from authority.bench import phases
from authority.bench.database import BenchDatabase
from authority.bench.device import OneSession
from authority.bench.options import Options
from authority.bench.progress import Progress
from authority.bench.results import Results
from authority.bench.rpc import Client
from authority.bench.subject import Started, connect, file_run, start
from authority.config import Config

#: the state directory (inside the run's) of each PostgreSQL configuration
STATE_DIRS = {"pg": "bench-pg", "pg2": "bench-pg2"}


def compare_stores(opts: Options, config: Config, results: Results,
                   progress: Progress, device: OneSession | None = None) -> None:
    """Start every configuration's server, run the phases interleaved, stop them, and file
    each one's figures (the first's are ``results``' own); ``device``: the one-session loop
    run in each server's unary rounds. Raises: StartupError."""
    confs = opts.configurations
    runs = [results] + [Results(opts, results.machine) for _ in confs[1:]]
    started: list[Started] = []
    with BenchDatabase(config.state_dir) as database:
        try:
            for conf, run in zip(confs, runs, strict=True):
                run.server_mode, run.server_processes, run.store = (conf.mode, conf.processes,
                                                                    conf.store)
                state_dir = config.state_dir
                if conf.label in STATE_DIRS:
                    state_dir = state_dir / STATE_DIRS[conf.label]
                    state_dir.mkdir(mode=0o700, exist_ok=True)
                started.append(start(opts, state_dir, conf, database,
                                     progress.tagged(f"[{conf.label}] ")))
            asyncio.run(_interleaved(started, runs, opts, progress, device))
        finally:
            for one, run in zip(started, runs, strict=False):
                one.stop(run)
    for index, (conf, run) in enumerate(zip(confs, runs, strict=True)):
        file_run(results, run, conf, index)


async def _interleaved(started: list[Started], runs: list[Results], opts: Options,
                       progress: Progress, device: OneSession | None) -> None:
    clients: list[Client] = []
    try:
        for one in started:
            clients.append(await connect(one.subject, opts))
        await phases.run_interleaved([
            phases.Run(client, one.subject.pid, one.subject.store_size, opts, run,
                       progress.tagged(f"[{conf.label}] "), one.subject.db_pid,
                       device=device)
            for client, one, run, conf in zip(clients, started, runs, opts.configurations,
                                               strict=True)])
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
