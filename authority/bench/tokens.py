"""Per-node tokens, timed (``python -m authority.bench.tokens``): three ``ticket-authority serve``
processes, each with its own embedded SoftHSM2 token in its own state directory, on one
throwaway PostgreSQL (authority/devdb.py), joined with the real commands (``cluster init``,
``cluster join`` + ``cluster approve``). Prints, with the machine:

- ``cluster join`` to first redeem: from starting ``cluster join`` on a new node (the approval
  given as soon as the fingerprint is printed, as an operator with the fingerprint in hand
  would) through its ``serve`` to its first OK redeem of a ticket issued on the first node;
- rotation to every replica holds the key: from ``RotateKey`` on one replica (the key PENDING)
  to the key ACTIVE, which the publication rule allows only once every live replica reported
  it loaded (each unwrapped its copy; ``keys.publish_delay`` is set far longer);
- ``cluster remove`` of the third node (stopped first) to the new sealing key ACTIVE on the two
  others: a new KEK made and wrapped to the other member, unwrapped there at its heartbeat, the
  rotation's key unwrapped under it.

:class:`TokenNode` is also the harness of tests/test_cluster_tokens_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.bench.serveproc import CALL, ServeProcess, wait_for

HEARTBEAT = 0.2          # cluster.heartbeat_interval of the nodes
LIVENESS = 1.0           # cluster.replica_timeout and lease_duration
PUBLISH_DELAY = 60.0     # keys.publish_delay: far longer than a copy takes
ACTIVE = admin_pb2.KEY_STATE_ACTIVE
OK = authority_pb2.REDEEM_RESULT_OK


def node_settings(state: Path, dsn_file: Path, name: str) -> str:
    """The TOML of one node: its embedded token, the database, per-node tokens, short
    intervals."""
    return (f'state_dir = "{state}"\n'
            f'[server]\nprocesses = 1\nmetrics_listen = ""\nlisten = "127.0.0.1:0"\n'
            f'[postgresql]\ndsn_file = "{dsn_file}"\npool_size = 4\n'
            f'[cluster]\nper_node_tokens = true\nnode_name = "{name}"\n'
            f"heartbeat_interval = {HEARTBEAT}\nreplica_timeout = {LIVENESS}\n"
            f"lease_duration = {LIVENESS}\n"
            f"[keys]\npublish_delay = {PUBLISH_DELAY}\n")


class TokenNode(ServeProcess):
    """One node: its state directory (its own embedded SoftHSM2 token), its config, the
    ``cluster`` commands run on it and its ``serve`` process."""

    def __init__(self, directory: Path, name: str, dsn_file: Path) -> None:
        super().__init__(directory, name, node_settings(directory / name, dsn_file, name))

    def start_join(self, wait: float = 120.0) -> tuple[subprocess.Popen[str], str]:
        """Start ``cluster join``; return it and the fingerprint it printed.

        Raises: AssertionError with its output if it exits before printing one."""
        proc = subprocess.Popen(self.command("cluster", "join", "--wait", str(wait)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("transport key fingerprint"):
                return proc, line.split(":", 1)[1].strip()
        proc.wait()
        raise AssertionError(f"cluster join on {self.name} printed no fingerprint:\n"
                             + "".join(seen))


def join(node: TokenNode, approver: TokenNode) -> None:
    """``cluster join`` on ``node``, approved on ``approver`` as soon as the fingerprint is
    printed. Raises: AssertionError with the commands' output if either fails."""
    proc, fingerprint = node.start_join()
    approved = approver.cli("cluster", "approve", fingerprint)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out


def state_of(node: TokenNode, key_id: str) -> int:
    """The key's state as ``node`` lists it (0 if unlisted)."""
    keys = node.admin.ListKeys(admin_pb2.ListKeysRequest(), timeout=CALL).keys
    return next((k.state for k in keys if k.key_id == key_id), 0)


def issue(node: TokenNode, n: int = 1) -> bytes:
    """A ticket issued on ``node``."""
    from authority.bench.workload import issue_request

    reply = node.tickets.IssueTicket(issue_request(n), timeout=CALL)
    return bytes(reply.ticket)


def redeemed(node: TokenNode, ticket: bytes) -> bool:
    """Whether ``ticket`` redeems OK on ``node`` (UNAVAILABLE counts as not yet)."""
    try:
        reply = node.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=ticket),
                                          timeout=CALL)
    except grpc.RpcError:
        return False
    return int(reply.result) == OK


def _redeems(node: TokenNode, ticket: bytes) -> Callable[[], bool]:
    return lambda: redeemed(node, ticket)


def rotation_to_everywhere(node: TokenNode) -> float:
    """Seconds from RotateKey on ``node`` to the new key ACTIVE (every live replica holds
    its copy)."""
    start = time.monotonic()
    reply = node.admin.RotateKey(admin_pb2.RotateKeyRequest(), timeout=CALL)
    key_id = reply.new_key.key_id
    wait_for(f"key {key_id} active", lambda: state_of(node, key_id) == ACTIVE,
             timeout=PUBLISH_DELAY / 2)
    return time.monotonic() - start


def removal_to_new_key(node: TokenNode, removed: str) -> float:
    """Seconds from RemoveClusterNode on ``node`` (a new KEK made, wrapped to the other
    members, a rotation) to the new key ACTIVE: every remaining replica unwrapped the new KEK
    (an SO child process at its heartbeat) and then its copy of the key."""
    start = time.monotonic()
    reply = node.admin.RemoveClusterNode(admin_pb2.RemoveClusterNodeRequest(name=removed),
                                         timeout=120)
    key_id = reply.new_sealing_key_id
    wait_for(f"key {key_id} active", lambda: state_of(node, key_id) == ACTIVE,
             timeout=PUBLISH_DELAY / 2)
    return time.monotonic() - start


def measure(directory: Path, dsn: str, rotations: int) -> dict[str, Any]:
    """Init A, join B and C (timed to their first redeem), then ``rotations`` rotations
    timed to every replica holding the key."""
    dsn_file = directory / "dsn"
    dsn_file.write_text(dsn)
    dsn_file.chmod(0o600)
    nodes = [TokenNode(directory, name, dsn_file) for name in ("a", "b", "c")]
    a = nodes[0]
    try:
        start = time.monotonic()
        done = a.cli("cluster", "init")
        assert done.returncode == 0, done.stdout + done.stderr
        init_s = time.monotonic() - start
        a.serve()
        ticket = issue(a)
        joins = []
        for node in nodes[1:]:
            start = time.monotonic()
            join(node, a)
            joined = time.monotonic() - start
            node.serve()
            wait_for(f"first redeem on {node.name}", _redeems(node, ticket))
            joins.append((joined, time.monotonic() - start))
        copies = [rotation_to_everywhere(a) for _ in range(rotations)]
        nodes[2].stop()
        removal = removal_to_new_key(a, nodes[2].name)
    finally:
        for node in nodes:
            node.stop()
    return {"init_s": init_s, "join_s": [j for j, _ in joins],
            "join_to_first_redeem_s": [r for _, r in joins], "rotation_to_all_s": copies,
            "removal_to_new_key_active_s": removal}


def main(argv: list[str] | None = None) -> int:
    """Print the figures and the machine. Returns 0."""
    from authority import devdb
    from authority.bench.machine import describe_machine, load_average, machine_lines

    parser = argparse.ArgumentParser(prog="python -m authority.bench.tokens")
    parser.add_argument("--rotations", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reason = devdb.unavailable()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="ita-tokens-") as tmp, \
            devdb.DevPostgres.launch() as server:
        result = measure(Path(tmp), server.dsn(server.create_database()), args.rotations)
    machine["load_after"] = load_average()
    result["machine"] = machine
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in machine_lines(machine, {})[:2]:
        print(line)
    print("nodes    3 serve processes, each its own embedded SoftHSM2 token, one PostgreSQL "
          f"(devdb); heartbeat {HEARTBEAT} s")
    print(f"cluster init: {result['init_s']:.2f} s")
    for name, joined, first in zip("bc", result["join_s"], result["join_to_first_redeem_s"],
                                   strict=True):
        print(f"node {name}: cluster join (approved at once) {joined:.2f} s; join to first "
              f"redeem (serve started after the join) {first:.2f} s")
    rot = result["rotation_to_all_s"]
    print(f"rotation to every replica holds the key ({len(rot)} rotations, 3 replicas): "
          f"median {statistics.median(rot):.2f} s, max {max(rot):.2f} s")
    print("cluster remove c (a new KEK made on a, delivered to b; a rotation) to the new key "
          f"active on a and b: {result['removal_to_new_key_active_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
