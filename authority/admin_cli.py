"""The admin commands (keys, status, tickets, policy): gRPC clients of TicketAdmin.

Imports grpc and the generated stubs only when a command runs, so that ``authority.cli`` stays
cheap to import for the other commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authority.cluster_cli import commands as cluster_commands
from authority.errors import ConfigError

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from authority._proto.ticketauthority.v1 import admin_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVER_FILE = "server.json"       # written by a running server in its state directory
SPI_LEN = 8
_ACTIVE = 1                       # KeyState.KEY_STATE_ACTIVE
_VALUE_WIDTH = 40


@dataclass(frozen=True)
class Command:
    """One admin command: the TicketAdmin method, its request from the flags, its table."""

    rpc: str
    request: Callable[[argparse.Namespace], Any]
    table: Callable[[Any], str]


def run(args: argparse.Namespace) -> int:
    """Run the admin command ``args`` names; 0, or 1 when the call fails.

    Raises: ConfigError for a bad flag value (before connecting), a half-given client
    certificate or an unreadable TLS file."""
    import grpc

    from authority._proto.ticketauthority.v1 import admin_pb2_grpc

    command = commands()[command_key(args)]
    request = command.request(args)
    address = resolve_address(args)
    with admin_channel(args, address) as channel:
        stub = admin_pb2_grpc.TicketAdminStub(channel)
        try:
            reply = getattr(stub, command.rpc)(request, timeout=args.timeout)
        except grpc.RpcError as err:
            return _rpc_failure(err, address)
    _print(args, reply, command.table)
    return 0


def command_key(args: argparse.Namespace) -> tuple[str, str]:
    """(command, subcommand) of parsed arguments; subcommand "" for ``status``. Never raises."""
    return args.command, str(getattr(args, f"{args.command}_command", "") or "")


def commands() -> dict[tuple[str, str], Command]:
    """Every admin command by (command, subcommand). Never raises."""
    from authority._proto.ticketauthority.v1 import admin_pb2 as pb

    return {
        ("status", ""): Command("GetStatus", lambda a: pb.GetStatusRequest(), _status_table),
        ("keys", "list"): Command(
            "ListKeys", lambda a: pb.ListKeysRequest(include_destroyed=a.all),
            lambda r: _keys_table(list(r.keys))),
        ("keys", "rotate"): Command("RotateKey", lambda a: pb.RotateKeyRequest(),
                                    lambda r: _keys_table([r.new_key, r.previous_key])),
        ("keys", "retire"): Command("RetireKey", lambda a: pb.RetireKeyRequest(key_id=a.key_id),
                                    lambda r: _keys_table([r.key])),
        ("tickets", "revoke"): Command("RevokeTickets", revoke_request, _revoked_table),
        ("tickets", "revocations"): Command(
            "ListRevocations", lambda a: pb.ListRevocationsRequest(),
            lambda r: _revocations_table(list(r.revocations))),
        ("policy", "bump"): Command("BumpPolicyEpoch",
                                    lambda a: pb.BumpPolicyEpochRequest(realm=a.realm),
                                    _bumped_table),
        ("policy", "list"): Command("ListRealms", lambda a: pb.ListRealmsRequest(),
                                    lambda r: _realms_table(list(r.realms))),
        **{key: Command(*parts) for key, parts in cluster_commands(pb).items()},
    }


def revoke_request(args: argparse.Namespace) -> admin_pb2.RevokeTicketsRequest:
    """The RevokeTicketsRequest of ``tickets revoke``'s one selector flag and --reason.

    Raises: ConfigError naming the flag for bad hex, a malformed --old-sa or a bad time."""
    from authority._proto.ticketauthority.v1 import admin_pb2 as pb

    if args.id_i is not None:
        return pb.RevokeTicketsRequest(id_i=parse_hex("--id-i", args.id_i), reason=args.reason)
    if args.old_sa is not None:
        spi_i, spi_r = parse_old_sa("--old-sa", args.old_sa)
        return pb.RevokeTicketsRequest(old_sa=pb.SaSelector(spi_i=spi_i, spi_r=spi_r),
                                       reason=args.reason)
    if args.ticket_id is not None:
        return pb.RevokeTicketsRequest(ticket_id=parse_hex("--ticket-id", args.ticket_id),
                                       reason=args.reason)
    return pb.RevokeTicketsRequest(issued_before=parse_time("--issued-before", args.issued_before),
                                   reason=args.reason)


def parse_hex(flag: str, text: str) -> bytes:
    """Octets from hex digits (spaces and one leading 0x allowed).

    Raises: ConfigError naming ``flag`` when ``text`` is not hex or is empty."""
    digits = text.strip()
    digits = digits[2:] if digits[:2].lower() == "0x" else digits
    try:
        value = bytes.fromhex(digits)
    except ValueError as exc:
        raise ConfigError(flag, f"not hex (an even number of hex digits): {text!r}") from exc
    if not value:
        raise ConfigError(flag, "empty")
    return value


def parse_old_sa(flag: str, text: str) -> tuple[bytes, bytes]:
    """(SPIi, SPIr) from ``SPI_I_HEX:SPI_R_HEX``.

    Raises: ConfigError naming ``flag`` unless both are 8 octets of hex around one colon."""
    spi_i, colon, spi_r = text.partition(":")
    if not colon:
        raise ConfigError(flag, f"expected SPI_I_HEX:SPI_R_HEX, got {text!r}")
    spis = parse_hex(flag, spi_i), parse_hex(flag, spi_r)
    if any(len(spi) != SPI_LEN for spi in spis):
        raise ConfigError(flag, f"each SPI is {SPI_LEN} octets ({2 * SPI_LEN} hex digits)")
    return spis


def parse_time(flag: str, text: str) -> Timestamp:
    """A Timestamp from ISO 8601 (UTC unless the text has an offset).

    Raises: ConfigError naming ``flag`` when ``text`` is not an ISO 8601 time."""
    from google.protobuf.timestamp_pb2 import Timestamp

    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(flag, f"not an ISO 8601 time (e.g. 2026-05-01T12:00:00Z): "
                                f"{text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


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
    """Where the admin service of the server the flags name listens: --listen; else the
    config's server.admin_listen, or its server.listen when that is not the default and not
    port 0; else the address the running server wrote to its state directory's server.json
    (its admin_address first). The state directory is --state-dir, the config's state_dir,
    $TICKET_AUTHORITY_STATE_DIR, else the default one; only the default one, named by
    nothing, may lack a server.json: then the default address.

    Raises: ConfigError naming what did not resolve (--state-dir, --config or
    TICKET_AUTHORITY_STATE_DIR: no server.json, or a damaged one), or an invalid --config."""
    if args.listen:
        return str(args.listen)
    from authority.settings_loader import default_state_dir, load_config

    state_dir: Path | None = args.state_dir
    named_by = "--state-dir" if state_dir is not None else None
    if args.config:
        config = load_config(args.config, state_dir=args.state_dir)
        if config.server.admin_listen:
            return config.server.admin_listen
        listen = config.server.listen
        if listen != DEFAULT_ADDRESS and not listen.endswith(":0"):
            return listen
        state_dir, named_by = config.state_dir, named_by or "--config"
    elif state_dir is None and os.environ.get("TICKET_AUTHORITY_STATE_DIR"):
        named_by = "TICKET_AUTHORITY_STATE_DIR"
    server_file = Path(state_dir or default_state_dir()) / SERVER_FILE
    if named_by is None and not server_file.exists():
        return DEFAULT_ADDRESS
    return _server_file_address(server_file, named_by or str(server_file))


def _server_file_address(server_file: Path, named_by: str) -> str:
    """The admin address a running server wrote to ``server_file``.

    Raises: ConfigError naming ``named_by`` when the file is missing or damaged."""
    try:
        info = json.loads(server_file.read_text())
        return str(info.get("admin_address") or info["address"])
    except FileNotFoundError as exc:
        raise ConfigError(named_by, f"{server_file} does not exist: no server is running with "
                                    "this state directory (or give --listen HOST:PORT)") from exc
    except OSError as exc:
        raise ConfigError(named_by, f"cannot read {server_file}: {exc.strerror}") from exc
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(named_by, f"{server_file} is damaged (not what 'ticket-authority "
                                    "serve' writes); give --listen HOST:PORT") from exc


def _rpc_failure(err: Any, address: str) -> int:
    """Explain a failed call on stderr; returns 1. Never raises."""
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


def _print(args: argparse.Namespace, reply: Any, table: Callable[[Any], str]) -> None:
    """Print ``reply`` as JSON (--json: every field, zero values too) or as ``table`` renders
    it. Never raises."""
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(reply, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True))
    else:
        print(table(reply))


def when(ts: Any) -> str:
    """A Timestamp as ``YYYY-MM-DD HH:MM:SSZ``, "-" when unset. Never raises."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _realm(name: str) -> str:
    return name or "(default)"


def _seals(key: Any) -> str:
    """SEALS of one key: the sealing (ACTIVE) key's live count of seals made; for any other
    key the server knows only the seals reserved for it in the store (blocks of
    ``keys.seal_reservation``), an upper bound, shown as such."""
    if key.state == _ACTIVE or not key.seal_count:
        return str(key.seal_count)
    return f"{key.seal_count} reserved"


def _keys_table(keys: list[Any]) -> str:
    rows = [("KEY ID", "STATE", "CREATED", "OPENS UNTIL", "SEALS")]
    rows += [(k.key_id, _state_name(k.state), when(k.created_at),
              when(k.opens_until), _seals(k)) for k in keys if k.key_id]
    return table(rows)


def _state_name(state: int) -> str:
    """ACTIVE, DECRYPT_ONLY, ...: the KeyState enum's name (every state the proto has), or
    the number of one this client does not know. Never raises."""
    from authority._proto.ticketauthority.v1 import admin_pb2 as pb

    try:
        return str(pb.KeyState.Name(state)).removeprefix("KEY_STATE_")
    except ValueError:
        return str(state)


def _status_table(s: Any) -> str:
    """The status as key/value rows, then the replicas the store knows (if it answered)."""
    consumed = str(s.consumed_tickets) if s.store_reachable or not s.store else "?"
    rows = [("backend", s.backend), ("library", s.library), ("token", s.token),
            ("sessions", str(s.sessions)),
            ("device processes", str(s.device_processes)), ("sealing key", s.sealing_key_id or "-"),
            ("keys", f"{s.active_keys} active, {s.decrypt_only_keys} decrypt-only, "
                     f"{s.destroyed_keys} destroyed"),
            ("consumed tickets", consumed), ("version", s.version),
            ("started", when(s.started_at))]
    if s.store:   # a server that reports its store (issue 13)
        rows += _store_rows(s)
    rows += [(f"  {name}", str(value)) for name, value in sorted(s.counters.items())]
    text = table(rows, header=False)
    if s.replicas:
        text += "\n\n" + _replicas_table(s)
    return text


def _store_rows(s: Any) -> list[tuple[str, str]]:
    """The store, whether it answered, how fresh this replica's policy is, the lease."""
    limit = f" (max {s.max_staleness_seconds:g} s)" if s.max_staleness_seconds else ""
    lease = s.maintenance_lease
    if not s.store_reachable:
        holder = "?"
    elif not lease.holder:
        holder = "-"
    else:
        holder = (f"{lease.holder} (epoch {lease.epoch}, "
                  f"{'expired' if lease.expired else 'until'} {when(lease.expires_at)})")
    return [("store", f"{s.store} {s.store_location} (schema {s.store_schema_version})"),
            ("store reachable", "yes" if s.store_reachable else f"NO: {s.store_error}"),
            ("policy confirmed", f"{s.policy_age_seconds:.1f} s ago{limit}"),
            ("replica", s.replica_id), ("maintenance lease", holder)]


def _replicas_table(s: Any) -> str:
    """One row per replica: * marks the one that answered; HEARTBEAT is the age of its last
    heartbeat by that replica's clock."""
    now = s.server_time.ToNanoseconds() / 1e9
    rows = [("REPLICA", "HOST", "PID", "STARTED", "HEARTBEAT", "RING", "LIVE", "LEASE")]
    for r in s.replicas:
        age = now - r.last_heartbeat.ToNanoseconds() / 1e9
        rows.append((r.replica_id + ("*" if r.this_replica else ""), r.host, str(r.pid),
                     when(r.started_at), f"{max(age, 0.0):.1f} s ago", str(r.ring_version),
                     "yes" if r.live else "no", "holder" if r.holds_lease else "-"))
    return table(rows)


def _revoked_table(reply: Any) -> str:
    return table([("revocation", str(reply.revocation_id)),
                   ("expires", when(reply.expires_at))], header=False)


def _revocation_value(r: Any) -> str:
    """The selector as ``tickets revoke`` takes it: hex, SPI_I:SPI_R for old_sa, shortened."""
    value = bytes(r.value)
    if r.kind == "old_sa" and len(value) == 2 * SPI_LEN:
        text = f"{value[:SPI_LEN].hex()}:{value[SPI_LEN:].hex()}"
    else:
        text = value.hex() or "-"
    return text if len(text) <= _VALUE_WIDTH else text[:_VALUE_WIDTH - 3] + "..."


def _revocations_table(revocations: list[Any]) -> str:
    rows = [("ID", "KIND", "VALUE", "ISSUED BEFORE", "CREATED", "EXPIRES", "REASON")]
    rows += [(str(r.revocation_id), r.kind, _revocation_value(r), when(r.issued_before),
              when(r.created_at), when(r.expires_at), " ".join(r.reason.split()))
             for r in revocations]
    return table(rows)


def _bumped_table(reply: Any) -> str:
    return table([("realm", _realm(reply.realm)), ("policy epoch", str(reply.policy_epoch))],
                  header=False)


def _realms_table(realms: list[Any]) -> str:
    rows = [("REALM", "EPOCH")]
    rows += [(_realm(r.realm), str(r.policy_epoch)) for r in realms]
    return table(rows)


def table(rows: Sequence[Sequence[str]], header: bool = True) -> str:
    """Rows as aligned columns, the first a header underlined (``header``). Never raises."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
