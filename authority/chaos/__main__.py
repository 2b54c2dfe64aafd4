"""``python -m authority.chaos``: the same as ``ticket-authority chaos``."""

from __future__ import annotations

import argparse
import sys

from authority.chaos import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authority.chaos",
                                     description="inject faults into real servers under load "
                                                 "and print what held")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
