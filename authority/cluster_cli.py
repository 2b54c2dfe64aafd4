"""``ticket-authority cluster``: membership of per-node tokens (``cluster.per_node_tokens``).

``init`` and ``join`` run here, on the node whose token they change (the security officer logs
in to it in this process); ``approve``, ``list`` and ``remove`` are admin RPCs to a running
member (audited there), with the flags of the other admin commands.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authority.errors import AuthorityError, ConfigError

LOCAL = ("init", "join")
DEFAULT_WAIT = 900.0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                ) -> list[argparse.ArgumentParser]:
    """The ``cluster`` parsers; returns those that call a server (approve, list, remove)."""
    cluster = sub.add_parser("cluster", help="per-node tokens: make, join and change the "
                                             "cluster whose members hold the cluster KEK")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    init = cluster_sub.add_parser("init", help="on the first node: make the cluster KEK in "
                                               "this node's token and become the first member")
    join = cluster_sub.add_parser(
        "join", help="on a new node: publish a join request, print its fingerprint, wait for "
                     "`cluster approve` on a member, then unwrap the KEK into this token")
    join.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                      help=f"how long to wait for the approval (default {DEFAULT_WAIT:.0f})")
    for local in (init, join):
        local.add_argument("--state-dir", type=Path, metavar="DIR",
                           help="state directory (default ~/.local/state/ticket-authority)")
        local.add_argument("--config", type=Path, metavar="FILE",
                           help="TOML configuration file (the server's)")
        local.add_argument("--name", metavar="NAME",
                           help="this node's name (default cluster.node_name, else the host "
                                "name)")
    approve = cluster_sub.add_parser(
        "approve", help="on a member: wrap the cluster KEK to a join request's transport key "
                        "(compare its fingerprint out of band first)")
    approve.add_argument("fingerprint", metavar="FINGERPRINT",
                         help="the 64 hex digits `cluster join` printed on the new node")
    listing = cluster_sub.add_parser("list", help="members, the cluster KEK, join requests")
    remove = cluster_sub.add_parser(
        "remove", help="drop a member: a new cluster KEK is made and delivered to the others, "
                       "then the sealing key rotates")
    remove.add_argument("name", metavar="NODE")
    remove.add_argument("--keep-sealing-key", action="store_true",
                        help="do not rotate the sealing key after the removal")
    return [approve, listing, remove]


def run_local(args: argparse.Namespace) -> int:
    """``cluster init`` or ``cluster join``: 0 once done, 1 when refused (the message says
    why).

    Raises: ConfigError, StartupError (the configuration, the token or the SO PIN),
    DeviceUnavailable."""
    from dataclasses import replace

    from authority import membership
    from authority.app import open_store, prepare_state_dir
    from authority.backends.pkcs11.officer import SecurityOfficer
    from authority.settings_loader import load_config

    config = load_config(args.config, state_dir=args.state_dir)
    if args.name:
        config = replace(config, cluster=replace(config.cluster, node_name=args.name))
    prepare_state_dir(config.state_dir)
    name = membership.node_name(config)
    try:
        settings, so_pin = membership.so_settings(config)
        store = open_store(config)
        try:
            with SecurityOfficer.open(settings.module, settings.softhsm2_conf,
                                      settings.token_label, so_pin) as officer:
                if args.cluster_command == "init":
                    node = membership.init(officer, store, name, time.time())
                    print(f"cluster initialised: node {node.name}, KEK {node.kek_id}, "
                          f"transport key {node.fingerprint}")
                else:
                    _join(officer, store, name, args.wait)
        finally:
            store.close()
    except AuthorityError as exc:
        if type(exc).__name__ == "DeviceUnavailable":
            raise
        print(f"ticket-authority: cluster {args.cluster_command}: {exc.message}",
              file=sys.stderr)
        return 1
    return 0


def _join(officer: Any, store: Any, name: str, wait: float) -> None:
    from authority import membership

    transport = membership.request_join(officer, store, name, time.time())
    print(f"join request published for node {name}\n"
          f"transport key fingerprint (SHA-256): {transport.fingerprint}\n"
          "compare it out of band with the one an operator sees in `ticket-authority cluster "
          "list` on a member, then approve there:\n"
          f"  ticket-authority cluster approve {transport.fingerprint}\n"
          f"waiting up to {wait:.0f} s for the approval ...", flush=True)
    node = membership.finish_join(officer, store, transport, time.monotonic() + wait)
    print(f"joined: node {node.name} holds the cluster KEK {node.kek_id} (approved by "
          f"{node.approved_by})")


def commands(pb: Any) -> dict[tuple[str, str], tuple[str, Callable[[Any], Any],
                                                        Callable[[Any], str]]]:
    """The admin RPCs of ``cluster approve/list/remove``: (rpc, request, table)."""
    return {
        ("cluster", "approve"): (
            "ApproveClusterJoin",
            lambda a: pb.ApproveClusterJoinRequest(fingerprint=_fingerprint(a.fingerprint)),
            lambda r: f"approved: node {r.request.node_name} ({r.request.fingerprint}) "
                      f"receives KEK {r.kek_id}; it unwraps it and becomes a member"),
        ("cluster", "list"): ("ListClusterNodes", lambda a: pb.ListClusterNodesRequest(),
                              _listing_table),
        ("cluster", "remove"): (
            "RemoveClusterNode",
            lambda a: pb.RemoveClusterNodeRequest(name=a.name,
                                                  keep_sealing_key=a.keep_sealing_key),
            _removed_table),
    }


def _fingerprint(text: str) -> str:
    from authority.membership import fingerprint_text

    value = fingerprint_text(text)
    if value is None:
        raise ConfigError("FINGERPRINT", "the 64 hex digits `cluster join` printed")
    return value


def _listing_table(r: Any) -> str:
    from authority.admin_cli import table, when

    lines = [f"cluster KEK: {r.kek_id or '- (no cluster: cluster init)'}", ""]
    rows = [("NODE", "TRANSPORT KEY FINGERPRINT", "KEK", "JOINED", "APPROVED BY")]
    rows += [(n.name + (" *" if n.this_node else ""), n.fingerprint, n.kek_id,
              when(n.joined_at), n.approved_by or "-") for n in r.nodes]
    lines.append(table(rows))
    if r.join_requests:
        asked = [("REQUESTED NODE", "FINGERPRINT", "STATE", "EXPIRES")]
        asked += [(j.node_name, j.fingerprint,
                  f"approved by {j.approved_by}" if j.approved else "pending",
                  when(j.expires_at)) for j in r.join_requests]
        lines += ["", table(asked)]
    return "\n".join(lines)


def _removed_table(r: Any) -> str:
    delivered = ", ".join(r.delivered_to) or "no other member"
    out = (f"removed node {r.removed.name} ({r.removed.fingerprint})\n"
           f"new cluster KEK {r.kek_id}, delivered to {delivered}")
    if r.new_sealing_key_id:
        out += f"\nsealing key rotated: {r.new_sealing_key_id}"
    return out
