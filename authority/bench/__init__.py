"""``ticket-authority bench``: how fast the authority issues and redeems on this machine, against
an echo baseline, the raw device and the issue's targets. See docs/benchmarks.md.

Hook it into a command line with ``add_arguments(parser)`` and ``run(args)``; or call
``main(argv)`` (also ``python -m authority.bench``). Importing this package is cheap: gRPC,
the device and ``cryptography`` are loaded only when a run starts.
"""

from __future__ import annotations

import argparse

from authority.bench.options import add_arguments

__all__ = ["add_arguments", "main", "run"]


def run(args: argparse.Namespace) -> int:
    """Run the bench for flags parsed by a parser given ``add_arguments``; the exit status."""
    from authority.bench.runner import run as run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run; the exit status."""
    from authority.bench.runner import main as run_main

    return run_main(argv)
