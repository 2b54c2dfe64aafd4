"""The ticket-authority command: serve, and admin commands as gRPC clients of TicketAdmin."""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from authority import __version__
from authority.admin_cli import DEFAULT_ADDRESS, admin_channel, resolve_address
from authority.admin_cli import run as run_admin
from authority.errors import ConfigError, DeviceUnavailable, StartupError

if TYPE_CHECKING:
    from authority.config import Config

__all__ = ["DEFAULT_ADDRESS", "admin_channel", "build_parser", "main", "resolve_address"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help=f"server address (default {DEFAULT_ADDRESS})")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="state directory (default ~/.local/state/ticket-authority)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ticket-authority",
        description="IKEv2 session-resumption ticket authority: serve, and the admin commands "
                    "(gRPC clients of TicketAdmin).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the authority (embedded SoftHSM2 token by default)")
    _common(serve)
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="Prometheus endpoint (default 127.0.0.1:9464; '' turns it off)")
    serve.add_argument("--backend", choices=["pkcs11", "tpm"],
                       help="key device (default pkcs11: the embedded SoftHSM2 token; tpm: an "
                            "embedded swtpm unless tpm.tcti is set)")
    clients = _admin_parsers(sub)
    certs = sub.add_parser("certs", help="development certificates for mTLS")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create a CA, a server certificate and one gateway "
                                             "and one admin client certificate in DIR")
    init.add_argument("directory", type=Path, metavar="DIR")
    init.add_argument("--trust-domain", default="example.org",
                      help="SPIFFE trust domain of the client URIs (default example.org)")
    init.add_argument("--server-name", default="localhost",
                      help="extra DNS name or IP of the server certificate (it always has "
                           "localhost, 127.0.0.1 and ::1)")
    audit = sub.add_parser("audit", help="check the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser(
        "verify", help="check the hash chain of an audit log, or of the database with "
                       "[postgresql] (exit 1 naming the first bad line or seq)")
    audit_verify.add_argument("file", type=Path, metavar="FILE", nargs="?",
                              help="the audit log (default: the configuration's audit_log, "
                                   "else STATE_DIR/audit.log)")
    audit_verify.add_argument("--state-dir", type=Path, metavar="DIR",
                              help="state directory (default ~/.local/state/ticket-authority)")
    audit_verify.add_argument("--config", type=Path, metavar="FILE",
                              help="TOML configuration file (its audit_log and state_dir; "
                                   "with [postgresql], the chain in the database)")
    from authority.bench import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="measure rates, latency and the targets on "
                                                 "this machine (docs/benchmarks.md)"))
    from authority.chaos import add_arguments as chaos_arguments

    chaos_arguments(sub.add_parser("chaos", help="inject faults into real servers under load "
                                                 "and print what held (docs/reliability.md)"))
    from authority.doctor import add_arguments as doctor_arguments

    doctor_arguments(sub.add_parser(
        "doctor", help="check the device, store, certificates, clock, file permissions and "
                       "replicas of this configuration, read-only (exit 0 OK, 1 a warning, "
                       "2 a failure)"))
    from authority.demo import configure_parser as configure_demo

    configure_demo(sub.add_parser("demo", help="resume an IKE SA on a second gateway through the "
                                               "authority (real IKE_SESSION_RESUME over UDP)"))
    for p in clients:
        _common(p)
        _client_flags(p)
    return parser


def _admin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                   ) -> list[argparse.ArgumentParser]:
    """The keys, status, tickets and policy parsers; returns those that call the server."""
    keys = sub.add_parser("keys", help="list, rotate or retire ticket protection keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    listing = keys_sub.add_parser("list", help="list keys")
    listing.add_argument("--all", action="store_true", help="include destroyed keys")
    rotate = keys_sub.add_parser("rotate", help="generate a new sealing key in the device")
    retire = keys_sub.add_parser("retire", help="destroy a decrypt-only key in the device now")
    retire.add_argument("key_id", help="16 hex digits, from 'keys list'")
    status = sub.add_parser("status", help="show backend, sealing key and counters")
    from authority.cluster_cli import add_parsers as cluster_parsers

    return [listing, rotate, retire, status, *_tickets_parsers(sub), *_policy_parsers(sub),
            *cluster_parsers(sub)]


def _tickets_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                     ) -> list[argparse.ArgumentParser]:
    tickets = sub.add_parser("tickets", help="revoke tickets, list revocations")
    tickets_sub = tickets.add_subparsers(dest="tickets_command", required=True)
    revoke = tickets_sub.add_parser(
        "revoke", help="tickets issued so far that match one selector redeem as REVOKED until "
                       "they expire")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--id-i", metavar="HEX",
                       help="the initiator's identity: hex of the whole IDi payload body (ID "
                            "type octet, 3 reserved octets, data), e.g. 02000000 + the FQDN")
    which.add_argument("--old-sa", metavar="SPI_I_HEX:SPI_R_HEX",
                       help="the IKE SA the tickets were issued for (8-octet SPIs)")
    which.add_argument("--ticket-id", metavar="HEX",
                       help="a 16-octet ticket id or the 40-octet redeem handle")
    which.add_argument("--issued-before", metavar="ISO8601",
                       help="every ticket issued before this time (UTC unless given an offset)")
    revoke.add_argument("--reason", default="", metavar="TEXT",
                        help="kept with the revocation and audited (at most 256 characters)")
    revocations = tickets_sub.add_parser("revocations", help="list live revocations")
    return [revoke, revocations]


def _policy_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                    ) -> list[argparse.ArgumentParser]:
    policy = sub.add_parser("policy", help="realm policy epochs")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    bump = policy_sub.add_parser(
        "bump", help="bump a realm's policy epoch: its tickets issued so far redeem as REVOKED")
    bump.add_argument("realm", metavar="REALM", help="the realm ('' for the default realm)")
    listing = policy_sub.add_parser("list", help="realms whose epoch was bumped (others are 0)")
    return [bump, listing]


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=_seconds, default=10.0,
                        help="seconds, more than 0 (default 10)")
    tls = parser.add_argument_group("mTLS to the authority (an admin client certificate)")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM",
                     help="CA certificates that sign the server's certificate")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="client key")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="name to check the server's certificate against")


def _seconds(text: str) -> float:
    """A --timeout value. Raises: argparse.ArgumentTypeError unless a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"a number of seconds greater than 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status: 0; 1 when the command
    fails (an admin call the server refuses, a broken audit chain); 2 for a bad flag or setting;
    3 when the key device is unavailable.

    Raises: SystemExit (status 2) from argparse for unknown or missing arguments."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            from authority.bench import run as run_bench

            return run_bench(args)
        if args.command == "chaos":
            from authority.chaos import run as run_chaos

            return run_chaos(args)
        if args.command == "demo":
            from authority.demo import run_command

            return int(run_command(args))
        if args.command == "certs":
            return _certs(args)
        if args.command == "doctor":
            from authority.doctor import run as run_doctor

            return run_doctor(args)
        if args.command == "audit":
            return _audit_verify_command(args)
        if args.command == "cluster" and args.cluster_command in ("init", "join"):
            from authority.cluster_cli import run_local

            return run_local(args)
        return run_admin(args)
    except (ConfigError, StartupError) as exc:
        print(f"ticket-authority: {exc}", file=sys.stderr)
        return 2
    except DeviceUnavailable as exc:
        print(f"ticket-authority: device unavailable: {exc}", file=sys.stderr)
        return 3


def _serve(args: argparse.Namespace) -> int:
    from authority.service.server import serve
    from authority.settings_loader import load_config

    config = load_config(args.config, listen=args.listen, state_dir=args.state_dir,
                         log_level=args.log_level, backend=args.backend,
                         metrics_listen=args.metrics_listen)
    check_listeners_free(config)
    from authority.logs import setup as setup_logs

    setup_logs(config.log_level, config.log_format)
    from authority.crashpoints import arm_from_environment

    arm_from_environment()   # a test seam (authority/crashpoints.py): unset in production
    from authority.service.supervisor import server_processes, supervise

    if server_processes(config) > 1:   # replicas on one port (authority/service/supervisor.py)
        return supervise(config)
    serve(config)
    return 0


def check_listeners_free(config: Config) -> None:
    """Refuse to start when another process already listens on one of the TCP addresses the
    server is to listen on (server.listen, server.admin_listen, server.metrics_listen: each
    replica's with server.processes > 1): checked
    before anything is provisioned, and without asking gRPC, whose C core would log a raw
    add_port error first. Port 0, Unix sockets and names that do not resolve are left to the
    listeners themselves.

    Raises: StartupError naming the setting and the address."""
    from authority.service.supervisor import metrics_listens
    from authority.settings_loader import parse_listen

    server = config.server
    for setting, listen in (("server.listen", server.listen),
                            ("server.admin_listen", server.admin_listen),
                            *(("server.metrics_listen", m) for m in metrics_listens(config))):
        if not listen or listen.startswith("unix:"):
            continue
        host, port = parse_listen(listen, setting=setting, loopback_only=False)
        if port and _in_use(host.strip("[]"), port):
            raise StartupError(f"{setting}: cannot listen on {listen}: the address is already "
                               "in use")


def _in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` as a listener does (SO_REUSEADDR, as gRPC and the
    metrics server set it, so that a closed connection's TIME_WAIT does not count) fails
    with EADDRINUSE for any address ``host`` resolves to. Never raises."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    for family, kind, proto, _name, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
    return False


def _audit_verify_command(args: argparse.Namespace) -> int:
    """``audit verify``: FILE if given; else the chain serve keeps with these flags: the
    database's with ``[postgresql]``, else the file audit_log, else STATE_DIR/audit.log.

    Raises: ConfigError for an invalid --config."""
    if args.file:
        return _audit_verify(args.file)
    from authority.settings_loader import load_config

    config = load_config(args.config, state_dir=args.state_dir)
    if config.postgresql is not None:
        return _audit_verify_database(config)
    return _audit_verify(config.audit_log or config.state_dir / "audit.log")


def _audit_verify_database(config: Config) -> int:
    """``audit verify`` of the database's chain: 0 when it holds, 1 naming the first bad
    entry's seq, 2 when the database cannot be read (it only reads: nothing is migrated).

    Raises: StartupError for a DSN that is not one."""
    from authority.audit_pg import describe, verify_database

    assert config.postgresql is not None
    target = describe(config.postgresql)
    try:
        result = verify_database(config.postgresql)
    except DeviceUnavailable as exc:
        print(f"ticket-authority: audit verify: cannot read {target}: {exc}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"{target}: seq {result.first_bad_line}: {result.reason}")
        return 1
    print(f"{target}: OK, {result.lines} entries, chain head {result.last_hash}")
    return 0


def _audit_verify(path: Path) -> int:
    """``audit verify FILE``: 0 when the chain holds, 1 naming the first bad line, 2 when the
    file cannot be read."""
    from authority.audit import verify

    try:
        result = verify(path)
    except OSError as exc:
        print(f"ticket-authority: audit verify: cannot read {path}: {exc.strerror}",
              file=sys.stderr)
        return 2
    if not result.ok:
        print(f"{path}: line {result.first_bad_line}: {result.reason}")
        return 1
    print(f"{path}: OK, {result.lines} lines, chain head {result.last_hash}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from authority.certs import init_dev_pki, instructions

    try:
        pki = init_dev_pki(args.directory, args.trust_domain, args.server_name)
    except (FileExistsError, ValueError) as exc:
        print(f"ticket-authority: certs init: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ticket-authority: certs init: cannot write {args.directory}: {exc.strerror}",
              file=sys.stderr)
        return 2
    print(instructions(pki), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
