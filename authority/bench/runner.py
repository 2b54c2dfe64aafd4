"""``ticket-authority bench``: set up (state dir, raw device, server subprocess), run the
phases, report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from authority.bench import gateway, phases
from authority.bench.compare import compare_stores
from authority.bench.database import BenchDatabase
from authority.bench.device import OneSession, raw_device_rate
from authority.bench.machine import describe_machine, load_average, machine_lines
from authority.bench.options import Options, add_arguments, options_from
from authority.bench.progress import Progress
from authority.bench.report import render
from authority.bench.results import Results
from authority.bench.savings import measure
from authority.bench.server import child_env
from authority.bench.storm import store_size
from authority.bench.subject import Subject, connect, file_run, start
from authority.client import is_loopback
from authority.config import Config
from authority.errors import ConfigError, DeviceUnavailable, StartupError
from authority.settings_loader import load_config


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed flags; print the table (or JSON). Exit status: 0 when every
    phase ran without a failed item, 1 when something failed, 2 when it could not start."""
    try:
        opts = options_from(args)
    except ConfigError as exc:
        print(f"ticket-authority bench: {exc}", file=sys.stderr)
        return 2
    progress = Progress(opts.progress)
    results = Results(opts, describe_machine())
    progress.say(machine_lines(results.machine, {})[0])
    try:
        with _state_dir(opts) as state_dir:
            _measure(opts, state_dir, results, progress)
    except (ConfigError, StartupError, DeviceUnavailable) as exc:
        print(f"ticket-authority bench: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"ticket-authority bench: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    bar = progress.bar("(g) handshake vs resumption", 7 * _budget(opts))
    results.savings = measure(results.redeem_client_us(), _budget(opts))
    bar.close("done")
    results.machine["load_after"] = load_average()
    figures = results.figures()
    print(json.dumps(figures, indent=2) if opts.json else render(figures), flush=True)
    return 1 if figures["failures"] or results.errors else 0


def _budget(opts: Options) -> float:
    """CPU seconds per public-key operation in (g)."""
    return 0.3 if opts.quick else 1.0


@contextlib.contextmanager
def _state_dir(opts: Options) -> Iterator[Path | None]:
    """The state directory: --state-dir as given, else (own server) a temporary one that is
    removed afterwards, else (a running server without --state-dir) none."""
    if opts.state_dir is not None or not opts.own_server:
        yield opts.state_dir
        return
    path = Path(tempfile.mkdtemp(prefix="ita-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_config(state_dir: Path, backend: str) -> Config:
    """The settings of the bench's own device and server state; log level WARNING, so that
    the device processes it starts print no INFO lines among the bench's output.
    Raises: ConfigError."""
    return load_config(state_dir=state_dir, backend=backend, log_level="WARNING")


def _measure(opts: Options, state_dir: Path | None, results: Results,
             progress: Progress) -> None:
    """(d) in process, then the gRPC phases against a running server (--address) or our own,
    once per configuration (server mode, process count), the first one's figures at the top
    level; ``--store postgresql``: against its three servers at once, interleaved."""
    if not opts.own_server:
        assert opts.address is not None
        results.skipped["raw_device"] = "needs the bench's own server (no --address)"
        results.skipped["raw_device_one_session"] = results.skipped["raw_device"]
        db_path = state_dir / "authority.db" if state_dir is not None else None
        target = Subject(opts.address, _running_pid(state_dir), lambda: store_size(db_path))
        asyncio.run(_over_grpc(target, opts, results, progress))
        gateway_phase(opts.address, opts, results, progress)
        return
    assert state_dir is not None
    config = bench_config(state_dir, opts.backend)
    _raw_device(opts, config, results, progress)
    device = _one_session(config, results, progress)
    try:
        _own_servers(opts, config, results, progress, device)
    finally:
        if device is not None:
            device.close()


def _own_servers(opts: Options, config: Config, results: Results, progress: Progress,
                 device: OneSession | None) -> None:
    """The gRPC phases against the bench's own servers, one configuration after another (or
    ``--store postgresql``'s at once); (h) against the first."""
    if opts.compare_stores:
        results.skipped["gateway"] = "--store postgresql does not run (h)"
        compare_stores(opts, config, results, progress, device)
        return
    state_dir = config.state_dir
    with BenchDatabase(state_dir) as database:   # started only if a configuration needs it
        for index, conf in enumerate(opts.configurations):
            run = results if index == 0 else Results(opts, results.machine)
            run.server_mode, run.server_processes = conf.mode, conf.processes
            started = start(opts, config.state_dir, conf, database, progress)
            try:
                asyncio.run(_over_grpc(started.subject, opts, run, progress, device))
                if index == 0:
                    gateway_phase(started.subject.address, opts, run, progress)
            finally:
                started.stop(run)
            file_run(results, run, conf, index)


async def _over_grpc(target: Subject, opts: Options, results: Results,
                     progress: Progress, device: OneSession | None = None) -> None:
    client = await connect(target, opts)
    try:
        await phases.run_all(phases.Run(client, target.pid, target.store_size, opts, results,
                                        progress, target.db_pid, device=device))
    finally:
        await client.close()


def _raw_device(opts: Options, config: Config, results: Results, progress: Progress) -> None:
    """(d) the direct backend loop; a failure is reported and the other phases still run."""
    bar = progress.bar("(d) raw device", opts.duration)
    try:
        run = raw_device_rate(config, opts.batch_size, opts.duration, bar)
    except (StartupError, ConfigError):
        raise
    except Exception as exc:
        results.errors.append(f"raw device: {type(exc).__name__}: {exc}")
        bar.close(f"failed: {exc}")
        return
    results.phases["raw_device"] = run.tally
    results.device_threads = run.threads
    results.device_processes = run.processes
    if not run.tally.ok:
        results.errors.append("raw device: no ticket unsealed "
                              f"({run.tally.first_error or 'no call completed'})")
    bar.close(f"{run.tally.per_s:,.0f} tickets/s from {run.threads} thread(s)"
              + (f", error: {run.tally.first_error}" if run.tally.first_error else ""))


def _one_session(config: Config, results: Results, progress: Progress) -> OneSession | None:
    """(d) the one-session python-pkcs11 loop of the unary ceiling, opened before the server
    starts (PKCS#11 only: None otherwise, or when it fails, which is reported)."""
    if config.backend != "pkcs11":
        results.skipped["raw_device_one_session"] = "python-pkcs11 loop: PKCS#11 only"
        return None
    try:
        return OneSession(config)
    except (StartupError, ConfigError):
        raise
    except Exception as exc:
        results.errors.append(f"raw device, one session: {type(exc).__name__}: {exc}")
        progress.say(f"(d) one session: failed: {exc}")
        return None


def gateway_resumptions(opts: Options) -> int:
    """Resumptions per run of (h): 1,000 per second of ``--duration`` (5,000 by default, 1,500
    with --quick: with 600 the coalesced runs at 64 varied by 2x from run to run, with 3,000
    by 10 %); each run does at least 10 per caller."""
    return max(100, int(1000 * opts.duration))


def gateway_phase(address: str, opts: Options, results: Results, progress: Progress) -> None:
    """(h) the gateway's CPU per resumption, in a process of its own against ``address``; a
    failure is reported (errors, skipped) and the figures are null; skipped for a server
    that is not on loopback (the client library speaks plaintext only to loopback)."""
    if not is_loopback(address):
        results.skipped["gateway"] = ("the client library refuses plaintext to a "
                                      "non-loopback address")
        return
    count = gateway_resumptions(opts)
    bar = progress.bar("(h) gateway CPU", 4 * count / 1000)
    try:
        measured = gateway.run_process(address, count, child_env())
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        results.errors.append(f"gateway: {exc}")
        results.skipped["gateway"] = str(exc)
        bar.close(f"failed: {exc}")
        return
    results.gateway = measured
    results.errors += gateway.failures(measured)
    flat = gateway.figures(measured)
    bar.close(", ".join(f"x{level} {_us(flat.get(f'gateway_cpu_us_at_{level}'))}"
                        + ("" if level == 1 else
                           f" ({_us(flat.get(f'gateway_cpu_us_at_{level}_coalesced'))} "
                           "coalesced)") for level in gateway.LEVELS) + " µs CPU/resumption")


def _us(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "-"


def _running_pid(state_dir: Path | None) -> int | None:
    """The pid a running server wrote to its state dir's server.json (for RSS and CPU)."""
    if state_dir is None:
        return None
    try:
        return int(json.loads((state_dir / "server.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m authority.bench``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="ticket-authority bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
