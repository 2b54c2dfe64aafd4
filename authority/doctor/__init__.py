"""``ticket-authority doctor``: checks a host's authority against the configuration ``serve``
uses (``--config``, ``--state-dir``) and prints each check with a fix for what is wrong.

Checks: the device (module loads, token present, mechanisms, login, every ticket key's
protection attributes, the key ring's keys in the token; for the TPM backend,
authority/doctor/tpm.py; a state directory whose store records another backend than the one
given is said to be one, without the other backend's checks), the store (reachable, schema
version, free disk), certificates (valid, not expiring within 30 days, key matches, trust
domain), the clock (against PostgreSQL's, and the service clock's rules), file permissions,
and the replicas (live heartbeats, the maintenance lease).

Read-only, and safe while a server runs: nothing is provisioned (a missing embedded token is
a failure, not created), no key is made, no schema migrated, the state directory's lock is not
taken; the token is opened with one session of its own, as another replica would.

Exit code: 0 every check OK, 1 a warning (a certificate expiring within 30 days), 2 a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from authority.clock import SystemClock
from authority.config import Config
from authority.doctor.report import Check, as_json, as_text, failure, ok, worst
from authority.errors import ConfigError

__all__ = ["add_arguments", "diagnose", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``doctor`` flags: the configuration serve uses (its --state-dir, --config and
    --backend), and ``--json``."""
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="state directory (default ~/.local/state/ticket-authority)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--backend", choices=["pkcs11", "tpm"],
                        help="key device, as serve's --backend (default: the configuration's, "
                             "else pkcs11)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")


def diagnose(config: Config, config_file: Path | None = None) -> list[Check]:
    """Every check for ``config`` (loaded from ``config_file``), in the order printed. Never
    raises for what it finds: each problem is a failed check."""
    from authority.doctor.cluster import (
        check_backend,
        check_clock,
        check_ownership,
        check_replicas,
    )
    from authority.doctor.device import DeviceResult, check_device
    from authority.doctor.files import check_secrets, check_state_dir
    from authority.doctor.store import check_store
    from authority.doctor.tls import check_certificates

    wall = SystemClock().now
    checks = [check_state_dir(config), check_secrets(config, config_file)]
    facts = check_store(config, wall)   # first: the backend it records decides the device's
    other = check_backend(config, facts, config_file)
    device = DeviceResult([other]) if other is not None else check_device(config)
    checks += device.checks
    checks += facts.checks
    checks += [check_ownership(config, facts, device), check_clock(config, facts),
               check_replicas(config, facts, wall())]
    checks += check_certificates(config.tls, wall())
    return checks


def run(args: argparse.Namespace) -> int:
    """``ticket-authority doctor``: print the checks; return 0, 1 (a warning) or 2 (a
    failure). A configuration that does not load is one failed check."""
    from authority.settings_loader import load_config_for_checks

    try:
        config = load_config_for_checks(args.config, state_dir=args.state_dir,
                                        backend=args.backend)
    except ConfigError as exc:
        checks = [failure("config", str(exc), "correct the setting it names ('ticket-authority "
                                              "serve' refuses to start with it)")]
    else:
        where = args.config or "defaults and flags"
        checks = [ok("config", f"{where} loads (state_dir {config.state_dir})"),
                  *diagnose(config, args.config)]
    sys.stdout.write(as_json(checks) if args.json else as_text(checks))
    return worst(checks)
