"""The server under test: start one of the bench's own (SQLite or PostgreSQL), connect the
client to it, stop it, and file its figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authority.bench.database import BenchDatabase
from authority.bench.options import Configuration, Options
from authority.bench.progress import Progress
from authority.bench.results import Results
from authority.bench.rpc import Client
from authority.bench.server import ServerProcess
from authority.bench.storm import store_size


@dataclass
class Subject:
    """A server to measure: where it listens, its pid (CPU, RSS), how to read its store's
    size, how many replicas serve there, the bench's PostgreSQL's pid (its CPU)."""

    address: str
    pid: int | None
    store_size: Callable[[], int | None]
    replicas: int = 1
    db_pid: int | None = None


@dataclass
class Started:
    """A server the bench started, what it is (for messages) and how to measure it."""

    server: ServerProcess
    subject: Subject
    what: str

    def stop(self, run: Results) -> None:
        """Stop the server; an unclean exit is one of ``run``'s errors."""
        code = self.server.stop()
        if code not in (0, -15):
            run.errors.append(f"server ({self.what}) exited with {code}: "
                              f"{self.server.log_tail()}")


def start(opts: Options, state_dir: Path, conf: Configuration, database: BenchDatabase,
          progress: Progress) -> Started:
    """Start the server of ``conf`` on ``state_dir`` (PostgreSQL: on a fresh database of
    ``database``). Raises: StartupError (it or PostgreSQL did not start)."""
    what = f"server.mode = {conf.mode}" + (
        "" if conf.processes is None else f", server.processes = {conf.processes}")
    tables, db_pid = "", None
    db_path = state_dir / "authority.db"
    size: Callable[[], int | None] = lambda: store_size(db_path)  # noqa: E731
    if conf.store == "postgresql":
        progress.say("starting PostgreSQL (a fresh database) ...")
        tables, size = database.fresh()
        db_pid, what = database.pid, what + ", on PostgreSQL"
    progress.say(f"starting the server (a subprocess, {what}) ...")
    server = ServerProcess.start(state_dir, opts.backend, conf.mode, processes=conf.processes,
                                 tables=tables)
    return Started(server, Subject(server.address, server.pid, size, conf.processes or 1,
                                   db_pid), what)


async def connect(subject: Subject, opts: Options) -> Client:
    """The client of a run against ``subject``: one channel, or ``opts.client_channels``
    spread over its replicas. Raises: StartupError, grpc.aio.AioRpcError."""
    if opts.client_channels > 1:
        return await Client.spread(subject.address, opts.client_channels, subject.replicas)
    return Client.connect(subject.address)


def file_run(results: Results, run: Results, conf: Configuration, index: int) -> None:
    """Put ``run``'s figures where they go: by mode, by process count, by store; the errors
    (and failed items) of a run that is not the first among the errors of the whole."""
    if index:   # (f) at the first server's load may overload this one: a figure, not a fault
        failed = {name: t for name, t in run.phases.items()
                  if t.failed and name != "latency_same_load"}
        for name, tally in failed.items():
            run.errors.append(f"{name}: {tally.failed:,} failed items"
                              + (f" ({tally.first_error})" if tally.first_error else ""))
        results.errors += [f"{label(conf)}: {e}" for e in run.errors]
    figures = run.mode_figures(results.rate("raw_device"))
    if conf.label:
        results.by_store[conf.label] = figures
        return
    opts = results.options
    if conf.processes == opts.process_counts[0]:
        results.by_mode[conf.mode] = figures
    if conf.mode == opts.server_modes[0] and conf.processes is not None:
        results.by_processes[str(conf.processes)] = figures


def label(conf: Configuration) -> str:
    """How errors name a configuration."""
    what = [conf.mode] + ([] if conf.processes is None else [f"{conf.processes} processes"])
    return ", ".join(what + ([conf.store] if conf.label else []))
