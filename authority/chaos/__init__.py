"""``ticket-authority chaos``: start real servers on loopback (real SoftHSM2, swtpm,
PostgreSQL), inject faults while bounded load runs through them, and print what held.

Every scenario is a module with ``run(work: Path, quick: bool) -> Outcome`` (core.py); load
and the definition of a wrong answer are in load.py; servers are ``ServeProcess``es
(authority/bench/serveproc.py). ``--quick`` is what CI runs; the full run and its figures are
in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from authority.chaos.core import Outcome, as_json, table

#: scenario name -> (module, what it injects); run in this order
SCENARIOS: dict[str, tuple[str, str]] = {
    "device-pkcs11": ("authority.chaos.device_pkcs11", "token directory made unreadable"),
    "device-tpm": ("authority.chaos.device_tpm", "swtpm killed, restarted on its state"),
    "device-tpm-embedded": ("authority.chaos.device_tpm_embedded", "embedded swtpm killed -9"),
    "rotation-kill": ("authority.chaos.rotation_kill", "kill -9 inside a rotation"),
    "store-faults": ("authority.chaos.store_faults", "disk full, read-only, corrupt db"),
    "pg-failover": ("authority.chaos.pg_failover", "primary killed, standby promoted"),
    "replica-kill": ("authority.chaos.replica_kill", "kill -9 / SIGSTOP of a replica"),
    "clock-step": ("authority.chaos.clock_step", "one replica's clock stepped"),
    "rolling-restart": ("authority.chaos.rolling_restart", "replicas SIGTERMed one after another"),
    "soak": ("authority.chaos.soak", "30 min mixed load, 3 replicas"),
}
#: not run unless named (``--only soak``): it takes 30 minutes
LONG = {"soak"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``chaos`` flags."""
    parser.add_argument("--quick", action="store_true",
                        help="the short version CI runs (fewer repetitions, shorter load)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run these scenarios ({', '.join(SCENARIOS)}); default: all "
                             "but soak")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--keep", action="store_true",
                        help="keep each scenario's work directory (logs, state) and print it")


def selected(only: str | None) -> list[str]:
    """The scenarios to run. Raises: ValueError naming an unknown one."""
    if not only:
        return [name for name in SCENARIOS if name not in LONG]
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    return names


def run_one(name: str, quick: bool, keep: bool = False) -> Outcome:
    """Run scenario ``name`` in a fresh work directory; a scenario that raises did not hold
    (its error in ``detail``). Never raises (but KeyboardInterrupt)."""
    module, injected = SCENARIOS[name]
    work = Path(tempfile.mkdtemp(prefix=f"ita-chaos-{name}-"))
    started = time.monotonic()
    try:
        outcome: Outcome = importlib.import_module(module).run(work, quick)
    except Exception as exc:   # a scenario's own failure is reported, not raised
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        outcome = Outcome(name, injected, detail=f"the scenario failed: {last}")
        outcome.check("the scenario ran to its end", False)
        if keep:
            traceback.print_exc()
    outcome.figures.setdefault("scenario_seconds", round(time.monotonic() - started, 1))
    if keep:
        print(f"{name}: work directory {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return outcome.conclude()


def run(args: argparse.Namespace) -> int:
    """``ticket-authority chaos``: 0 when every scenario held, 1 otherwise, 2 for bad flags."""
    try:
        names = selected(args.only)
    except ValueError as exc:
        print(f"ticket-authority chaos: {exc}", file=sys.stderr)
        return 2
    outcomes = []
    for name in names:
        print(f"chaos: {name} ...", file=sys.stderr, flush=True)
        outcomes.append(run_one(name, args.quick, args.keep))
    print(as_json(outcomes) if args.json else table(outcomes))
    return 0 if all(o.held for o in outcomes) else 1
