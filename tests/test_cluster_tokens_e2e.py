"""Per-node tokens end to end (issue 15): ``ticket-authority serve`` processes, each with its
own embedded SoftHSM2 token in its own state directory, on one real PostgreSQL, made a cluster
with the real commands: ``cluster init`` on A, ``cluster join`` on B and C each approved on A
with ``cluster approve`` (the admin RPC), ``cluster remove``. Nothing mocked; the harness is
authority/bench/tokens.py's (``python -m authority.bench.tokens`` times the same steps).

The tests share one cluster and run in order (module scope): each builds on the previous one's
state, as an operator's day would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format
from psycopg import sql

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.bench.tokens import (
    CALL,
    TokenNode,
    issue,
    join,
    redeemed,
    rotation_to_everywhere,
    wait_for,
)
from tests.pkcs11_fixtures import requires_softhsm
from tests.postgres_fixtures import shared_server

pytestmark = requires_softhsm

INVALID = authority_pb2.REDEEM_RESULT_INVALID
OK = authority_pb2.REDEEM_RESULT_OK
FIRST_KEK = "ticket-authority-kek"


@dataclass
class Cluster:
    directory: Path
    dsn: str
    dsn_file: Path
    nodes: dict[str, TokenNode] = field(default_factory=dict)
    tickets: dict[str, bytes] = field(default_factory=dict)   # by the key id sealing it

    def node(self, name: str) -> TokenNode:
        if name not in self.nodes:
            self.nodes[name] = TokenNode(self.directory, name, self.dsn_file)
        return self.nodes[name]

    def sql(self, query: Any, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return list(conn.execute(query, params).fetchall())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    server = shared_server()
    name = server.create_database()
    directory = tmp_path_factory.mktemp("tokens")
    dsn_file = directory / "dsn"
    dsn_file.write_text(server.dsn(name))
    dsn_file.chmod(0o600)
    made = Cluster(directory, server.dsn(name), dsn_file)
    try:
        yield made
    finally:
        for node in made.nodes.values():
            node.stop()
        server.drop_database(name)


def _sealing_key(node: TokenNode) -> str:
    status = node.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=CALL)
    return str(status.sealing_key_id)


def _remember(cluster: Cluster, node: TokenNode) -> None:
    """A ticket issued on ``node`` under its sealing key, kept by that key's id."""
    cluster.tickets[_sealing_key(node)] = issue(node, len(cluster.tickets))


def test_init_two_joins_with_approval_then_tickets_cross(cluster: Cluster) -> None:
    a, b, c = (cluster.node(n) for n in "abc")
    done = a.cli("cluster", "init")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cluster initialised: node a" in done.stdout
    again = a.cli("cluster", "init")
    assert again.returncode == 1 and "the cluster exists" in again.stderr
    a.serve()
    _remember(cluster, a)
    for node in (b, c):
        join(node, a)
        node.serve()
    ticket = next(iter(cluster.tickets.values()))
    assert redeemed(b, ticket) and redeemed(c, ticket)
    from_b = issue(b, 99)
    assert redeemed(c, from_b) and redeemed(a, from_b)
    listed = a.admin.ListClusterNodes(admin_pb2.ListClusterNodesRequest(), timeout=CALL)
    assert [n.name for n in listed.nodes] == ["a", "b", "c"]
    assert listed.kek_id == FIRST_KEK and [n.this_node for n in listed.nodes] == [1, 0, 0]
    assert {n.approved_by for n in listed.nodes[1:]} != {""}
    table = c.cli("cluster", "list")
    assert table.returncode == 0 and "a *" not in table.stdout   # c answers: c is marked
    assert "c *" in table.stdout


def test_the_cluster_rpcs_refuse_bad_requests_clearly_and_audit_what_they_do(
        cluster: Cluster) -> None:
    """A malformed fingerprint is INVALID_ARGUMENT naming the field; an unknown one
    NOT_FOUND; removing the answering node, or a name nobody has, is refused; nothing changed.
    The approvals of B and C are in the audit chain (who, which node, which fingerprint)."""
    a = cluster.node("a")
    for bad, code, words in (("zz", grpc.StatusCode.INVALID_ARGUMENT, "fingerprint"),
                             ("ab" * 32, grpc.StatusCode.NOT_FOUND, "no pending join request")):
        with pytest.raises(grpc.RpcError) as refused:
            a.admin.ApproveClusterJoin(admin_pb2.ApproveClusterJoinRequest(fingerprint=bad),
                                       timeout=CALL)
        assert refused.value.code() == code and words in str(refused.value.details())
    for name, code in (("a", grpc.StatusCode.FAILED_PRECONDITION),
                       ("nobody", grpc.StatusCode.NOT_FOUND),
                       ("", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as refused:
            a.admin.RemoveClusterNode(admin_pb2.RemoveClusterNodeRequest(name=name),
                                      timeout=CALL)
        assert refused.value.code() == code, refused.value.details()
    listed = a.admin.ListClusterNodes(admin_pb2.ListClusterNodesRequest(), timeout=CALL)
    assert [n.name for n in listed.nodes] == ["a", "b", "c"] and listed.kek_id == FIRST_KEK
    approvals = cluster.sql("SELECT details->>'node', details->>'fingerprint' FROM audit "
                            "WHERE action = 'cluster.join_approved' ORDER BY seq")
    assert [n for n, _ in approvals] == ["b", "c"]
    assert [f for _, f in approvals] == [n.fingerprint for n in listed.nodes[1:]]


def test_the_cluster_rpcs_are_refused_without_per_node_tokens(pkcs11_harness: Any) -> None:
    """A server whose replicas share one token has no membership: FAILED_PRECONDITION."""
    with pytest.raises(grpc.RpcError) as refused:
        pkcs11_harness.admin.ListClusterNodes(admin_pb2.ListClusterNodesRequest(),
                                              timeout=CALL)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "per_node_tokens is off" in str(refused.value.details())


def test_a_join_nobody_approved_never_receives_the_kek(cluster: Cluster) -> None:
    """``cluster join`` on D with nobody approving: it gives up (exit 1), its request stays
    pending without a wrapped KEK, D's token holds no KEK, and D cannot serve."""
    d = cluster.node("d")
    proc, fingerprint = d.start_join(wait=2.0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "not approved in time" in out
    rows = cluster.sql("SELECT fingerprint, wrapped_kek, approved_by FROM join_requests")
    assert (fingerprint, None, None) in rows
    assert FIRST_KEK not in _token_objects(d, "secrkey")
    assert not _token_objects(d, "privkey")     # its transport key destroyed when it gave up
    refused = d.cli("serve", timeout=120)
    assert refused.returncode == 2 and "not a member of the cluster" in refused.stderr
    # someone who can write to the database swaps the request's key, keeping the fingerprint
    # the operator will compare: the approval refuses to wrap the KEK to it
    cluster.sql("UPDATE join_requests SET public_key = public_key || '\\x00'::bytea "
                "WHERE fingerprint = %s RETURNING 1", (fingerprint,))
    with pytest.raises(grpc.RpcError) as swapped:
        cluster.node("a").admin.ApproveClusterJoin(
            admin_pb2.ApproveClusterJoinRequest(fingerprint=fingerprint), timeout=120)
    assert swapped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not match its fingerprint" in str(swapped.value.details())
    assert cluster.sql("SELECT wrapped_kek FROM join_requests WHERE fingerprint = %s",
                       (fingerprint,)) == [(None,)]


def test_rotation_under_load_answers_no_ticket_invalid(cluster: Cluster) -> None:
    """Issue on one replica, redeem on the next, while A rotates three times (each new key
    PENDING until B and C unwrapped their copies): no INVALID, every call answered."""
    nodes = [cluster.node(n) for n in "abc"]
    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []

    def load() -> None:
        n = 0
        while not stop.is_set() and n < 5000:
            n += 1
            try:
                ticket = issue(nodes[n % 3], n)
                reply = nodes[(n + 1) % 3].tickets.RedeemTicket(
                    authority_pb2.RedeemTicketRequest(ticket=ticket), timeout=CALL)
                results.append(int(reply.result))
            except grpc.RpcError as exc:
                errors.append(f"{exc.code()}: {exc.details()}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for _ in range(3):
            rotation_to_everywhere(nodes[0])
            _remember(cluster, nodes[0])
    finally:
        stop.set()
        worker.join(timeout=60)
    assert results and INVALID not in results and set(results) == {OK}, set(results)
    assert not errors, errors[:3]


def test_a_node_that_joins_later_unwraps_every_live_key(cluster: Cluster) -> None:
    """D joins (approved this time) after three rotations: it unwraps a copy of every live
    key, so a ticket sealed under each of them redeems on D."""
    a, d = cluster.node("a"), cluster.node("d")
    join(d, a)
    d.serve()
    live = {k.key_id for k in a.admin.ListKeys(admin_pb2.ListKeysRequest(), timeout=CALL).keys}
    kept = {k: t for k, t in cluster.tickets.items() if k in live}
    assert len(kept) >= 3
    for key_id, ticket in kept.items():
        assert redeemed(d, ticket), key_id
    assert {f"ita-{k}" for k in live} <= set(_token_objects(d, "secrkey"))
    assert _token_objects(d, "privkey") == ["ticket-authority-transport"]   # kept: later KEKs


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="opensc not installed")
def test_every_copy_is_protected_and_the_database_holds_only_wrapped_blobs(
        cluster: Cluster) -> None:
    """pkcs11-tool reads every token: each ticket key sensitive, its value unreadable; only
    its original (on A, where it was made) extractable (under a trusted key: the KEK), every
    copy not extractable; the KEK wrap/unwrap only. The database: every blob 40 octets under a KEK
    id, and no stored value of a key's length (32 octets) in the membership tables."""
    live = {k.key_id for k in cluster.node("a").admin.ListKeys(
        admin_pb2.ListKeysRequest(), timeout=CALL).keys}
    originals = 0
    for node in (cluster.node(n) for n in "abcd"):
        listing = _pkcs11_tool(node, "--list-objects", "--type", "secrkey")
        kek = listing.split(f"label:      {FIRST_KEK}", 1)[1].split("Secret Key Object")[0]
        assert "Usage:      wrap, unwrap" in kek and "sensitive" in kek
        for key_id in live:
            text = listing.split(f"label:      ita-{key_id}", 1)[1].split("Secret Key Object")[0]
            access = next(line for line in text.splitlines() if "Access:" in line)
            assert "sensitive" in access
            originals += "extractable" in access   # made here: extractable under a trusted key
            with pytest.raises(subprocess.CalledProcessError):
                _pkcs11_tool(node, "--read-object", "--type", "secrkey", "--label",
                             f"ita-{key_id}")
        assert "Value" not in listing
    assert originals == len(live)    # one original per key (all made on A), the rest copies
    blobs = cluster.sql("SELECT key_id, kek_id, wrapped, check_value FROM wrapped_keys")
    assert {bytes(k).hex() for k, *_ in blobs} >= live
    assert all(len(w) == 40 and len(c) == 16 and kek.startswith(FIRST_KEK)
               for _, kek, w, c in blobs)
    for table in ("nodes", "join_requests", "wrapped_keys", "kek_deliveries"):
        for row in cluster.sql(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))):
            assert not [v for v in row if isinstance(v, bytes | memoryview) and len(v) == 32]


def test_a_removed_node_cannot_unwrap_keys_made_after_its_removal(cluster: Cluster) -> None:
    """D stopped and removed on B (``cluster remove``): a new KEK, delivered to A and C (each
    unwraps it at its heartbeat), then a rotation; the new key's blob is under the new KEK,
    every remaining replica holds it (it became ACTIVE), D's token cannot unwrap it, and D
    cannot serve."""
    a, b, c, d = (cluster.node(n) for n in "abcd")
    d.stop()
    done = b.cli("cluster", "remove", "d", "--json", "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    removed = json_format.Parse(done.stdout, admin_pb2.RemoveClusterNodeResponse())
    assert removed.removed.name == "d" and removed.kek_id.startswith(FIRST_KEK + "-")
    assert sorted(removed.delivered_to) == ["a", "c"] and removed.new_sealing_key_id
    new_key = removed.new_sealing_key_id
    wait_for("the new key active", lambda: _sealing_key(a) == new_key, timeout=30)
    blob = cluster.sql("SELECT kek_id, wrapped, check_value FROM wrapped_keys WHERE key_id = %s",
                       (bytes.fromhex(new_key),))
    assert blob and blob[0][0] == removed.kek_id
    ticket = issue(b, 1234)
    assert redeemed(a, ticket) and redeemed(c, ticket)
    listed = a.admin.ListClusterNodes(admin_pb2.ListClusterNodesRequest(), timeout=CALL)
    assert [n.name for n in listed.nodes] == ["a", "b", "c"]
    assert {n.kek_id for n in listed.nodes} == {removed.kek_id}
    refusal = _unwrap_on(d, new_key, bytes(blob[0][1]), bytes(blob[0][2]), removed.kek_id)
    assert refusal.startswith("FailedPrecondition"), refusal       # no such KEK in D's token
    refusal = _unwrap_on(d, new_key, bytes(blob[0][1]), bytes(blob[0][2]), FIRST_KEK)
    assert refusal.startswith("InvalidArgument"), refusal          # the old KEK: refused
    assert f"ita-{new_key}" not in _token_objects(d, "secrkey")
    refused = d.cli("serve", timeout=120)
    assert refused.returncode == 2 and "not a member of the cluster" in refused.stderr
    # every key's original was on A, which re-wrapped it under the new KEK: no blob needs the
    # first KEK any more, and each remaining member destroys it
    wait_for("every blob under the new KEK", lambda: {k for k, in cluster.sql(
        "SELECT DISTINCT kek_id FROM wrapped_keys")} == {removed.kek_id}, timeout=30)
    for node in (a, b, c):
        wait_for(f"the first KEK gone from {node.name}'s token",
                 lambda n=node: FIRST_KEK not in _token_objects(n, "secrkey"), timeout=30,
                 poll=0.5)
    assert FIRST_KEK in _token_objects(d, "secrkey")   # D's token: nobody can reach it


# -- reading a node's token from outside ---------------------------------------------------------


def _embedded(node: TokenNode) -> tuple[Path, str, Path]:
    """(module, the user PIN, softhsm2.conf) of the node's embedded token."""
    from authority.backends.softhsm import find_softhsm_module

    hsm = node.state / "hsm"
    return find_softhsm_module(), (hsm / "user.pin").read_text().strip(), hsm / "softhsm2.conf"


def _pkcs11_tool(node: TokenNode, *args: str) -> str:
    tool = shutil.which("pkcs11-tool")
    assert tool is not None
    module, pin, conf = _embedded(node)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf), ITA_PIN=pin)
    return subprocess.run([tool, "--module", str(module), "--login", "--pin", "env:ITA_PIN",
                           *args], env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout


def _token_objects(node: TokenNode, kind: str) -> list[str]:
    """The labels of ``kind`` objects in the node's token (python-pkcs11, own process)."""
    return _in_token(node, f"""
import pkcs11
from pkcs11 import Attribute, ObjectClass
token = pkcs11.lib(str(settings.module)).get_token(token_label=settings.token_label)
kinds = {{"secrkey": ObjectClass.SECRET_KEY, "privkey": ObjectClass.PRIVATE_KEY}}
with token.open(user_pin=settings.pin.reveal()) as session:
    for obj in session.get_objects({{Attribute.CLASS: kinds[{kind!r}]}}):
        print(obj[Attribute.LABEL])
""").split()


def _unwrap_on(node: TokenNode, key_id: str, blob: bytes, check: bytes, kek: str) -> str:
    """Try to unwrap ``blob`` into the node's token under KEK ``kek``; the exception's class
    and message ("" if it unwrapped)."""
    return _in_token(node, f"""
from authority.backends.pkcs11 import Pkcs11Backend
from authority.errors import AuthorityError
backend = Pkcs11Backend.open(settings)
try:
    backend.unwrap_key(bytes.fromhex({key_id!r}), bytes.fromhex({blob.hex()!r}),
                       bytes.fromhex({check.hex()!r}), {kek!r})
except AuthorityError as exc:
    print(type(exc).__name__, exc)
finally:
    backend.close()
""").strip()


def _in_token(node: TokenNode, body: str) -> str:
    """Run ``body`` in a process of its own with ``settings``, the node's embedded token's
    (SoftHSM2 reads its configuration once per process); its stdout."""
    script = f"""
from pathlib import Path
from authority.backends.softhsm import DEFAULT_LABEL, find_softhsm_module
from authority.config import Pkcs11Settings, Secret
hsm = Path({str(node.state / "hsm")!r})
settings = Pkcs11Settings(module=find_softhsm_module(), token_label=DEFAULT_LABEL,
                          pin=Secret((hsm / "user.pin").read_text().strip()),
                          softhsm2_conf=hsm / "softhsm2.conf", sessions=1)
{body}
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**os.environ, "SOFTHSM2_CONF": str(_embedded(node)[2])})
    assert done.returncode == 0, done.stderr
    return done.stdout



def test_the_timing_command_prints_its_figures() -> None:
    """``python -m authority.bench.tokens`` (docs/benchmarks.md) runs the whole scenario on a
    PostgreSQL of its own and prints every figure with the machine; no figure is judged."""
    done = subprocess.run([sys.executable, "-m", "authority.bench.tokens", "--rotations", "1"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for words in ("machine  ", "versions ", "cluster init:", "node b: cluster join",
                  "node c: cluster join",
                  "join to first redeem", "rotation to every replica holds the key",
                  "to the new key active on a and b"):
        assert words in done.stdout, done.stdout
