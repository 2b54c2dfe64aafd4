"""The flags of ``ticket-authority bench`` and the settings they resolve to."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONCURRENCY = 8
DEFAULT_BATCH = 100
DEFAULT_STORM = 100_000
QUICK_STORM = 20_000
DEFAULT_DURATION = 5.0
QUICK_DURATION = 1.5
MAX_BATCH = 1000  # the server's default server.max_batch_items
STORES = ("sqlite", "postgresql")
#: ``--store postgresql``: (label, store, server.processes) of each configuration, in order;
#: the first (one SQLite replica) is the baseline the PostgreSQL targets compare with
STORE_RUNS = (("sqlite", "sqlite", 1), ("pg", "postgresql", 1), ("pg2", "postgresql", 2))


@dataclass(frozen=True)
class Configuration:
    """One server the gRPC phases run against: its mode, store and server.processes."""

    label: str                 # "" (not a store comparison), or a STORE_RUNS label
    mode: str
    store: str                 # "sqlite" or "postgresql"
    processes: int | None      # None: the server's default


@dataclass(frozen=True)
class Options:
    """What one bench run does, with --quick and the defaults applied."""

    address: str | None        # a running server; None: start our own
    backend: str               # "pkcs11" or "tpm" (own server only)
    state_dir: Path | None     # None: a temporary directory, removed afterwards
    concurrency: int           # calls (or streams) in flight
    batch_size: int            # items per batch / stream message
    storm_tickets: int
    duration: float            # seconds per measured phase
    quick: bool
    json: bool
    progress: bool
    pool_size: int = 2000      # distinct tickets cycled by the redeem phases
    server_mode: str = "auto"  # "auto", "aio", "threads" or "both" (own server only)
    server_processes: tuple[int, ...] = ()  # server.processes of each run (own server
                                            # only); (): the server's default, one run
    stores: tuple[str, ...] = ("sqlite",)   # ("sqlite", "postgresql"): the STORE_RUNS

    @property
    def server_modes(self) -> list[str]:
        """The server modes measured, the first one's figures at the top level."""
        return ["aio", "threads"] if self.server_mode == "both" else [self.server_mode]

    @property
    def process_counts(self) -> list[int | None]:
        """The server.processes measured, the first one's figures at the top level (None:
        the server's default)."""
        return list(self.server_processes) or [None]

    @property
    def compare_stores(self) -> bool:
        """True for ``--store postgresql``: the three STORE_RUNS in one run."""
        return "postgresql" in self.stores

    @property
    def configurations(self) -> list[Configuration]:
        """Each server measured, in order: the first one's figures are the top level. Modes
        times process counts; with ``--store postgresql`` the STORE_RUNS instead."""
        if self.compare_stores:
            mode = self.server_modes[0]
            return [Configuration(label, mode, store, count)
                    for label, store, count in STORE_RUNS]
        return [Configuration("", mode, "sqlite", count)
                for mode in self.server_modes for count in self.process_counts]

    @property
    def client_channels(self) -> int:
        """Connections the client spreads its calls over: 1, or with several server
        processes in the run 2 per process of the largest count, evenly over the replicas
        (one connection stays with one replica), the same for every count of the run."""
        largest = max((c.processes or 1 for c in self.configurations), default=1)
        return 1 if largest <= 1 else 2 * largest

    @property
    def own_server(self) -> bool:
        """True when the bench starts (and stops) its own server."""
        return self.address is None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench flags to ``parser`` (a subcommand parser of ``ticket-authority``)."""
    parser.add_argument("--address", metavar="HOST:PORT",
                        help="measure a running server (default: start one as a subprocess; "
                             "the raw device rate needs its own server and is skipped)")
    parser.add_argument("--backend", choices=["pkcs11", "tpm"], default="pkcs11",
                        help="key device of the server the bench starts (default pkcs11)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="state directory (default: a temporary one, removed afterwards); "
                             "with --address: that server's, for its RSS and store size")
    parser.add_argument("--concurrency", type=_positive_int, default=DEFAULT_CONCURRENCY,
                        metavar="N", help=f"calls or streams in flight "
                                          f"(default {DEFAULT_CONCURRENCY})")
    parser.add_argument("--batch-size", type=_batch_size, default=DEFAULT_BATCH, metavar="N",
                        help=f"items per batch or stream message (default {DEFAULT_BATCH}, "
                             f"at most {MAX_BATCH})")
    parser.add_argument("--storm-tickets", type=_positive_int, metavar="N",
                        help=f"tickets of the failover storm (default {DEFAULT_STORM}; "
                             f"--quick: {QUICK_STORM})")
    parser.add_argument("--duration", type=_positive_float, metavar="S",
                        help=f"seconds per measured phase (default {DEFAULT_DURATION:g}; "
                             f"--quick: {QUICK_DURATION:g})")
    parser.add_argument("--server-mode", choices=["auto", "aio", "threads", "both"],
                        default="auto",
                        help="server.mode of the server the bench starts (default auto, the "
                             "server's default); both: the gRPC phases once per mode, aio's "
                             "figures at the top level and a comparison table")
    parser.add_argument("--server-processes", type=_process_counts, default=(),
                        metavar="N[,N...]",
                        help="server.processes of the server the bench starts (default: the "
                             "server's); several: the gRPC phases once per count in the same "
                             "run, the first's figures at the top level and a comparison "
                             "table; with a count above 1 the client spreads its calls over "
                             "2 connections per process, evenly over the replicas")
    parser.add_argument("--store", type=_stores, default=("sqlite",),
                        metavar="sqlite|postgresql",
                        help="state store of the server the bench starts (default sqlite); "
                             "postgresql (or sqlite,postgresql): the gRPC phases against one "
                             "SQLite replica, one PostgreSQL replica and two PostgreSQL "
                             "replicas (server.processes = 2), running at once and "
                             "measured phase by phase in turn, on a "
                             "PostgreSQL the bench starts and removes (Debian's postgresql "
                             "package), SQLite's figures at the top level, PostgreSQL's as "
                             "pg_* and pg2_*, with the issue's two PostgreSQL targets")
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    parser.add_argument("--json", action="store_true",
                        help="print only JSON on stdout (progress stays on stderr)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from(args: argparse.Namespace) -> Options:
    """Resolve parsed flags into ``Options`` (--quick picks the smaller defaults).

    Raises: ConfigError naming ``--store`` when PostgreSQL is asked for with flags it cannot
    go with."""
    storm = args.storm_tickets or (QUICK_STORM if args.quick else DEFAULT_STORM)
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    stores = getattr(args, "store", ("sqlite",))
    if "postgresql" in stores:
        _check_postgresql(args)
    return Options(address=args.address, backend=args.backend, state_dir=args.state_dir,
                   concurrency=args.concurrency, batch_size=args.batch_size,
                   storm_tickets=storm, duration=duration, quick=args.quick, json=args.json,
                   progress=not args.no_progress, server_mode=args.server_mode,
                   server_processes=args.server_processes, stores=stores)


def _check_postgresql(args: argparse.Namespace) -> None:
    """``--store postgresql`` needs the bench's own SoftHSM2 server, one server mode, and
    sets the process counts itself. Raises: ConfigError."""
    from authority.errors import ConfigError

    if args.address is not None:
        raise ConfigError("--store", "postgresql needs the bench's own servers (no --address)")
    if args.backend != "pkcs11":
        raise ConfigError("--store", "postgresql cannot be used with --backend tpm (a TPM "
                                     "binds its keys to one chip; replicas share a token)")
    if args.server_processes:
        raise ConfigError("--store", "postgresql measures 1 SQLite replica, 1 and 2 "
                                     "PostgreSQL replicas itself: drop --server-processes")
    if args.server_mode == "both":
        raise ConfigError("--store", "postgresql runs one server mode: give --server-mode "
                                     "aio, threads or auto, not both")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _batch_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"at most {MAX_BATCH} (server.max_batch_items)")
    return value


def _stores(text: str) -> tuple[str, ...]:
    """``--store``: sqlite, postgresql or both (comma-separated); PostgreSQL always comes with
    the SQLite baseline."""
    names = {part.strip().lower() for part in text.split(",")}
    unknown = names - set(STORES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sqlite, postgresql or sqlite,postgresql; got "
                                         f"{text!r}")
    return STORES if "postgresql" in names else ("sqlite",)


def _process_counts(text: str) -> tuple[int, ...]:
    """``--server-processes``: comma-separated counts, 1..64 each, no repeats."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, got {text!r}"
                                         ) from None
    if not all(1 <= n <= 64 for n in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"distinct counts in 1..64, got {text!r}")
    return counts
