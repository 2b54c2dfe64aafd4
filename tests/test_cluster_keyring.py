"""The key ring as replicas share it (issue 13): several authorities (``Authority`` objects, each
with its own ``Pkcs11Backend`` and its own store connection) on ONE real SoftHSM2 token and one
store (a real PostgreSQL database, or one SQLite file as processes on one host share it), one
manual clock; then two real gRPC servers on PostgreSQL.

Pre-distribution (a new key PENDING until every live replica has it, or its publish delay),
compare-and-swap on the ring's version (two rotations at once make one key, the loser's key
destroyed), seal reservations across replicas (the nonce budget counts every replica's seals),
the maintenance lease and its fencing epoch, and the one re-read of the ring a ticket under an
unknown key id causes."""

from __future__ import annotations

import math
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.app import Authority
from authority.backends.pkcs11 import Pkcs11Backend, _keys
from authority.clock import ManualClock, SystemClock
from authority.cluster import MAINTENANCE
from authority.config import ClusterSettings
from authority.errors import ConfigError, DeviceUnavailable
from authority.keyring import UNKNOWN_KEY_REREAD_GAP
from authority.keys import KeyState
from authority.sealer import RedeemStatus
from authority.service.convert import state_from_proto
from authority.service.server import build_server
from authority.store.base import Fence, StaleFence, Store
from authority.ticket_format import (
    TICKET_ID_LEN,
    TicketContents,
    assemble_ticket,
    encode_contents,
    encode_header,
)
from tests.conftest import (
    START,
    at_once,
    issue,
    load_toml,
    redeem,
    sample_state,
    wait_until,
)
from tests.pkcs11_fixtures import requires_softhsm
from tests.postgres_fixtures import (  # noqa: F401
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.replica_fixtures import SharedToken

pytestmark = requires_softhsm

STORES = ["postgresql", "sqlite"]
TIMING = ClusterSettings(heartbeat_interval=1.0, replica_timeout=5.0, lease_duration=5.0)
PUBLISH_DELAY = 30.0
ROOT = Path(__file__).resolve().parent.parent


class Cluster(SharedToken):
    """Replicas on one token, one store and one manual clock; closed at teardown."""

    def __init__(self, tmp_path: Path, dsn: str | None) -> None:
        super().__init__(tmp_path, dsn, TIMING)
        self.clock = ManualClock(START)

    def start(self, store: Store | None = None, **keys: Any) -> Authority:
        """A new replica, loaded (registered, its first heartbeat written)."""
        keys.setdefault("publish_delay", PUBLISH_DELAY)
        return self.load(self.replica_config(**keys), store or self.open_store(), self.clock)

    def token_keys(self) -> set[bytes]:
        """What the token holds, listed through a fresh session of its own."""
        backend = Pkcs11Backend.open(replace(self.token, sessions=1))
        try:
            return backend.list_keys()
        finally:
            backend.close()

    def stored(self) -> dict[bytes, KeyState]:
        store = self.open_store()
        try:
            return {r.key_id: r.state for r in store.load_ring()[1]}
        finally:
            store.close()


@pytest.fixture(params=STORES)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    made = Cluster(tmp_path, dsn)
    yield made
    made.close()


@pytest.fixture
def pg_cluster(tmp_path: Path, postgres_dsn: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_dsn)
    yield made
    made.close()


def seal_under(authority: Authority, key_id: bytes, n: int = 0) -> bytes:
    """A well-formed ticket sealed by the device under ``key_id`` (whatever the ring says:
    what another replica would have issued)."""
    now = math.floor(authority.clock.now())
    state = state_from_proto(authority_pb2.IssueTicketRequest(state=sample_state(n)))
    plain = encode_contents(TicketContents(secrets.token_bytes(TICKET_ID_LEN), now, now + 3600,
                                           state))
    header = encode_header(key_id, authority.backend.format_version)
    return assemble_ticket(header, authority.backend.seal_many([(key_id, header, plain)])[0])


def opens(authority: Authority, ticket: bytes) -> RedeemStatus:
    return authority.sealer.redeem(ticket).status


def states(authority: Authority) -> dict[bytes, KeyState]:
    return {r.key_id: r.state for r in authority.ring.records()}


def audit_actions(c: Cluster) -> list[tuple[str, dict[str, Any]]]:
    """(action, details) of the cluster's audit chain, in order."""
    import json

    if c.dsn is None:
        lines = (c.tmp_path / "audit.log").read_text().splitlines()
        return [(e["action"], e["details"]) for e in map(json.loads, lines)]
    import psycopg

    with psycopg.connect(c.dsn) as conn:
        rows = conn.execute("SELECT action, details::text FROM audit ORDER BY seq").fetchall()
    return [(str(action), json.loads(details)) for action, details in rows]


# -- pre-distribution ----------------------------------------------------------------------------

def test_a_new_key_is_pending_until_every_live_replica_has_it(cluster: Cluster) -> None:
    a, b, c = (cluster.start() for _ in range(3))
    old = a.ring.primary_id
    assert old is not None and {b.ring.primary_id, c.ring.primary_id} == {old}
    before = a.sealer.issue(state_from_proto(authority_pb2.IssueTicketRequest(
        state=sample_state())))
    new, previous = a.ring.rotate(reason="operator", actor="local")
    assert new.state == KeyState.PENDING                       # RotateKey answers PENDING
    assert previous is not None and (previous.key_id, previous.state) == (old, KeyState.ACTIVE)
    assert states(a) == {old: KeyState.ACTIVE, new.key_id: KeyState.PENDING}
    assert a.sealer.issue(state_from_proto(authority_pb2.IssueTicketRequest(
        state=sample_state(1)))).key_id == old                    # the ACTIVE key still seals
    pending_ticket = seal_under(a, new.key_id)
    assert opens(a, pending_ticket) == RedeemStatus.OK           # PENDING opens
    b.heartbeat()
    assert states(b)[new.key_id] == KeyState.PENDING            # B has it, opens under it
    assert opens(b, pending_ticket) == RedeemStatus.OK
    a.heartbeat()
    assert cluster.stored()[new.key_id] == KeyState.PENDING     # C has not reported it
    assert b.ring.sealing_key() == old
    c.heartbeat()                                                # the last one: C publishes it
    assert cluster.stored() == {old: KeyState.DECRYPT_ONLY, new.key_id: KeyState.ACTIVE}
    for replica in (a, b):
        assert replica.ring.primary_id == old                    # not re-read yet
        replica.heartbeat()
    assert {r.ring.primary_id for r in (a, b, c)} == {new.key_id}
    assert {r.ring.pending_id for r in (a, b, c)} == {None}
    assert b.sealer.issue(state_from_proto(authority_pb2.IssueTicketRequest(
        state=sample_state(2)))).key_id == new.key_id
    assert opens(c, before.ticket) == RedeemStatus.OK            # the old key still opens
    (demoted,) = [r for r in c.ring.records() if r.key_id == old]
    # other replicas were live: a replica may seal with the old key until it notices
    assert demoted.opens_until == (demoted.sealing_ended_at or 0) + a.ring.max_lifetime + \
        TIMING.replica_timeout
    actions = audit_actions(cluster)
    assert ("key.created", {"key_id": new.key_id.hex(), "reason": "operator",
                            "state": "PENDING"}) in actions
    published = [d for action, d in actions if action == "key.published"]
    assert published == [{"key_id": new.key_id.hex(), "reason": "every live replica has it"}]
    assert [action for action, _ in actions][-2:] == ["key.published", "key.rotated"]


def test_a_replica_that_stops_heartbeating_holds_publication_only_while_live(
        cluster: Cluster) -> None:
    a, b, _ = (cluster.start() for _ in range(3))     # the third never heartbeats again
    new, _ = a.ring.rotate()
    assert new.state == KeyState.PENDING
    b.heartbeat()
    cluster.clock.advance(TIMING.replica_timeout)     # C's last heartbeat: exactly the bound
    a.heartbeat()
    b.heartbeat()
    assert a.ring.pending_id == new.key_id
    cluster.clock.advance(0.5)                        # C is no longer live
    a.heartbeat()
    assert a.ring.primary_id == new.key_id and a.ring.pending_id is None


def test_a_live_replica_that_never_reports_the_key_delays_it_by_the_publish_delay(
        cluster: Cluster) -> None:
    a, b = cluster.start(), cluster.start()
    new, _ = a.ring.rotate()
    stuck = next(r for r in b.store.load_replicas() if r.replica_id == b.replica.replica_id)
    for _ in range(int(PUBLISH_DELAY) // 2 - 1):      # B heartbeats without the key, 2 s apart
        cluster.clock.advance(2.0)
        b.store.heartbeat(replace(stuck, heartbeat_at=cluster.clock.now()))
        a.heartbeat()
        assert a.ring.pending_id == new.key_id
    cluster.clock.advance(new.created_at + PUBLISH_DELAY - cluster.clock.now())
    b.store.heartbeat(replace(stuck, heartbeat_at=cluster.clock.now()))
    a.heartbeat()
    assert a.ring.primary_id == new.key_id
    assert ("key.published", {"key_id": new.key_id.hex(), "reason": "publish delay passed"}
            ) in audit_actions(cluster)


def test_alone_a_rotation_seals_at_once(cluster: Cluster) -> None:
    """One replica, nobody else live (a stopped replica left the registry): ACTIVE at once,
    with no publication step and no extra window."""
    first = cluster.start()
    cluster.start().close()
    new, previous = first.ring.rotate()
    assert new.state == KeyState.ACTIVE and previous is not None
    assert previous.state == KeyState.DECRYPT_ONLY
    assert previous.opens_until == (previous.sealing_ended_at or 0) + first.ring.max_lifetime
    assert "key.published" not in [action for action, _ in audit_actions(cluster)]


def test_rotation_under_load_never_makes_a_valid_ticket_invalid(cluster: Cluster) -> None:
    """B and C issue and redeem each other's tickets on threads while A rotates and the
    replicas heartbeat (the key is published, then every replica switches): every redeem
    is OK, before and after the new key seals."""
    a, b, c = (cluster.start() for _ in range(3))
    old = a.ring.primary_id
    stop = threading.Event()
    outcomes: list[tuple[bytes, RedeemStatus]] = []
    errors: list[BaseException] = []

    def load(issuer: Authority, redeemer: Authority, offset: int) -> None:
        n = offset
        try:
            while not stop.is_set():
                issued = issuer.sealer.issue(state_from_proto(
                    authority_pb2.IssueTicketRequest(state=sample_state(n))))
                outcomes.append((issued.key_id, opens(redeemer, issued.ticket)))
                n += 2
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(b, c, 0)),
               threading.Thread(target=load, args=(c, b, 1))]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(outcomes) >= 20)
        new, _ = a.ring.rotate()
        assert new.state == KeyState.PENDING
        wait_until(lambda: len(outcomes) >= 40)
        for replica in (b, c, a, b, c):   # published by A, then B and C switch
            replica.heartbeat()
        seen = len(outcomes)
        wait_until(lambda: len(outcomes) >= seen + 40)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert {status for _, status in outcomes} == {RedeemStatus.OK}
    keys = [key_id for key_id, _ in outcomes]
    assert keys[0] == old and keys[-1] == new.key_id
    assert keys.index(new.key_id) > 40        # nothing sealed under it while PENDING


# -- compare-and-swap on the ring's version ------------------------------------------------------


@pytest.mark.parametrize("publish_delay", [PUBLISH_DELAY, 0.0])
def test_two_rotations_at_once_make_one_new_key(cluster: Cluster, publish_delay: float) -> None:
    a, b = cluster.start(publish_delay=publish_delay), cluster.start(publish_delay=publish_delay)
    made = 1   # the first key
    for _ in range(3):
        cluster.clock.advance(1)   # each round later (the previous key: the last to stop)
        old = a.ring.primary_id
        outcomes = at_once([lambda: a.ring.rotate(actor="alice"),
                             lambda: b.ring.rotate(actor="bob")])
        (new_a, prev_a), (new_b, prev_b) = outcomes
        assert prev_a is not None and prev_b is not None
        if new_a.key_id == new_b.key_id:                      # they overlapped: one outcome
            assert new_a.key_id != old and prev_a.key_id == prev_b.key_id == old
            made += 1
        else:   # a loaded machine ran them one after the other: the later one seals now
            assert old in {prev_a.key_id, prev_b.key_id}
            sealing = [k for k, state in cluster.stored().items() if state == KeyState.ACTIVE]
            assert len(sealing) == 1 and sealing[0] in {new_a.key_id, new_b.key_id}
            new_a = new_a if sealing[0] == new_a.key_id else new_b   # never two (below too)
            made += 2
        for replica in (a, b):
            replica.heartbeat()
        a.heartbeat()
        stored = cluster.stored()
        assert [k for k, s in stored.items() if s == KeyState.ACTIVE] == [new_a.key_id]
        assert KeyState.PENDING not in stored.values() and KeyState.CREATING not in \
            stored.values()
        assert {r.ring.primary_id for r in (a, b)} == {new_a.key_id}
        assert states(a) == states(b) == {k: s for k, s in stored.items()}
        live = {k for k, s in stored.items() if s != KeyState.DESTROYED}
        assert cluster.token_keys() == live                   # no orphan in the token
    assert len(cluster.stored()) == made   # the first key and one per round (two if sequential)


def test_retire_on_two_replicas_at_once_and_beside_a_rotation_is_consistent(
        cluster: Cluster) -> None:
    """RetireKey of one key on two replicas at once: both answer it DESTROYED, the token no
    longer has it, the ring has it DESTROYED everywhere. Then a retirement on A while B
    rotates: one sealing key, the retired key destroyed, no orphan: the token holds exactly
    the ring's live keys."""
    a, b = cluster.start(publish_delay=0.0), cluster.start(publish_delay=0.0)
    for _ in range(2):
        cluster.clock.advance(1)
        a.ring.rotate(actor="alice")
    b.heartbeat()
    old = [k for k, s in cluster.stored().items() if s == KeyState.DECRYPT_ONLY]
    assert len(old) == 2
    done = at_once([lambda: a.ring.retire(old[0], actor="alice"),
                    lambda: b.ring.retire(old[0], actor="bob")])
    assert [r.state for r in done] == [KeyState.DESTROYED, KeyState.DESTROYED]
    assert cluster.stored()[old[0]] == KeyState.DESTROYED
    assert old[0] not in cluster.token_keys()
    cluster.clock.advance(1)
    retired, (new, _) = at_once([lambda: a.ring.retire(old[1], actor="alice"),
                                 lambda: b.ring.rotate(actor="bob")])
    assert retired.state == KeyState.DESTROYED
    for replica in (a, b):
        replica.heartbeat()
    stored = cluster.stored()
    assert [k for k, s in stored.items() if s == KeyState.ACTIVE] == [new.key_id]
    assert stored[old[1]] == KeyState.DESTROYED
    assert cluster.token_keys() == {k for k, s in stored.items() if s != KeyState.DESTROYED}
    assert states(a) == states(b) == stored


class CommitsAfter:
    """A store that, once, runs ``before`` at the start of a key ring commit (another replica
    committing first, exactly between this replica's decision and its compare-and-swap)."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.before: Callable[[], object] | None = None

    def commit_ring(self, *args: Any, **kwargs: Any) -> Any:
        before, self.before = self.before, None
        if before is not None:
            before()
        return self._inner.commit_ring(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_rotation_that_loses_the_compare_and_swap_destroys_its_key(cluster: Cluster) -> None:
    a = cluster.start()
    interposed = CommitsAfter(cluster.open_store())
    b = cluster.start(store=interposed)   # type: ignore[arg-type]
    old = a.ring.primary_id
    won: list[Any] = []
    interposed.before = lambda: won.append(a.ring.rotate(actor="alice"))
    new, previous = b.ring.rotate(actor="bob")
    assert new.key_id == won[0][0].key_id and previous is not None and previous.key_id == old
    assert b.ring.pending_id == new.key_id                # B adopted the winner's ring
    actions = audit_actions(cluster)
    lost = [d["key_id"] for action, d in actions if action == "key.abandoned"]
    assert len(lost) == 1 and bytes.fromhex(lost[0]) not in cluster.stored()
    assert cluster.token_keys() == {old, new.key_id}      # the loser's key destroyed
    assert actions.index(("key.created", {"key_id": lost[0], "reason": "operator",
                                          "state": "PENDING"})) < actions.index(
        ("key.abandoned", {"key_id": lost[0], "in_device": True,
                           "reason": "another rotation won"}))


_REPLICA_A = """
import sys
from pathlib import Path
from authority.clock import ManualClock
from authority.config import ClusterSettings
from tests.conftest import START
from tests.replica_fixtures import SharedToken
shared = SharedToken(Path(sys.argv[1]), sys.argv[2], ClusterSettings(
    heartbeat_interval=1.0, replica_timeout=5.0, lease_duration=5.0))
a = shared.load(shared.replica_config("process-a", publish_delay=30.0), shared.open_store(),
                ManualClock(START))
print("ready", flush=True)
sys.stdin.readline()
new, _ = a.ring.rotate(actor="alice")
print(new.key_id.hex(), flush=True)
sys.stdin.readline()
shared.close()
"""


def test_the_loser_of_two_rotations_in_two_processes_sees_the_winner(
        pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica A, in a process of its own, rotates exactly between replica B's look for its
    new key's id in the token and B's making of that key (forced by running A from the look);
    B then loses the compare-and-swap and destroys its key. SoftHSM2 2.6.1 no longer shows
    B's process A's key (B's create bumped the token's generation from what was on disk,
    absorbing A's bump; tests/test_cluster_e2e.py). B's heartbeat must still report A's key
    loaded, and B's device must seal under it (failed before the key ring refreshed the
    device's view before concluding a key absent: not reported, so the key sealed only after
    keys.publish_delay, and B could not open tickets under it)."""
    a = subprocess.Popen([sys.executable, "-c", _REPLICA_A, str(pg_cluster.tmp_path),
                          str(pg_cluster.dsn)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert a.stdin is not None and a.stdout is not None
    try:
        assert a.stdout.readline().strip() == "ready"
        b = pg_cluster.start()
        won: list[bytes] = []
        real_search = _keys.search

        def search_then_a_rotates(session: Any, key_id: bytes, by_label_only: bool) -> Any:
            found = real_search(session, key_id, by_label_only)
            if not won:
                assert a.stdin is not None and a.stdout is not None
                a.stdin.write("go\n")
                a.stdin.flush()
                won.append(bytes.fromhex(a.stdout.readline().strip()))
            return found

        monkeypatch.setattr(_keys, "search", search_then_a_rotates)
        new, _ = b.ring.rotate(actor="bob")
        monkeypatch.undo()
        assert new.key_id == won[0] and b.ring.pending_id == won[0]   # B lost the swap
        b.heartbeat()
        store = pg_cluster.open_store()
        rows = {r.replica_id: r for r in store.load_replicas()}
        store.close()
        assert won[0] in rows[b.ring.replica.replica_id].loaded
        b.backend.seal(won[0], b"aad", b"B's device opens and seals under A's key")
    finally:
        a.stdin.write("done\n")
        a.stdin.flush()
        assert a.wait(timeout=60) == 0


# -- seal reservations ---------------------------------------------------------------------------

def test_seal_reservations_of_replicas_never_overlap(cluster: Cluster) -> None:
    """Three replicas seal at once past a small budget: no key ever gives more seals than its
    budget, and a spent key is replaced once (never two sealing keys)."""
    budget, block = 50, 4
    replicas = [cluster.start(max_seals_per_key=budget, seal_reservation=block,
                              publish_delay=0.0) for _ in range(3)]
    got = at_once([lambda r=r: [r.ring.sealing_key() for _ in range(40)]  # type: ignore[misc]
                    for r in replicas])
    per_key: dict[bytes, int] = {}
    for seals in got:
        for key_id in seals:
            per_key[key_id] = per_key.get(key_id, 0) + 1
    assert sum(per_key.values()) == 120
    store = cluster.open_store()
    try:
        stored = {r.key_id: r for r in store.load_ring()[1]}
    finally:
        store.close()
    for key_id, count in per_key.items():
        assert count <= stored[key_id].seal_count <= budget
    spent = [k for k, r in stored.items() if r.seal_count == budget]
    assert spent and all(stored[k].state == KeyState.DECRYPT_ONLY for k in spent)
    assert [r.state for r in stored.values()].count(KeyState.ACTIVE) == 1
    # what the replicas did not use of their blocks is at most a block each
    assert sum(stored[k].seal_count for k in spent) - sum(per_key[k] for k in spent) <= \
        3 * (block - 1) * len(spent)


def test_a_spent_key_in_a_cluster_waits_for_its_successor(cluster: Cluster) -> None:
    a, b = (cluster.start(max_seals_per_key=3, seal_reservation=2) for _ in range(2))
    spent = a.ring.primary_id
    assert [a.ring.sealing_key() for _ in range(3)] == [spent] * 3
    with pytest.raises(DeviceUnavailable, match="still pending publication"):
        a.ring.sealing_key()
    successor = a.ring.pending_id
    assert successor is not None
    with pytest.raises(DeviceUnavailable):
        b.ring.sealing_key()                       # B finds the key spent: no second key
    assert b.ring.pending_id == successor
    b.heartbeat()
    a.heartbeat()
    assert a.ring.sealing_key() == successor == b.ring.sealing_key()


def test_a_replica_seals_only_with_a_confirmed_ring(cluster: Cluster) -> None:
    """A replica that has not confirmed its ring for ``replica_timeout`` re-reads it before it
    seals: it stops sealing with a key another replica replaced within that bound."""
    a, b = cluster.start(publish_delay=0.0), cluster.start(publish_delay=0.0)
    old = b.ring.sealing_key()
    new, _ = a.ring.rotate()
    assert new.state == KeyState.ACTIVE
    assert b.ring.sealing_key() == old               # within the bound: its block of the old key
    cluster.clock.advance(TIMING.replica_timeout + 0.1)
    assert b.ring.sealing_key() == new.key_id        # confirmed first: the new key


# -- the maintenance lease -----------------------------------------------------------------------

def test_the_lease_moves_when_its_holder_stops_renewing(cluster: Cluster) -> None:
    a = cluster.start(rotation_period=600)
    b = cluster.start(rotation_period=600)
    a.maintain()
    b.maintain()
    assert (a.lease.epoch, b.lease.epoch) == (1, None)
    cluster.clock.advance(TIMING.lease_duration - 1)
    b.maintain()
    assert b.lease.epoch is None                     # not expired yet
    stale = Fence(MAINTENANCE, a.replica.replica_id, 1)   # A stalls from here on
    cluster.clock.advance(1)
    b.maintain()
    assert b.lease.epoch == 2
    lease = b.store.load_lease(MAINTENANCE)
    assert lease is not None and lease.holder == b.replica.replica_id
    cluster.clock.advance(600)                       # a rotation is due
    assert b.heartbeat()                             # B renews (each heartbeat)
    version = cluster.open_store().ring_version()
    with pytest.raises(StaleFence):                  # A wakes up and acts on its old lease
        a.ring.maintain(stale)
    assert cluster.open_store().ring_version() == version    # nothing written
    assert cluster.token_keys() == {k for k, s in cluster.stored().items()
                                    if s != KeyState.DESTROYED}   # its new key destroyed
    a.maintain()                                     # its next pass: it learns it lost it
    assert a.lease.epoch is None
    b.maintain()                                     # the holder rotates (A is live: PENDING)
    assert b.ring.pending_id is not None
    b.close()                                        # a clean stop releases the lease
    cluster.members.remove(b)
    a.maintain()
    assert a.lease.epoch == 3


def test_a_rotation_refused_by_its_fence_audits_its_key_abandoned(cluster: Cluster) -> None:
    """A stalled holder's scheduled rotation audits ``key.created``, then its fenced commit is
    refused: the chain must also say the key was abandoned (before: the chain kept a
    ``key.created`` for a key that never entered the ring; found by chaos replica-kill)."""
    a = cluster.start(rotation_period=600)
    b = cluster.start(rotation_period=600)
    a.maintain()
    stale = Fence(MAINTENANCE, a.replica.replica_id, 1)
    cluster.clock.advance(TIMING.lease_duration)
    b.maintain()                                     # B takes the lease over
    cluster.clock.advance(600)                       # a rotation is due
    with pytest.raises(StaleFence):
        a.ring.maintain(stale)
    actions = audit_actions(cluster)
    created = [d["key_id"] for action, d in actions if action == "key.created"
               and d.get("reason") != "first key"]
    abandoned = {d["key_id"]: d for action, d in actions if action == "key.abandoned"}
    assert created and created[-1] in abandoned
    assert created[-1] not in {k.hex() for k in cluster.stored()}
    assert "StaleFence" in abandoned[created[-1]]["reason"]


# -- a key made on another replica, met on a stale replica ---------------------------------------

class CountingStore:
    """A store that counts the key ring reads a replica makes."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.reads = 0

    def ring_version(self) -> int:
        self.reads += 1
        return self._inner.ring_version()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FailingRingReads(CountingStore):
    """A store whose key ring version reads fail while ``failing`` (the store out of reach for
    that one read: a timeout, a dropped connection), everything else answering."""

    failing = False

    def ring_version(self) -> int:
        if self.failing:
            raise DeviceUnavailable("state store: connection lost")
        return super().ring_version()


def test_an_unknown_key_id_is_unavailable_when_its_reread_fails(cluster: Cluster) -> None:
    """The re-read a ticket under an unknown key id causes fails: the ticket is UNAVAILABLE
    (only the store could say whether another replica made the key), not INVALID; once the
    store answers, it redeems. Failed before (INVALID) when nothing else marked the store out
    of reach (SQLite; a PostgreSQL statement timeout)."""
    a = cluster.start(publish_delay=0.0)
    flaky = FailingRingReads(cluster.open_store())
    b = cluster.start(store=flaky, publish_delay=0.0)   # type: ignore[arg-type]
    a.ring.rotate()
    ticket = a.sealer.issue(state_from_proto(authority_pb2.IssueTicketRequest(
        state=sample_state()))).ticket
    flaky.failing = True
    [result] = b.sealer.redeem_many([(ticket, False)])
    assert isinstance(result, DeviceUnavailable) and "items[0].ticket" in result.message
    [again] = b.sealer.redeem_many([(ticket, False)])   # within the gap: the same answer
    assert isinstance(again, DeviceUnavailable)
    flaky.failing = False
    cluster.clock.advance(UNKNOWN_KEY_REREAD_GAP)
    assert opens(b, ticket) == RedeemStatus.OK


def test_a_ticket_under_a_key_made_elsewhere_costs_one_reread(cluster: Cluster) -> None:
    a = cluster.start(publish_delay=0.0)
    counted = CountingStore(cluster.open_store())
    b = cluster.start(store=counted, publish_delay=0.0)   # type: ignore[arg-type]
    new, _ = a.ring.rotate()
    assert new.state == KeyState.ACTIVE and not b.ring.knows(new.key_id)
    ticket = a.sealer.issue(state_from_proto(authority_pb2.IssueTicketRequest(
        state=sample_state()))).ticket
    counted.reads = 0
    assert opens(b, ticket) == RedeemStatus.OK            # B re-read its ring once
    assert counted.reads == 1 and b.ring.knows(new.key_id)
    garbage = [ticket[:4] + secrets.token_bytes(8) + ticket[12:] for _ in range(50)]
    cluster.clock.advance(UNKNOWN_KEY_REREAD_GAP)
    counted.reads = 0
    results = b.sealer.redeem_many([(t, False) for t in garbage])
    assert {r.status for r in results if not isinstance(r, Exception)} == {
        RedeemStatus.INVALID}
    assert counted.reads == 1                             # once for the whole request
    for t in garbage[:10]:                                # within the gap: no re-read at all
        assert opens(b, t) == RedeemStatus.INVALID
    assert counted.reads == 1
    cluster.clock.advance(UNKNOWN_KEY_REREAD_GAP)
    assert opens(b, garbage[0]) == RedeemStatus.INVALID
    assert counted.reads == 2


# -- over gRPC: two servers on one PostgreSQL database -------------------------------------------

def test_rotate_key_over_grpc_answers_pending_then_the_key_seals(pg_cluster: Cluster) -> None:
    a, b = pg_cluster.start(), pg_cluster.start()
    servers = [build_server(replica.config, authority=replica) for replica in (a, b)]
    pg_cluster.members.clear()           # the servers close their authorities
    channels = [grpc.insecure_channel(s.address) for s in servers]
    try:
        tickets = [authority_pb2_grpc.TicketAuthorityStub(ch) for ch in channels]
        admins = [admin_pb2_grpc.TicketAdminStub(ch) for ch in channels]
        old = issue(tickets[0])
        rotated = admins[0].RotateKey(admin_pb2.RotateKeyRequest())
        assert rotated.new_key.state == admin_pb2.KEY_STATE_PENDING
        assert rotated.previous_key.key_id == old.key_id
        assert rotated.previous_key.state == admin_pb2.KEY_STATE_ACTIVE   # still sealing
        listed = admins[0].ListKeys(admin_pb2.ListKeysRequest()).keys
        assert [(k.key_id, k.state) for k in listed] == [
            (old.key_id, admin_pb2.KEY_STATE_ACTIVE),
            (rotated.new_key.key_id, admin_pb2.KEY_STATE_PENDING)]
        assert issue(tickets[1]).key_id == old.key_id
        again = admins[1].RotateKey(admin_pb2.RotateKeyRequest())   # the rotation in progress
        assert again.new_key.key_id == rotated.new_key.key_id
        b.heartbeat()
        a.heartbeat()
        b.heartbeat()
        fresh = issue(tickets[1])
        assert fresh.key_id == rotated.new_key.key_id
        assert redeem(tickets[0], fresh.ticket).result == authority_pb2.REDEEM_RESULT_OK
        assert redeem(tickets[1], old.ticket).result == authority_pb2.REDEEM_RESULT_OK
        with pytest.raises(grpc.RpcError) as err:     # the sealing key: refused on either
            admins[1].RetireKey(admin_pb2.RetireKeyRequest(key_id=fresh.key_id))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        states_b = {k.key_id: k.state for k in admins[1].ListKeys(
            admin_pb2.ListKeysRequest()).keys}
        assert states_b == {old.key_id: admin_pb2.KEY_STATE_DECRYPT_ONLY,
                            fresh.key_id: admin_pb2.KEY_STATE_ACTIVE}
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop(grace=1.0)


# -- the background loop, on the real clock ------------------------------------------------------

def test_the_replicas_loops_publish_a_key_and_move_the_lease(pg_cluster: Cluster) -> None:
    """Two replicas heartbeating on their own (start_maintenance, real time, short bounds):
    a rotation on the non-holder is published by the heartbeats; when the holder stops, the
    other takes the lease over."""
    pg_cluster.clock = SystemClock()   # type: ignore[assignment]
    pg_cluster.timing = ClusterSettings(heartbeat_interval=0.1, replica_timeout=1.0,
                                        lease_duration=0.5)
    a, b = (pg_cluster.start(maintenance_interval=0.2) for _ in range(2))
    for replica in (a, b):
        replica.start_maintenance()
    wait_until(lambda: a.lease.epoch is not None or b.lease.epoch is not None)
    holder, other = (a, b) if a.lease.epoch is not None else (b, a)
    new, _ = other.ring.rotate()
    wait_until(lambda: holder.ring.primary_id == other.ring.primary_id == new.key_id)
    epoch = holder.lease.epoch
    assert epoch is not None
    holder.stop_maintenance()   # the holder stalls: no more heartbeats nor renewals
    wait_until(lambda: other.lease.epoch == epoch + 1)
    assert holder.lease.hold() is None


# -- settings ------------------------------------------------------------------------------------

def test_cluster_settings_and_publish_delay(tmp_path: Path) -> None:
    config = load_toml(tmp_path, "[keys]\npublish_delay = 0\n[cluster]\nheartbeat_interval = 2\n"
                                 "replica_timeout = 10\nlease_duration = 6.5\n")
    assert config.keys.publish_delay == 0.0
    assert config.cluster == ClusterSettings(heartbeat_interval=2.0, replica_timeout=10.0,
                                             lease_duration=6.5)
    assert load_toml(tmp_path, "").cluster == ClusterSettings()
    for text, setting in [("[keys]\npublish_delay = -1\n", "keys.publish_delay"),
                          ("[cluster]\nheartbeat_interval = 0\n", "cluster.heartbeat_interval"),
                          ("[cluster]\nreplica_timeout = 1.5\n", "cluster.replica_timeout"),
                          ("[cluster]\nlease_duration = 1\n", "cluster.lease_duration"),
                          ("[cluster]\nnodes = 3\n", "cluster.nodes")]:
        with pytest.raises(ConfigError, match=rf"^{setting}:"):
            load_toml(tmp_path, text)
