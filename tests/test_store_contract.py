"""The Store interface (authority/store/base.py) as one contract, run over both stores: the
embedded SQLite file and a PostgreSQL database (a real server, tests/postgres_fixtures.py).
Then what only the PostgreSQL store has (its schema, migrations, failures), and an authority on
PostgreSQL over real gRPC (real SoftHSM2)."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.config import PostgresSettings, Secret
from authority.errors import DeviceUnavailable, StartupError
from authority.keys import KeyRecord, KeyState
from authority.store.base import (
    JOIN_REQUEST_TTL,
    Fence,
    JoinRequest,
    KekDelivery,
    LeaseRecord,
    NodeRecord,
    ReplicaRecord,
    RevocationRecord,
    StaleFence,
    Store,
    WrappedKey,
)
from authority.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from authority.store.sqlite import SqliteStore
from tests.conftest import START, Harness, at_once, issue, load_toml, make_config, redeem
from tests.postgres_fixtures import (  # noqa: F401
    postgres_dsn_fixture,
    postgres_server_fixture,
)

STORES = ["sqlite", "postgresql"]
K1, K2, K3 = (bytes([n]) * 8 for n in (1, 2, 3))
LATER = int(START) + 3600

OpenStore = Callable[[], Store]


def pg_settings(dsn: str, **changes: Any) -> PostgresSettings:
    return replace(PostgresSettings(dsn=Secret(dsn), pool_size=4), **changes)


def open_postgres(dsn: str, **changes: Any) -> Store:
    from authority.store.postgres import PostgresStore

    return PostgresStore(pg_settings(dsn, **changes))


@pytest.fixture(params=STORES)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store on this test's location (a SQLite file, a fresh PostgreSQL database):
    call it again for a reopen, or a second process's store on the same state."""
    opened: list[Store] = []
    if request.param == "sqlite":
        def make() -> Store:
            return SqliteStore(tmp_path / "authority.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn")

        def make() -> Store:
            return open_postgres(dsn)

    def tracked() -> Store:
        opened.append(make())
        return opened[-1]

    yield tracked
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: OpenStore) -> Store:
    return open_store()


def in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` for i in 0..count-1 on as many threads started at once; their results
    (an exception, or a thread that does not finish, fails the test)."""
    return at_once([lambda i=i: work(i) for i in range(count)])  # type: ignore[misc]


# -- the key ring -------------------------------------------------------------------------------

def test_keys_round_trip_oldest_first_and_replace(store: Store) -> None:
    assert store.load_keys() == []
    newer = KeyRecord(K1, KeyState.ACTIVE, START + 10, seal_count=4096)
    older = KeyRecord(K2, KeyState.DECRYPT_ONLY, START, seal_count=7, sealing_ended_at=START + 10,
                      opens_until=START + 3610)
    store.save_keys([newer, older])
    assert store.load_keys() == [older, newer]
    gone = replace(older, state=KeyState.DESTROYED, destroyed_at=START + 3611)
    store.save_keys([gone])
    assert store.load_keys() == [gone, newer]
    store.save_keys([])
    assert store.load_keys() == [gone, newer]


def test_every_key_state_is_kept(store: Store) -> None:
    records = [KeyRecord(bytes([n]) * 8, state, START + n) for n, state in enumerate(KeyState)]
    store.save_keys(records)
    assert store.load_keys() == records


def test_delete_keys_removes_only_those(store: Store) -> None:
    store.save_keys([KeyRecord(k, KeyState.CREATING, START + n)
                     for n, k in enumerate((K1, K2, K3))])
    store.delete_keys([K1, K3, bytes(8)])
    assert [r.key_id for r in store.load_keys()] == [K2]
    store.delete_keys([])
    assert [r.key_id for r in store.load_keys()] == [K2]


def test_save_keys_never_lowers_a_seal_count(open_store: OpenStore) -> None:
    """A process saving its (older) copy of a record keeps the seals another reserved."""
    mine, other = open_store(), open_store()
    record = KeyRecord(K1, KeyState.ACTIVE, START, seal_count=100)
    mine.save_keys([record])
    assert other.reserve_seals(K1, 50, 1000) == (100, 150)
    mine.save_keys([replace(record, seal_count=120)])     # a stale count, another change
    mine.save_keys([replace(record, state=KeyState.DECRYPT_ONLY, seal_count=0,
                            sealing_ended_at=START + 1)])
    (stored,) = other.load_keys()
    assert stored.seal_count == 150
    assert stored.state == KeyState.DECRYPT_ONLY and stored.sealing_ended_at == START + 1
    mine.save_keys([replace(stored, seal_count=200)])     # raising it is kept
    assert other.load_keys()[0].seal_count == 200


def test_reserve_seals_grants_blocks_up_to_the_limit(store: Store) -> None:
    store.save_keys([KeyRecord(K1, KeyState.ACTIVE, START)])
    assert store.reserve_seals(K1, 40, 100) == (0, 40)
    assert store.reserve_seals(K1, 40, 100) == (40, 80)
    assert store.reserve_seals(K1, 40, 100) == (80, 100)    # capped at the limit
    assert store.load_keys()[0].seal_count == 100
    assert store.reserve_seals(K1, 40, 100) is None         # spent
    assert store.reserve_seals(K1, 40, 150) == (100, 140)   # a larger limit grants again
    assert store.load_keys()[0].seal_count == 140


@pytest.mark.parametrize("state", [s for s in KeyState if s != KeyState.ACTIVE])
def test_reserve_seals_only_for_an_active_key(store: Store, state: KeyState) -> None:
    store.save_keys([KeyRecord(K1, state, START, seal_count=5)])
    assert store.reserve_seals(K1, 10, 100) is None
    assert store.reserve_seals(K2, 10, 100) is None         # unknown
    assert store.load_keys()[0].seal_count == 5


def test_concurrent_reservations_never_overlap_nor_pass_the_limit(
        open_store: OpenStore) -> None:
    """Two stores on the same state (two processes), four threads each, reserving until the
    budget is spent: the ranges are disjoint and cover exactly 0..limit."""
    stores = [open_store(), open_store()]
    stores[0].save_keys([KeyRecord(K1, KeyState.ACTIVE, START)])
    limit, block = 500, 7

    def reserve(i: int) -> list[tuple[int, int]]:
        got = []
        while (grant := stores[i % 2].reserve_seals(K1, block, limit)) is not None:
            got.append(grant)
        return got

    ranges = sorted(r for got in in_threads(8, reserve) for r in got)
    assert ranges[0][0] == 0 and ranges[-1][1] == limit
    for (_, end), (first, _) in itertools.pairwise(ranges):
        assert first == end, f"overlap or gap at {end}/{first}"
    assert all(0 < e - f <= block for f, e in ranges)
    assert stores[1].load_keys()[0].seal_count == limit


# -- the key ring's version, leases, replicas (issue 13: replicas share the key ring) -----------

def test_the_ring_version_moves_only_by_compare_and_swap(open_store: OpenStore) -> None:
    mine, other = open_store(), open_store()
    assert mine.ring_version() == 0 and mine.load_ring() == (0, [])
    first = KeyRecord(K1, KeyState.ACTIVE, START)
    assert mine.commit_ring(0, [first]) == 1
    assert mine.commit_ring(0, [KeyRecord(K2, KeyState.ACTIVE, START + 1)]) is None  # moved
    assert other.load_ring() == (1, [first])                 # nothing of the loser written
    creating = KeyRecord(K3, KeyState.CREATING, START + 2)
    mine.save_keys([creating])                               # bookkeeping: not a ring change
    assert other.ring_version() == 1
    pending = KeyRecord(K2, KeyState.PENDING, START + 3)
    assert other.commit_ring(1, [pending], delete=[K3]) == 2
    assert mine.load_ring() == (2, [first, pending])
    assert mine.commit_ring(2, [], delete=[]) == 3           # an empty change still moves it
    assert other.ring_version() == 3


def test_commit_ring_never_lowers_a_seal_count(open_store: OpenStore) -> None:
    mine, other = open_store(), open_store()
    record = KeyRecord(K1, KeyState.ACTIVE, START, seal_count=10)
    assert mine.commit_ring(0, [record]) == 1
    assert other.reserve_seals(K1, 40, 1000) == (10, 50)     # no version move
    demoted = replace(record, state=KeyState.DECRYPT_ONLY, sealing_ended_at=START + 5)
    assert mine.commit_ring(1, [demoted]) == 2
    assert other.load_ring() == (2, [replace(demoted, seal_count=50)])


def test_concurrent_ring_commits_one_wins(open_store: OpenStore) -> None:
    """Eight writers on two stores commit at the same version: exactly one does."""
    stores = [open_store(), open_store()]
    outcomes = in_threads(8, lambda i: stores[i % 2].commit_ring(
        0, [KeyRecord(bytes([i + 1]) * 8, KeyState.ACTIVE, START)]))
    assert sorted(outcomes, key=str) == [1] + [None] * 7
    winner = outcomes.index(1)
    assert stores[0].load_ring() == (1, [KeyRecord(bytes([winner + 1]) * 8, KeyState.ACTIVE,
                                                   START)])


def test_a_lease_is_renewed_by_its_holder_and_taken_over_once_expired(
        open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    assert a.load_lease("maintenance") is None
    assert a.acquire_lease("maintenance", "A", START, 5) == 1
    assert b.acquire_lease("maintenance", "B", START + 4.9, 5) is None
    assert a.acquire_lease("maintenance", "A", START + 4, 5) == 1       # renewed: same epoch
    assert b.acquire_lease("maintenance", "B", START + 8.9, 5) is None
    assert a.acquire_lease("maintenance", "A", START + 20, 5) == 1      # expired, not taken
    assert b.load_lease("maintenance") == LeaseRecord("maintenance", "A", 1, START + 25)
    assert b.acquire_lease("maintenance", "B", START + 25, 5) == 2      # expired: taken over
    assert a.acquire_lease("maintenance", "A", START + 26, 5) is None   # A learns it lost it
    a.release_lease("maintenance", "A")                                 # not A's: no effect
    assert a.load_lease("maintenance") == LeaseRecord("maintenance", "B", 2, START + 30)
    b.release_lease("maintenance", "B")                                 # a clean stop
    assert a.acquire_lease("maintenance", "A", START + 27, 5) == 3
    assert a.acquire_lease("other", "B", START, 5) == 1                 # leases are per name


def test_concurrent_takers_of_an_expired_lease_one_wins(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    assert stores[0].acquire_lease("maintenance", "old", START, 5) == 1
    got = in_threads(8, lambda i: stores[i % 2].acquire_lease("maintenance", f"r{i}",
                                                              START + 10, 5))
    assert sorted(got, key=str) == [2] + [None] * 7
    lease = stores[1].load_lease("maintenance")
    assert lease is not None and lease.holder == f"r{got.index(2)}" and lease.epoch == 2


def test_a_fenced_ring_commit_is_refused_after_a_takeover(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    fence_a = Fence("maintenance", "A", a.acquire_lease("maintenance", "A", START, 5) or 0)
    assert a.commit_ring(0, [KeyRecord(K1, KeyState.ACTIVE, START)], fence=fence_a) == 1
    fence_b = Fence("maintenance", "B", b.acquire_lease("maintenance", "B", START + 6, 5) or 0)
    assert fence_b.epoch == 2
    with pytest.raises(StaleFence, match="another replica took it over"):   # A woke up late
        a.commit_ring(1, [KeyRecord(K2, KeyState.PENDING, START + 7)], fence=fence_a)
    with pytest.raises(DeviceUnavailable):   # what a maintenance pass catches and retries
        a.commit_ring(1, [], fence=fence_a)
    assert b.load_ring() == (1, [KeyRecord(K1, KeyState.ACTIVE, START)])   # nothing written
    with pytest.raises(StaleFence):          # a fence of a lease never taken
        a.commit_ring(1, [], fence=Fence("nobody", "A", 1))
    assert b.commit_ring(1, [KeyRecord(K2, KeyState.PENDING, START + 7)], fence=fence_b) == 2
    assert a.commit_ring(2, [], fence=None) == 3             # unfenced: CAS only


def test_replicas_heartbeat_are_listed_and_purged(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    assert a.load_replicas() == []
    first = ReplicaRecord("r1", "host-a", 101, START, START + 1, 3, frozenset({K1, K2}))
    second = ReplicaRecord("r2", "host-b", 202, START + 0.5, START + 2, 2, frozenset())
    a.heartbeat(first)
    b.heartbeat(second)
    assert b.load_replicas() == [first, second]
    later = replace(first, heartbeat_at=START + 9, ring_version=4, loaded=frozenset({K3}))
    a.heartbeat(later)
    assert b.load_replicas() == [later, second]
    assert a.purge_replicas(START + 2) == 0                  # heartbeat_at == before: kept
    assert a.purge_replicas(START + 3) == 1
    assert b.load_replicas() == [later]
    b.remove_replica("r1")
    b.remove_replica("nobody")
    assert a.load_replicas() == []


# -- the consumed set ---------------------------------------------------------------------------

def test_consume_many_answers_per_item(store: Store) -> None:
    a, b, c, d = (bytes([n]) * 16 for n in (1, 2, 3, 4))
    assert store.consume_many([], START) == []
    assert store.consume_many([(a, LATER)], START) == [True]
    # already consumed, new, repeated within the batch (first occurrence new), new
    assert store.consume_many([(a, LATER), (b, LATER), (b, LATER), (c, LATER), (a, LATER)],
                              START) == [False, True, False, True, False]
    assert store.consume_many([(d, LATER), (d, LATER)], START) == [True, False]
    assert store.consumed_among([a, b, c, d, bytes(16)], START) == {a, b, c, d}
    assert store.consumed_count(START) == 4


def test_an_expired_leftover_entry_is_replaced(store: Store) -> None:
    old, live = bytes([1]) * 16, bytes([2]) * 16
    assert store.consume_many([(old, int(START) + 10), (live, LATER)], START) == [True, True]
    now = START + 10                       # old's ticket has expired (expires_at <= now)
    assert store.consumed_among([old, live], now) == {live}
    assert store.consume_many([(old, LATER), (live, LATER)], now) == [True, False]
    assert store.consumed_among([old], now) == {old}       # live again, until LATER
    assert store.purge_expired(now) == 0                    # replaced, not left to purge
    assert store.consumed_among([old], LATER) == set()


def test_a_consume_is_visible_to_another_store_once_it_returns(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    ids = [bytes([n]) * 16 for n in range(3)]
    assert first.consume_many([(i, LATER) for i in ids], START) == [True] * 3
    assert second.consumed_among(ids, START) == set(ids)
    assert second.consume_many([(ids[1], LATER)], START) == [False]


def test_concurrent_consumers_of_one_ticket_one_wins(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    ticket = bytes([9]) * 16
    answers = in_threads(8, lambda i: stores[i % 2].consume_many(
        [(bytes([i]) * 16, LATER), (ticket, LATER)], START))
    assert sum(a[1] for a in answers) == 1
    assert all(a[0] for a in answers)


def test_large_batches(store: Store) -> None:
    ids = [n.to_bytes(16, "big") for n in range(1200)]
    half = ids[::2]
    assert store.consume_many([(i, LATER) for i in half], START) == [True] * len(half)
    assert store.consumed_among(ids, START) == set(half)
    assert store.consume_many([(i, LATER) for i in ids], START) == [
        n % 2 == 1 for n in range(len(ids))]
    assert store.consumed_count(START) == len(ids)


def test_purge_removes_expired_entries_only(store: Store) -> None:
    entries = [(n.to_bytes(16, "big"), int(START) + 10 * (n % 5)) for n in range(50)]
    store.consume_many(entries, START - 1)
    now = START + 20                       # expiries START+0, +10, +20 are over (<= now)
    assert store.consumed_count(now) == 20
    assert store.purge_expired(now) == 30
    assert store.purge_expired(now) == 0
    assert store.consumed_count(now) == 20
    assert store.consumed_among([e[0] for e in entries], START - 1) == {
        e[0] for e in entries if e[1] > now}


# -- revocations and epochs ---------------------------------------------------------------------

def revocation(kind: str, value: bytes, expires: float) -> RevocationRecord:
    return RevocationRecord(0, kind, value, START, START - 1, expires, f"test {kind}")


def test_revocations_get_ids_and_expire(store: Store) -> None:
    first = store.add_revocation(revocation("id_i", b"\x02\x00\x00\x00alice", START + 100))
    second = store.add_revocation(revocation("issued_before", b"", START + 50))
    third = store.add_revocation(revocation("ticket_id", bytes(range(16)), START + 200))
    assert 0 < first.revocation_id < second.revocation_id < third.revocation_id
    assert first == replace(revocation("id_i", b"\x02\x00\x00\x00alice", START + 100),
                            revocation_id=first.revocation_id)
    assert store.load_revocations(START) == [first, second, third]
    assert store.load_revocations(START + 50) == [first, third]    # expired at expires_at
    assert store.purge_revocations(START + 100) == 2
    assert store.load_revocations(START) == [third]
    assert store.purge_revocations(START + 100) == 0


def test_epochs_bump_atomically_per_realm(open_store: OpenStore) -> None:
    stores = [open_store(), open_store()]
    assert stores[0].load_epochs() == {}
    assert stores[0].bump_epoch("", START) == 1
    assert stores[1].bump_epoch("", START) == 2
    got = in_threads(6, lambda i: [stores[i % 2].bump_epoch("blue", START) for _ in range(10)])
    assert sorted(e for run in got for e in run) == list(range(1, 61))
    assert stores[1].load_epochs() == {"": 2, "blue": 60}


# -- meta: the lifetime horizon, the handle key, the owner --------------------------------------

def test_the_lifetime_horizon_moves_only_forward(open_store: OpenStore) -> None:
    store = open_store()
    assert store.lifetime_horizon() == 0
    assert store.record_max_lifetime(3600, START) == 0
    assert store.record_max_lifetime(7200, START + 1) == 0        # raised: nothing to cover
    assert store.record_max_lifetime(600, START + 2) == START + 2 + 7200
    assert store.record_max_lifetime(600, START + 3) == START + 2 + 7200
    assert store.record_max_lifetime(300, START + 9000) == START + 9000 + 600   # forward
    assert store.record_max_lifetime(100, START + 5) == START + 9000 + 600      # never back
    assert store.lifetime_horizon() == START + 9600
    store.close()
    assert open_store().lifetime_horizon() == START + 9600


def test_the_handle_key_is_made_once_for_every_process(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(3)]
    keys = in_threads(6, lambda i: stores[i % 3].handle_key())
    assert len(keys[0]) == 32 and len(set(keys)) == 1
    for s in stores:
        s.close()
    assert open_store().handle_key() == keys[0]


def test_the_owner_is_recorded_and_kept(open_store: OpenStore) -> None:
    store = open_store()
    assert store.state_owner() is None
    store.set_state_owner("pkcs11", "token ta (serial 1)")
    assert store.state_owner() == ("pkcs11", "token ta (serial 1)")
    store.set_state_owner("pkcs11", "token ta (serial 2)")
    store.close()
    assert open_store().state_owner() == ("pkcs11", "token ta (serial 2)")


def test_everything_survives_a_reopen(open_store: OpenStore) -> None:
    store = open_store()
    record = KeyRecord(K1, KeyState.ACTIVE, START, seal_count=4096)
    store.save_keys([record])
    store.consume_many([(bytes(16), LATER)], START)
    kept = store.add_revocation(revocation("old_sa", bytes(16), START + 100))
    store.bump_epoch("red", START)
    store.close()
    again = open_store()
    assert again.load_keys() == [record]
    assert again.consumed_among([bytes(16)], START) == {bytes(16)}
    assert again.load_revocations(START) == [kept]
    assert again.load_epochs() == {"red": 1}


def test_a_closed_store_is_unavailable(open_store: OpenStore) -> None:
    store = open_store()
    store.close()
    with pytest.raises(DeviceUnavailable, match=r"^state store failed: "):
        store.consume_many([(bytes(16), LATER)], START)
    with pytest.raises(DeviceUnavailable):
        store.load_keys()


# -- per-node tokens: wrapped keys, join requests, nodes (issue 15) ------------------------------

BLOB1, BLOB2 = bytes(range(40)), bytes(range(100, 140))   # stand-ins for RFC 3394 blobs
CHECK1, CHECK2 = b"\x11" * 16, b"\x22" * 16               # stand-ins for key check values


def transport(n: int) -> tuple[bytes, str]:
    """A stand-in transport public key (DER) and its fingerprint (SHA-256, lower-case hex)."""
    der = bytes([0x30, 0x82, n]) * 100
    return der, hashlib.sha256(der).hexdigest()


FOUNDER = transport(200)                                  # the first member's transport key


def founded(store: Store, kek_id: str = "kek-1") -> NodeRecord:
    """Found the cluster on ``store``: member "node-a" (``FOUNDER``'s key) and KEK ``kek_id``."""
    der, fp = FOUNDER
    node = store.found_cluster("node-a", fp, der, ["sha256", "sha1"], kek_id, START - 100)
    assert node is not None
    return node


def joined(store: Store, n: int, name: str, now: float) -> NodeRecord:
    """Member ``name`` with transport key ``transport(n)``, joined under the current KEK."""
    der, fp = transport(n)
    kek_id = store.cluster_kek()
    assert kek_id is not None
    assert store.add_join_request(fp, der, ["sha1"], name, now)
    assert store.approve_join(fp, bytes([n]) * 384, "sha1", "alice", now, kek_id=kek_id)
    node = store.complete_join(fp, now)
    assert node is not None
    return node


def raw_sql(store: Store, statement: str) -> None:
    """Run one parameterless statement on the store's own database, around its methods (as
    anyone with write access to the database could). Raises what the database raises."""
    if isinstance(store, SqliteStore):
        with store._lock:
            store._db.execute(statement)
        return
    with store._conn() as conn:   # type: ignore[attr-defined]
        conn.execute(statement)


def test_a_blob_is_stored_only_for_a_live_key_and_keeps_its_check_value(store: Store) -> None:
    store.save_keys([KeyRecord(K1, KeyState.CREATING, START),
                     KeyRecord(K2, KeyState.DESTROYED, START, destroyed_at=START + 1)])
    assert store.save_wrapped(K1, "kek-1", BLOB1, CHECK1)          # CREATING: made, then wrapped
    assert not store.save_wrapped(K2, "kek-1", BLOB2, CHECK2)      # destroyed: no blob ever
    assert not store.save_wrapped(K3, "kek-1", BLOB2, CHECK2)      # no record: no blob
    assert store.load_wrapped() == {K1: WrappedKey(K1, "kek-1", BLOB1, CHECK1)}
    assert not store.save_wrapped(K1, "kek-1", BLOB2, CHECK2)      # another value for K1
    assert store.save_wrapped(K1, "kek-2", BLOB2, CHECK1)          # re-wrapped under a new KEK
    assert store.load_wrapped([K1, K2, K3]) == {K1: WrappedKey(K1, "kek-2", BLOB2, CHECK1)}
    assert store.load_wrapped([]) == {}
    for blob, check in ((bytes(32), CHECK1), (bytes(48), CHECK1), (BLOB1, b""), (BLOB1, bytes(33))):
        with pytest.raises(ValueError, match="not stored"):        # a raw 32-octet key among them
            store.save_wrapped(K1, "kek-3", blob, check)
    assert store.load_wrapped()[K1].kek_id == "kek-2"
    store.delete_wrapped([K1, K3])
    assert store.load_wrapped() == {} and [r.key_id for r in store.load_keys()] == [K1, K2]


def test_no_blob_outlives_its_key(open_store: OpenStore) -> None:
    """Every way a key's record ends (destroyed by a ring commit or a save, deleted by a ring
    commit or ``delete_keys``) takes its blob in the same transaction; a commit that lost its
    compare-and-swap takes none."""
    mine, other = open_store(), open_store()
    ids = [bytes([n]) * 8 for n in range(1, 7)]
    records = [KeyRecord(k, KeyState.ACTIVE, START + n) for n, k in enumerate(ids)]
    assert mine.commit_ring(0, records) == 1
    for n, key_id in enumerate(ids):
        assert mine.save_wrapped(key_id, "kek-1", bytes([n]) * 40, CHECK1)
    destroyed = replace(records[0], state=KeyState.DESTROYED, destroyed_at=START + 9)
    assert other.commit_ring(0, [destroyed], delete=[ids[1]]) is None     # lost: nothing goes
    assert set(mine.load_wrapped()) == set(ids)
    assert other.commit_ring(1, [destroyed, replace(records[2], seal_count=9)],
                             delete=[ids[1]]) == 2
    assert set(mine.load_wrapped()) == set(ids[2:])
    other.save_keys([replace(records[3], state=KeyState.DESTROYED, destroyed_at=START + 9)])
    other.delete_keys([ids[4]])
    assert set(mine.load_wrapped()) == {ids[2], ids[5]}
    live = {r.key_id for r in mine.load_keys() if r.state != KeyState.DESTROYED}
    assert set(mine.load_wrapped()) == live - {ids[1], ids[4]} == {ids[2], ids[5]}


def test_a_blob_saved_while_its_key_is_destroyed_does_not_outlive_it(
        open_store: OpenStore) -> None:
    """A blob's save racing the commit that destroys its key: whichever goes first, no blob
    of a DESTROYED key is left."""
    saver, destroyer = open_store(), open_store()
    ids = [bytes([n]) * 8 for n in range(1, 13)]
    for n, key_id in enumerate(ids):
        version = destroyer.ring_version()
        assert destroyer.commit_ring(version, [KeyRecord(key_id, KeyState.ACTIVE, START)]) \
            == version + 1
        gone = KeyRecord(key_id, KeyState.DESTROYED, START, destroyed_at=START + 1)
        race: list[Callable[[], object]] = [
            lambda k=key_id: saver.save_wrapped(k, "kek-1", BLOB1, CHECK1),   # type: ignore[misc]
            lambda v=version + 1, g=gone: destroyer.commit_ring(v, [g])]      # type: ignore[misc]
        at_once(race)
        assert key_id not in saver.load_wrapped(), n


def test_a_join_is_requested_approved_taken_and_completed(open_store: OpenStore) -> None:
    joiner, member = open_store(), open_store()
    founder = founded(member)
    der, fp = transport(1)
    assert joiner.add_join_request(fp, der, ["sha256", "sha1"], "node-b", START)
    assert not joiner.add_join_request(fp, der, ["sha1"], "node-b", START + 1)   # stored
    (pending,) = member.list_join_requests(START + 1)
    assert pending == JoinRequest(fp, der, ("sha256", "sha1"), "node-b", START)
    assert joiner.take_wrapped_kek(fp) is None
    assert member.complete_join(fp, START + 2) is None                # not approved: no member
    assert not member.approve_join(fp, b"\x5a" * 384, "md5", "alice", START + 2,   # not offered
                                   kek_id="kek-1")
    assert not member.approve_join(transport(2)[1], b"\x5a" * 384, "sha1", "alice", START + 2,
                                   kek_id="kek-1")
    assert not member.approve_join(fp, b"\x5a" * 384, "sha1", "alice", START + 2,
                                   kek_id="kek-0")                   # not the cluster's KEK
    assert member.approve_join(fp, b"\x5a" * 384, "sha1", "alice", START + 2, kek_id="kek-1")
    assert not member.approve_join(fp, b"\x6b" * 384, "sha1", "mallory", START + 3,
                                   kek_id="kek-1")                   # not pending
    assert joiner.take_wrapped_kek(fp) == (b"\x5a" * 384, "sha1", "kek-1")
    (approved,) = joiner.list_join_requests(START + 3)
    assert (approved.approved_by, approved.approved_at, approved.oaep_hash, approved.kek_id) == (
        "alice", START + 2, "sha1", "kek-1")
    node = joiner.complete_join(fp, START + 4)
    assert node == NodeRecord("node-b", fp, "alice", START + 2, START + 4, der,
                              ("sha256", "sha1"), "kek-1")
    assert joiner.complete_join(fp, START + 5) is None
    assert joiner.take_wrapped_kek(fp) is None                         # the wrapped KEK is gone
    assert member.list_join_requests(START + 5) == []
    assert open_store().list_nodes() == [founder, node]
    der3, fp3 = transport(3)
    assert not joiner.add_join_request(fp3, der3, ["sha1"], "node-b", START + 6)  # a member's
    assert member.remove_node("node-b") and not member.remove_node("node-b")
    assert member.list_nodes() == [founder]
    assert joiner.add_join_request(fp3, der3, ["sha1"], "node-b", START + 7)     # free again


def test_a_request_nobody_approved_never_has_a_wrapped_kek(store: Store) -> None:
    founder = founded(store)
    der, fp = transport(1)
    assert store.add_join_request(fp, der, ["sha1"], "node-b", START)
    assert store.take_wrapped_kek(fp) is None
    assert store.list_join_requests(START)[0].wrapped_kek is None
    for statement in (   # a wrapped KEK without an approval: the schema refuses each
            "UPDATE join_requests SET wrapped_kek = public_key",
            "UPDATE join_requests SET wrapped_kek = public_key, oaep_hash = 'sha1'",
            "UPDATE join_requests SET wrapped_kek = public_key, oaep_hash = 'sha1', "
            "approved_by = 'mallory'",
            "UPDATE join_requests SET kek_id = 'kek-1'"):
        with pytest.raises((sqlite3.IntegrityError, DeviceUnavailable),
                           match=r"(?i)check constraint"):
            raw_sql(store, statement)
    expired = START + JOIN_REQUEST_TTL
    assert not store.approve_join(fp, b"\x5a" * 384, "sha1", "alice", expired, kek_id="kek-1")
    assert store.list_join_requests(expired) == []
    assert store.list_join_requests(expired - 1) != []                 # not purged yet
    assert store.purge_join_requests(expired) == 1
    assert store.list_join_requests(START) == [] and store.take_wrapped_kek(fp) is None
    assert store.list_nodes() == [founder]


def test_an_approved_request_never_completed_expires_with_its_wrapped_kek(store: Store) -> None:
    der, fp = transport(1)
    founded(store)
    assert store.add_join_request(fp, der, ["sha1"], "node-b", START)
    assert store.approve_join(fp, b"\x5a" * 384, "sha1", "alice", START + 3000, kek_id="kek-1")
    assert store.purge_join_requests(START + 3000 + JOIN_REQUEST_TTL - 1) == 0
    assert [r.fingerprint for r in store.list_join_requests(START + 3001)] == [fp]
    assert store.purge_join_requests(START + 3000 + JOIN_REQUEST_TTL) == 1
    assert store.take_wrapped_kek(fp) is None


def test_join_requests_are_refused_unless_the_fingerprint_is_their_keys(store: Store) -> None:
    from authority.backends.pkcs11._wrap import fingerprint

    der, fp = transport(1)
    assert fp == fingerprint(der)           # the token side's fingerprint is the store's rule
    bad = [(transport(2)[1], der, ["sha1"], "node-b"), (fp.upper(), der, ["sha1"], "node-b"),
           (fp, der, [], "node-b"), (fp, der, ["sha1,md5"], "node-b"), (fp, der, ["sha1"], ""),
           (fp, der, [""], "node-b"), (fp, der, ["sha1"], "b,c")]
    for args in bad:
        with pytest.raises(ValueError, match="not stored"):
            store.add_join_request(*args, now=START)
    assert store.list_join_requests(START) == []
    assert store.add_join_request(fp, der, ["sha1"], "node-b", START)
    founded(store)
    for kek, approver, kek_id in ((b"", "alice", "kek-1"), (b"\x5a", "", "kek-1"),
                                  (b"\x5a", "alice", "")):
        with pytest.raises(ValueError, match="not stored"):
            store.approve_join(fp, kek, "sha1", approver, START, kek_id=kek_id)
    assert store.take_wrapped_kek(fp) is None


def test_concurrent_approvals_of_one_node_name_one_wins(open_store: OpenStore) -> None:
    """Eight requests asking for one name, approved at once on two stores: one is; then
    none other is, neither while it is approved nor once it is a member."""
    stores = [open_store(), open_store()]
    keys = [transport(n) for n in range(8)]
    founded(stores[1])
    for der, fp in keys:
        assert stores[0].add_join_request(fp, der, ["sha1"], "node-b", START)
    won = in_threads(8, lambda i: stores[i % 2].approve_join(
        keys[i][1], bytes([i + 1]) * 384, "sha1", f"op{i}", START + 1, kek_id="kek-1"))
    assert sorted(won) == [False] * 7 + [True]
    winner = keys[won.index(True)][1]
    assert [r.fingerprint for r in stores[1].list_join_requests(START + 2)
            if r.approved_at is not None] == [winner]
    assert stores[1].complete_join(winner, START + 2) is not None
    assert not any(stores[0].approve_join(fp, b"\x5a" * 384, "sha1", "op", START + 3,
                                          kek_id="kek-1") for _, fp in keys)


def test_a_cluster_is_founded_once(open_store: OpenStore) -> None:
    """The first member and the first KEK come together, once: never over a member or a KEK."""
    store, other = open_store(), open_store()
    der, fp = FOUNDER
    assert store.cluster_kek() is None and store.kek_ids_in_use() == set()
    der1, fp1 = transport(1)
    assert store.add_join_request(fp1, der1, ["sha1"], "node-b", START)
    assert not store.approve_join(fp1, b"\x5a" * 384, "sha1", "alice", START,
                                  kek_id="kek-1")           # no cluster KEK yet: none is current
    for args in (("node-a", transport(1)[1], der, ["sha1"], "kek-1"),   # another key's
                 ("node-a", fp, der, [], "kek-1"), ("", fp, der, ["sha1"], "kek-1"),
                 ("node-a", fp, der, ["sha1"], "")):
        with pytest.raises(ValueError, match="not stored"):
            store.found_cluster(*args, now=START)
    assert store.cluster_kek() is None and store.list_nodes() == []
    node = store.found_cluster("node-a", fp, der, ["sha256", "sha1"], "kek-1", START)
    assert node == NodeRecord("node-a", fp, "node-a", START, START, der, ("sha256", "sha1"),
                              "kek-1")
    assert other.list_nodes() == [node] and other.cluster_kek() == "kek-1"
    der2, fp2 = transport(2)
    assert other.found_cluster("node-z", fp2, der2, ["sha1"], "kek-9", START + 1) is None
    assert other.remove_node("node-a") and other.list_nodes() == []
    assert other.found_cluster("node-z", fp2, der2, ["sha1"], "kek-9", START + 1) is None  # a KEK
    assert store.cluster_kek() == "kek-1" and store.list_nodes() == []
    assert store.kek_ids_in_use() == {"kek-1"}


def _snapshot(store: Store, names: list[str]) -> tuple[object, ...]:
    """Everything a KEK replacement may change, as one comparable value."""
    return (store.cluster_kek(), store.list_nodes(), [store.kek_delivery(n) for n in names],
            store.list_join_requests(START), store.kek_ids_in_use())


def test_replace_kek_removes_a_member_and_delivers_the_new_kek(open_store: OpenStore) -> None:
    maker, other = open_store(), open_store()
    a = founded(maker)
    b, c = joined(maker, 2, "node-b", START), joined(maker, 3, "node-c", START + 1)
    d = joined(maker, 4, "node-d", START + 2)
    der5, fp5 = transport(5)                     # approved under kek-1, not completed
    assert other.add_join_request(fp5, der5, ["sha1"], "node-e", START + 3)
    assert other.approve_join(fp5, b"\x55" * 384, "sha1", "alice", START + 3, kek_id="kek-1")
    maker.save_keys([KeyRecord(K1, KeyState.ACTIVE, START)])
    assert maker.save_wrapped(K1, "kek-1", BLOB1, CHECK1)
    to = {"node-b": (b"\x0b" * 384, "sha1"), "node-c": (b"\x0c" * 384, "sha256")}
    assert maker.replace_kek("node-d", "node-a", "kek-2", to, START + 10)
    assert other.cluster_kek() == "kek-2"
    assert other.list_nodes() == [replace(a, kek_id="kek-2"), b, c]
    assert d.name not in {n.name for n in other.list_nodes()}
    assert other.kek_delivery("node-b") == KekDelivery("node-b", "kek-2", b"\x0b" * 384, "sha1",
                                                       START + 10)
    assert other.kek_delivery("node-c") == KekDelivery("node-c", "kek-2", b"\x0c" * 384,
                                                       "sha256", START + 10)
    assert other.kek_delivery("node-a") is None and other.kek_delivery("node-d") is None
    (request,) = other.list_join_requests(START + 10)   # back to pending: its KEK is the old one
    assert request == JoinRequest(fp5, der5, ("sha1",), "node-e", START + 3)
    assert other.take_wrapped_kek(fp5) is None and other.complete_join(fp5, START + 11) is None
    assert not other.approve_join(fp5, b"\x55" * 384, "sha1", "alice", START + 11,
                                  kek_id="kek-1")
    assert other.approve_join(fp5, b"\x56" * 384, "sha1", "alice", START + 11, kek_id="kek-2")
    assert other.kek_ids_in_use() == {"kek-1", "kek-2"}   # kek-1: the blob, B's and C's
    assert not other.kek_received("node-b", "kek-1") and not other.kek_received("node-a", "kek-2")
    assert other.kek_received("node-b", "kek-2") and not other.kek_received("node-b", "kek-2")
    assert other.kek_delivery("node-b") is None
    assert [n.kek_id for n in other.list_nodes()] == ["kek-2", "kek-2", "kek-1"]
    # C removes B while its own delivery of kek-2 waits: C has kek-3 (the older one goes)
    assert other.replace_kek("node-b", "node-c", "kek-3", {"node-a": (b"\x0a" * 384, "sha1")},
                             START + 20)
    assert maker.kek_delivery("node-c") is None and maker.kek_delivery("node-b") is None
    assert [(n.name, n.kek_id) for n in maker.list_nodes()] == [("node-a", "kek-2"),
                                                                 ("node-c", "kek-3")]
    assert maker.list_join_requests(START + 20)[0].approved_at is None   # E again
    assert maker.kek_ids_in_use() == {"kek-1", "kek-2", "kek-3"}
    assert maker.kek_received("node-a", "kek-3")
    assert maker.kek_ids_in_use() == {"kek-1", "kek-3"}
    maker.delete_wrapped([K1])
    assert maker.kek_ids_in_use() == {"kek-3"}          # kek-1 and kek-2: destroyable


def test_replace_kek_refusals_change_nothing(open_store: OpenStore) -> None:
    """Each compare-and-swap refusal, and each malformed replacement, leaves the store as it
    was."""
    store, other = open_store(), open_store()
    founded(store)
    for n, name in ((2, "node-b"), (3, "node-c"), (4, "node-d")):
        joined(store, n, name, START)
    names = ["node-a", "node-b", "node-c", "node-d", "node-x"]
    before = _snapshot(other, names)
    kek = (b"\x5a" * 384, "sha1")
    refused = [("node-x", "node-a", "kek-2", {"node-b": kek, "node-c": kek, "node-d": kek}),
               ("node-d", "node-x", "kek-2", {"node-a": kek, "node-b": kek, "node-c": kek}),
               ("node-d", "node-d", "kek-2", {"node-a": kek, "node-b": kek, "node-c": kek}),
               ("node-d", "node-a", "kek-1", {"node-b": kek, "node-c": kek}),  # the current
               ("node-d", "node-a", "kek-2", {"node-b": kek}),                 # C missing
               ("node-d", "node-a", "kek-2", {"node-b": kek, "node-c": kek, "node-d": kek}),
               ("node-d", "node-a", "kek-2", {"node-a": kek, "node-b": kek, "node-c": kek}),
               ("node-d", "node-a", "kek-2", {"node-b": kek, "node-c": kek, "node-x": kek})]
    for removed, maker, kek_id, deliveries in refused:
        assert not other.replace_kek(removed, maker, kek_id, deliveries, START + 5), (
            removed, maker, kek_id, sorted(deliveries))
        assert _snapshot(store, names) == before
    for kek_id, deliveries in (("", {"node-b": kek, "node-c": kek}),
                               ("kek-2", {"node-b": (b"", "sha1"), "node-c": kek}),
                               ("kek-2", {"node-b": kek, "node-c": (kek[0], "")})):
        with pytest.raises(ValueError, match="not stored"):
            other.replace_kek("node-d", "node-a", kek_id, deliveries, START + 5)
        assert _snapshot(store, names) == before
    assert other.replace_kek("node-d", "node-a", "kek-2", {"node-b": kek, "node-c": kek},
                             START + 5)
    assert store.remove_node("node-b") and store.kek_delivery("node-b") is None  # cascade
    assert store.kek_delivery("node-c") is not None


def test_concurrent_kek_replacements_one_wins(open_store: OpenStore) -> None:
    """Eight members each removing another under a KEK of their own, at once on two stores:
    one does; the others' deliveries no longer match the membership."""
    stores = [open_store(), open_store()]
    founded(stores[0])
    names = ["node-a"] + [joined(stores[0], n, f"node-{n}", START).name for n in range(1, 8)]

    def remove_next(i: int) -> bool:
        removed, maker = names[(i + 1) % 8], names[i]
        deliveries = {n: (bytes([i + 1]) * 384, "sha1") for n in names if n not in (removed,
                                                                                   maker)}
        return stores[i % 2].replace_kek(removed, maker, f"kek-by-{i}", deliveries, START + 1)

    won = in_threads(8, remove_next)
    assert sorted(won) == [False] * 7 + [True]
    i = won.index(True)
    removed, maker = names[(i + 1) % 8], names[i]
    assert stores[1].cluster_kek() == f"kek-by-{i}"
    members = [n.name for n in stores[1].list_nodes()]
    assert sorted(members) == sorted(set(names) - {removed})
    waiting = {n: stores[1].kek_delivery(n) for n in names}
    assert {n for n, d in waiting.items() if d is not None} == set(members) - {maker}
    assert all(d is None or d.wrapped_kek == bytes([i + 1]) * 384 for d in waiting.values())


def test_a_kek_replacement_racing_a_join_one_wins(open_store: OpenStore) -> None:
    """A removal's new KEK racing a join's completion and an approval under the old KEK, on
    two stores: the replacement or the completion wins, never both (the new member would have
    no delivery), and no request stays approved under a KEK that is no longer current."""
    replacer, joiner = open_store(), open_store()
    founded(replacer)
    outcomes = set()
    for r in range(8):
        kek = replacer.cluster_kek()
        assert kek is not None
        doomed = joined(replacer, 10 + r, f"doomed-{r}", START + r).name
        der, fp = transport(50 + r)                        # approved: completes in the race
        assert joiner.add_join_request(fp, der, ["sha1"], f"late-{r}", START + r)
        assert joiner.approve_join(fp, b"\x5a" * 384, "sha1", "op", START + r, kek_id=kek)
        der2, fp2 = transport(100 + r)                     # pending: approved in the race
        assert joiner.add_join_request(fp2, der2, ["sha1"], f"next-{r}", START + r)
        others = {n.name: (b"\x6b" * 384, "sha1") for n in replacer.list_nodes()
                  if n.name not in ("node-a", doomed)}
        race: list[Callable[[], object]] = [
            partial(replacer.replace_kek, doomed, "node-a", f"kek-r{r}", others, START + r + 0.5),
            partial(joiner.complete_join, fp, START + r + 0.5),
            partial(joiner.approve_join, fp2, b"\x7c" * 384, "sha1", "op", START + r + 0.5,
                    kek_id=kek)]
        replaced, completed, _ = at_once(race)
        assert replaced != (completed is not None), r
        outcomes.add(bool(replaced))
        current = joiner.cluster_kek()
        assert current == (f"kek-r{r}" if replaced else kek)
        stale = [q for q in joiner.list_join_requests(START + r + 1)
                 if q.approved_at is not None and q.kek_id != current]
        assert stale == [], r
        members = {n.name for n in joiner.list_nodes()}
        assert (f"late-{r}" in members) == (not replaced)
        assert all(joiner.kek_delivery(n) is not None for n in members
                   if replaced and n != "node-a")
    print("replacement won:", sorted(outcomes))              # (varies with timing)


def test_repr_of_blobs_shows_a_digest_only() -> None:
    der, fp = transport(1)
    kek = bytes(range(256)) + bytes(range(128))
    shown = [repr(WrappedKey(K1, "kek-1", BLOB1, CHECK1)),
             repr(JoinRequest(fp, der, ("sha1",), "node-b", START, "alice", START, kek, "sha1",
                              "kek-1")),
             repr(NodeRecord("node-b", fp, "alice", START, START, der, ("sha1",), "kek-1")),
             repr(KekDelivery("node-b", "kek-2", kek, "sha1", START))]
    for text, secret in ((shown[0], BLOB1), (shown[0], CHECK1), (shown[1], kek), (shown[1], der),
                         (shown[2], der), (shown[3], kek)):
        assert secret.hex()[:16] not in text and repr(secret)[:20] not in text
    assert "<40 octets, sha256 " in shown[0] and "<384 octets, sha256 " in shown[1]
    assert "<300 octets, sha256 " in shown[2] and "kek_id='kek-1'" in shown[2]
    assert "<384 octets, sha256 " in shown[3] and "kek_id='kek-2'" in shown[3]


# -- the SQLite store only ----------------------------------------------------------------------

def test_sqlite_a_schema_2_file_gets_the_ring_version_replicas_and_leases(
        tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "authority.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:   # as the previous release left it
        db.executescript("DROP TABLE key_ring; DROP TABLE replicas; DROP TABLE leases; "
                         "UPDATE meta SET value = '2' WHERE name = 'schema'; "
                         "INSERT INTO keys VALUES (x'0101010101010101', 1, 1800000000.0, 7, "
                         "NULL, NULL, NULL);")
    db.close()
    store = SqliteStore(path)
    try:
        assert store.load_ring() == (0, [KeyRecord(K1, KeyState.ACTIVE, START, seal_count=7)])
        assert store.commit_ring(0, []) == 1
        assert store.load_replicas() == [] and store.load_lease("maintenance") is None
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (
            str(SQLITE_SCHEMA),)
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (str(SQLITE_SCHEMA + 1),))
    db.close()
    with pytest.raises(StartupError,
                       match=f"schema {SQLITE_SCHEMA + 1}, this version reads {SQLITE_SCHEMA}"):
        SqliteStore(path)


def test_sqlite_a_schema_3_file_gets_wrapped_keys_join_requests_and_nodes(
        tmp_path: Path) -> None:
    """A file of an older release (schema 3) opens as the current schema with its key ring
    kept; a release reading schema 3 refuses it afterwards (it checks the version for equality:
    ``SqliteStore._check_schema``)."""
    import sqlite3

    path = tmp_path / "authority.db"
    store = SqliteStore(path)
    assert store.commit_ring(0, [KeyRecord(K1, KeyState.ACTIVE, START)]) == 1
    store.close()
    with sqlite3.connect(path) as db:   # as schema 3 left it
        db.executescript("DROP TABLE wrapped_keys; DROP TABLE join_requests; DROP TABLE nodes; "
                         "UPDATE meta SET value = '3' WHERE name = 'schema';")
    db.close()
    store = SqliteStore(path)
    try:
        assert store.load_ring() == (1, [KeyRecord(K1, KeyState.ACTIVE, START)])
        assert store.save_wrapped(K1, "kek-1", BLOB1, CHECK1)
        der, fp = transport(1)
        assert store.add_join_request(fp, der, ["sha1"], "node-b", START)
        assert store.list_nodes() == [] and store.describe().schema_version == SQLITE_SCHEMA
    finally:
        store.close()


#: the membership tables as schema 4 made them (SQLite), with an approved request, a pending one
#: and a member
_SQLITE_SCHEMA_4_MEMBERSHIP = """
DROP TABLE kek_deliveries; DROP TABLE cluster_kek; DROP TABLE join_requests; DROP TABLE nodes;
CREATE TABLE join_requests (
    fingerprint TEXT PRIMARY KEY, public_key BLOB NOT NULL, oaep_hashes TEXT NOT NULL,
    node_name TEXT NOT NULL, requested_at REAL NOT NULL, approved_by TEXT, approved_at REAL,
    wrapped_kek BLOB, oaep_hash TEXT,
    CHECK ((approved_at IS NULL) = (approved_by IS NULL)
           AND (approved_at IS NULL) = (wrapped_kek IS NULL)
           AND (approved_at IS NULL) = (oaep_hash IS NULL)));
CREATE UNIQUE INDEX join_requests_approved_name ON join_requests (node_name)
    WHERE approved_at IS NOT NULL;
CREATE TABLE nodes (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,
    approved_by TEXT NOT NULL, approved_at REAL NOT NULL, joined_at REAL NOT NULL);
UPDATE meta SET value = '4' WHERE name = 'schema';
"""


def _old_membership_rows(blob: Callable[[bytes], str], hashes: str) -> tuple[str, ...]:
    """A schema-4/migration-5 approved request (node-b), pending one (node-c) and member
    (node-a), as statements writing blobs as ``blob`` makes them and OAEP hashes as
    ``hashes``."""
    rows = []
    for n, name, approval in ((1, "node-b", f"'alice', 1800000001, {blob(b'ZZ')}, 'sha1'"),
                              (2, "node-c", "NULL, NULL, NULL, NULL")):
        der, fp = transport(n)
        rows.append(f"INSERT INTO join_requests VALUES ('{fp}', {blob(der)}, {hashes}, "  # noqa: S608
                    f"'{name}', {1800000000 + n}, {approval})")
    rows.append(f"INSERT INTO nodes VALUES ('node-a', '{FOUNDER[1]}', 'node-a', "  # noqa: S608
                "1799999000, 1799999000)")
    return tuple(rows)


def _check_old_membership(store: Store) -> None:
    """What the upgrade made of ``_old_membership_rows``."""
    assert store.describe().schema_version in (SQLITE_SCHEMA, 6)
    assert [(q.node_name, q.approved_at, q.kek_id) for q in store.list_join_requests(START)] == [
        ("node-b", None, None), ("node-c", None, None)]     # an approval without a KEK id: gone
    assert store.take_wrapped_kek(transport(1)[1]) is None
    assert store.list_nodes() == [NodeRecord("node-a", FOUNDER[1], "node-a", START - 1000,
                                             START - 1000)]    # no transport key recorded
    assert store.cluster_kek() is None and store.kek_ids_in_use() == {"kek-1"}   # the blob's
    with pytest.raises((sqlite3.IntegrityError, DeviceUnavailable),
                       match=r"(?i)check constraint"):
        raw_sql(store, "UPDATE join_requests SET kek_id = 'kek-1'")    # without an approval
    assert store.kek_delivery("node-a") is None and not store.kek_received("node-a", "kek-1")


def test_sqlite_a_schema_4_file_gets_kek_replacement(tmp_path: Path) -> None:
    """A file of the previous release (schema 4), opened by two stores at once, becomes
    schema 5 once: its key ring and blobs kept, an approved request back to pending (its
    approval has no KEK id), the member without a transport key; the new tables work."""
    path = tmp_path / "authority.db"
    store = SqliteStore(path)
    assert store.commit_ring(0, [KeyRecord(K1, KeyState.ACTIVE, START)]) == 1
    assert store.save_wrapped(K1, "kek-1", BLOB1, CHECK1)
    store.close()
    with sqlite3.connect(path) as db:   # as schema 4 left it
        db.executescript(_SQLITE_SCHEMA_4_MEMBERSHIP + ";".join(_old_membership_rows(
            lambda b: f"x'{b.hex()}'", "'sha1'")) + ";")
    db.close()
    stores: list[SqliteStore] = in_threads(2, lambda _: SqliteStore(path))
    try:
        for opened in stores:
            _check_old_membership(opened)
        assert stores[0].load_wrapped() == {K1: WrappedKey(K1, "kek-1", BLOB1, CHECK1)}
        stores[1]._upgrade_4()   # a store that read "4" before the other's upgrade committed
        _check_old_membership(stores[1])
        assert stores[0].remove_node("node-a")
        founder = founded(stores[1])
        assert stores[0].list_nodes() == [founder]
    finally:
        for opened in stores:
            opened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == ("5",)
    db.close()


# -- the PostgreSQL store only: schema, migrations, failures ------------------------------------

def _schema(dsn: str) -> str | None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    return None if row is None else str(row[0])


def test_postgres_schema_is_created_and_migrated_in_order(postgres_dsn: str) -> None:
    from authority.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore

    store = PostgresStore(pg_settings(postgres_dsn))
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    store.save_keys([KeyRecord(K1, KeyState.ACTIVE, START)])
    store.close()
    assert _schema(postgres_dsn) == str(SCHEMA_VERSION)
    newer = (*MIGRATIONS, ("CREATE TABLE probe (n int)", "INSERT INTO probe VALUES (1)"),
             ("INSERT INTO probe VALUES (2)",))
    migrated = PostgresStore(pg_settings(postgres_dsn), migrations=newer)
    assert migrated.schema_version == SCHEMA_VERSION + 2
    assert [r.key_id for r in migrated.load_keys()] == [K1]      # data kept
    migrated.close()
    again = PostgresStore(pg_settings(postgres_dsn), migrations=newer)  # nothing re-applied
    again.close()
    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT n FROM probe ORDER BY n").fetchall() == [(1,), (2,)]


def test_postgres_a_failed_migration_applies_nothing(postgres_dsn: str) -> None:
    from authority.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore

    PostgresStore(pg_settings(postgres_dsn)).close()
    broken = (*MIGRATIONS, ("CREATE TABLE probe (n int)", "SELECT no_such_function()"))
    with pytest.raises(StartupError, match="no_such_function"):
        PostgresStore(pg_settings(postgres_dsn), migrations=broken)
    assert _schema(postgres_dsn) == str(SCHEMA_VERSION)
    fixed = (*MIGRATIONS, ("CREATE TABLE probe (n int)",))   # probe was rolled back
    PostgresStore(pg_settings(postgres_dsn), migrations=fixed).close()


def test_postgres_an_older_version_refuses_a_newer_schema(postgres_dsn: str) -> None:
    from authority.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore

    PostgresStore(pg_settings(postgres_dsn),
                  migrations=(*MIGRATIONS, ("CREATE TABLE probe (n int)",))).close()
    with pytest.raises(StartupError) as err:
        PostgresStore(pg_settings(postgres_dsn))
    assert str(err.value).startswith(
        f"state store: schema {SCHEMA_VERSION + 1} is newer than this version reads "
        f"({SCHEMA_VERSION}): upgrade ike-ticket-authority")
    assert "(postgresql host=" in str(err.value)
    assert postgres_dsn not in str(err.value)


def test_postgres_a_schema_4_database_gets_wrapped_keys_and_an_older_release_refuses_it(
        postgres_dsn: str) -> None:
    """Migration 5 on a database of the previous release keeps its key ring; that release
    (migrations 1-4) then refuses the database."""
    from authority.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore

    assert SCHEMA_VERSION >= 5
    previous = PostgresStore(pg_settings(postgres_dsn), migrations=MIGRATIONS[:4])
    assert previous.commit_ring(0, [KeyRecord(K1, KeyState.ACTIVE, START)]) == 1
    previous.close()
    assert _schema(postgres_dsn) == "4"
    store = PostgresStore(pg_settings(postgres_dsn))
    try:
        assert store.load_ring() == (1, [KeyRecord(K1, KeyState.ACTIVE, START)])
        assert store.save_wrapped(K1, "kek-1", BLOB1, CHECK1)
    finally:
        store.close()
    with pytest.raises(StartupError,
                       match=rf"schema {SCHEMA_VERSION} is newer than this version reads \(4\)"):
        PostgresStore(pg_settings(postgres_dsn), migrations=MIGRATIONS[:4])


def test_postgres_a_schema_5_database_gets_kek_replacement_and_an_older_release_refuses_it(
        postgres_dsn: str) -> None:
    """Migration 6 on a database of the previous release keeps its key ring and blobs, puts
    an approved request back to pending (its approval has no KEK id) and keeps the member
    (without a transport key); that release (migrations 1-5) then refuses the database."""
    import psycopg

    from authority.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore

    assert SCHEMA_VERSION == 6
    previous = PostgresStore(pg_settings(postgres_dsn), migrations=MIGRATIONS[:5])
    assert previous.commit_ring(0, [KeyRecord(K1, KeyState.ACTIVE, START)]) == 1
    assert previous.save_wrapped(K1, "kek-1", BLOB1, CHECK1)
    previous.close()
    with psycopg.connect(postgres_dsn) as conn:
        for statement in _old_membership_rows(lambda b: f"'\\x{b.hex()}'::bytea",
                                              "ARRAY['sha1']"):
            conn.execute(statement)
    store = PostgresStore(pg_settings(postgres_dsn))
    try:
        _check_old_membership(store)
        assert store.load_ring() == (1, [KeyRecord(K1, KeyState.ACTIVE, START)])
        assert store.remove_node("node-a")
        founder = founded(store)
        assert store.list_nodes() == [founder] and store.cluster_kek() == "kek-1"
    finally:
        store.close()
    with pytest.raises(StartupError, match=r"schema 6 is newer than this version reads \(5\)"):
        PostgresStore(pg_settings(postgres_dsn), migrations=MIGRATIONS[:5])


def test_postgres_replicas_starting_at_once_on_an_empty_database(postgres_dsn: str) -> None:
    from authority.store.postgres import SCHEMA_VERSION, PostgresStore

    stores: list[PostgresStore] = in_threads(
        4, lambda i: PostgresStore(pg_settings(postgres_dsn)))
    try:
        assert {s.schema_version for s in stores} == {SCHEMA_VERSION}
        stores[0].save_keys([KeyRecord(K1, KeyState.ACTIVE, START)])
        assert all(s.load_keys()[0].key_id == K1 for s in stores)
    finally:
        for s in stores:
            s.close()


def test_postgres_a_hung_statement_ends_at_the_statement_timeout(postgres_dsn: str) -> None:
    """Another session holds the consumed table locked: a consume fails UNAVAILABLE after
    ``statement_timeout`` instead of waiting for ever."""
    import psycopg

    store = open_postgres(postgres_dsn, statement_timeout=0.3)
    try:
        with psycopg.connect(postgres_dsn) as locker:
            locker.execute("LOCK TABLE consumed IN ACCESS EXCLUSIVE MODE")
            outcome = in_threads(1, lambda _: _raised(
                lambda: store.consume_many([(bytes(16), LATER)], START)))[0]
            assert isinstance(outcome, DeviceUnavailable), outcome
            assert "statement timeout" in str(outcome)
            locker.rollback()
        assert store.consume_many([(bytes(16), LATER)], START) == [True]
    finally:
        store.close()


def test_postgres_connections_are_configured(postgres_dsn: str) -> None:
    """Each pooled connection has the statement timeout, and plans each execution of a
    prepared statement for the table as it is then (a generic plan cached while the consumed
    table was empty made a lookup of 100 ids among 30 000 entries take 28 ms instead of 0.3)."""
    from authority.store.postgres import PostgresStore

    store = open_postgres(postgres_dsn, statement_timeout=1.25, pool_size=2)
    assert isinstance(store, PostgresStore)
    try:
        with store._conn() as first, store._conn() as second:   # both pool connections
            for conn in (first, second):
                assert conn.execute("SELECT current_setting('statement_timeout'), "
                                    "current_setting('plan_cache_mode')").fetchone() == (
                    "1250ms", "force_custom_plan")
    finally:
        store.close()


def _raised(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:   # the test inspects it
        return exc


# A pooled connection the server ended (a restart, pg_terminate_backend) is no longer handed out
# to fail one call: tests/test_store_outage.py::test_a_connection_the_server_ended_is_not_handed_out


# -- an authority on PostgreSQL, over real gRPC -------------------------------------------------

OK = authority_pb2.REDEEM_RESULT_OK
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED


def test_an_authority_on_postgresql_issues_redeems_and_consumes(tmp_path: Path,
                                                                postgres_dsn: str) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(postgres_dsn + "\n")
    loaded = load_toml(tmp_path, f'[postgresql]\ndsn_file = "{dsn_file}"\npool_size = 4\n')
    assert loaded.postgresql is not None
    h = Harness(tmp_path / "state")
    h.config = replace(make_config(h.state_dir), postgresql=loaded.postgresql)
    h.start()
    try:
        from authority.store.postgres import PostgresStore

        assert isinstance(h.authority.store, PostgresStore)
        assert not (h.state_dir / "authority.db").exists()
        tickets = [issue(h.tickets, n).ticket for n in range(3)]
        assert redeem(h.tickets, tickets[0]).result == OK
        assert redeem(h.tickets, tickets[0], consume=True).result == OK
        assert redeem(h.tickets, tickets[0]).result == REPLAYED
        handle = redeem(h.tickets, tickets[1]).ticket_id
        consume = authority_pb2.ConsumeTicketRequest(ticket_id=handle)
        assert h.tickets.ConsumeTicket(consume).result == OK
        assert h.tickets.ConsumeTicket(consume).result == REPLAYED
        batch = h.tickets.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
            authority_pb2.RedeemTicketRequest(ticket=t, consume=True) for t in tickets]))
        assert [i.redeemed.result for i in batch.items] == [REPLAYED, REPLAYED, OK]
        h.restart()     # the state is the database's
        assert [redeem(h.tickets, t).result for t in tickets] == [REPLAYED] * 3
        assert h.tickets.ConsumeTicket(consume).result == REPLAYED
    finally:
        h.stop()
    other = open_postgres(postgres_dsn)
    try:
        assert other.consumed_count(START) == 3
        assert other.state_owner() is not None and other.state_owner()[0] == "pkcs11"
    finally:
        other.close()
