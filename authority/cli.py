"""The ``ticket-authority`` command: serve, and admin commands as gRPC clients of TicketAdmin."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authority import __version__
from authority.errors import ConfigError, DeviceUnavailable, StartupError

DEFAULT_ADDRESS = "127.0.0.1:50051"
_STATE_NAMES = {1: "ACTIVE", 2: "DECRYPT_ONLY", 3: "DESTROYED"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help=f"server address (default {DEFAULT_ADDRESS})")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="state directory (default ~/.local/state/ticket-authority)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="ticket-authority", description=__doc__)
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
    keys = sub.add_parser("keys", help="list, rotate or retire ticket protection keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    listing = keys_sub.add_parser("list", help="list keys")
    listing.add_argument("--all", action="store_true", help="include destroyed keys")
    rotate = keys_sub.add_parser("rotate", help="generate a new sealing key in the device")
    retire = keys_sub.add_parser("retire", help="destroy a decrypt-only key in the device now")
    retire.add_argument("key_id", help="16 hex digits, from 'keys list'")
    status = sub.add_parser("status", help="show backend, sealing key and counters")
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
        "verify", help="check the hash chain of an audit log (exit 1 naming the first bad line)")
    audit_verify.add_argument("file", type=Path, metavar="FILE",
                              help="the audit log (default location: STATE_DIR/audit.log)")
    from authority.bench import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="measure rates, latency and the targets on "
                                                 "this machine (docs/benchmarks.md)"))
    from authority.demo import configure_parser as configure_demo

    configure_demo(sub.add_parser("demo", help="resume an IKE SA on a second gateway through the "
                                               "authority (real IKE_SESSION_RESUME over UDP)"))
    for p in (listing, rotate, retire, status):
        _common(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        tls = p.add_argument_group("mTLS to the authority (an admin client certificate)")
        tls.add_argument("--tls-ca", type=Path, metavar="PEM",
                         help="CA certificates that sign the server's certificate")
        tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate")
        tls.add_argument("--tls-key", type=Path, metavar="PEM", help="client key")
        tls.add_argument("--tls-server-name", metavar="NAME",
                         help="name to check the server's certificate against")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            from authority.bench import run as run_bench

            return run_bench(args)
        if args.command == "demo":
            from authority.demo import run_command

            return int(run_command(args))
        if args.command == "certs":
            return _certs(args)
        if args.command == "audit":
            return _audit_verify(args.file)
        return _admin(args)
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
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config)
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


def admin_channel(args: argparse.Namespace, address: str) -> Any:
    """A plaintext channel, or an mTLS one when any --tls-* flag is given.

    Raises: ConfigError for a half-given client certificate or an unreadable file."""
    import grpc

    if not any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)):
        return grpc.insecure_channel(address)
    from authority.client import ClientTls

    tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    try:
        credentials = tls.credentials()
    except ValueError as exc:
        raise ConfigError("--tls-cert", "give both --tls-cert and --tls-key") from exc
    except OSError as exc:
        raise ConfigError("--tls-*", f"cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.secure_channel(address, credentials, options=tls.options())


def resolve_address(args: argparse.Namespace) -> str:
    """Where a local server's admin service listens: --listen, the config's
    server.admin_listen or server.listen, the state directory's server.json (written by a
    running server; its admin_address first), else the default."""
    if args.listen:
        return str(args.listen)
    from authority.settings_loader import default_state_dir, load_config

    state_dir = args.state_dir
    if args.config:
        config = load_config(args.config, state_dir=args.state_dir)
        state_dir = config.state_dir
        if config.server.admin_listen:
            return config.server.admin_listen
        if config.server.listen != DEFAULT_ADDRESS:
            return config.server.listen
    server_file = Path(state_dir or default_state_dir()) / "server.json"
    try:
        info = json.loads(server_file.read_text())
        return str(info.get("admin_address") or info["address"])
    except (OSError, ValueError, KeyError, AttributeError):
        return DEFAULT_ADDRESS


def _admin(args: argparse.Namespace) -> int:
    import grpc

    from authority._proto.ticketauthority.v1 import admin_pb2, admin_pb2_grpc

    address = resolve_address(args)
    with admin_channel(args, address) as channel:
        stub = admin_pb2_grpc.TicketAdminStub(channel)
        try:
            if args.command == "status":
                reply = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=args.timeout)
                _print(args, reply, _status_table)
            elif args.keys_command == "list":
                reply = stub.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=args.all),
                                      timeout=args.timeout)
                _print(args, reply, lambda r: _keys_table(list(r.keys)))
            elif args.keys_command == "rotate":
                reply = stub.RotateKey(admin_pb2.RotateKeyRequest(), timeout=args.timeout)
                _print(args, reply, lambda r: _keys_table([r.new_key, r.previous_key]))
            else:
                reply = stub.RetireKey(admin_pb2.RetireKeyRequest(key_id=args.key_id),
                                       timeout=args.timeout)
                _print(args, reply, lambda r: _keys_table([r.key]))
        except grpc.RpcError as err:
            return _rpc_failure(err, address)
    return 0


def _rpc_failure(err: Any, address: str) -> int:
    code = err.code()
    if code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        print(f"ticket-authority: {code.name}: {err.details()} (admin commands need an admin "
              "client certificate: --tls-ca, --tls-cert, --tls-key)", file=sys.stderr)
    elif code.name == "UNAVAILABLE" and "connect" in (err.details() or "").lower():
        print(f"ticket-authority: cannot reach the authority at {address}; is "
              "'ticket-authority serve' running, and does it need --tls-* flags? (use "
              "--listen, --state-dir or --config)",
              file=sys.stderr)
    else:
        print(f"ticket-authority: {code.name}: {err.details()}", file=sys.stderr)
    return 1


def _print(args: argparse.Namespace, reply: Any, table: Any) -> None:
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    else:
        print(table(reply))


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _keys_table(keys: list[Any]) -> str:
    rows = [("KEY ID", "STATE", "CREATED", "OPENS UNTIL", "SEALS")]
    rows += [(k.key_id, _STATE_NAMES.get(k.state, "?"), _when(k.created_at),
              _when(k.opens_until), str(k.seal_count)) for k in keys if k.key_id]
    return _table(rows)


def _status_table(s: Any) -> str:
    rows = [("backend", s.backend), ("library", s.library), ("token", s.token),
            ("sessions", str(s.sessions)), ("sealing key", s.sealing_key_id or "-"),
            ("keys", f"{s.active_keys} active, {s.decrypt_only_keys} decrypt-only, "
                     f"{s.destroyed_keys} destroyed"),
            ("consumed tickets", str(s.consumed_tickets)), ("version", s.version),
            ("started", _when(s.started_at))]
    rows += [(f"  {name}", str(value)) for name, value in sorted(s.counters.items())]
    return _table(rows, header=False)


def _table(rows: Sequence[Sequence[str]], header: bool = True) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
