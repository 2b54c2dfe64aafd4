"""Records from the stores' rows, and key records to rows: the SQLite and the PostgreSQL store
select the same columns in the same order (each keeps its own SQL) and build the same records
from them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from authority.keys import KeyRecord, KeyState
from authority.store.base import Fence, LeaseRecord, ReplicaRecord, RevocationRecord, StaleFence


def key_record(row: Sequence[Any]) -> KeyRecord:
    """A key record from (key_id, state, created_at, seal_count, sealing_ended_at,
    opens_until, destroyed_at). Raises: ValueError for an unknown state."""
    return KeyRecord(bytes(row[0]), KeyState(row[1]), *row[2:])


def key_rows(records: Sequence[KeyRecord]) -> list[tuple[Any, ...]]:
    """The key records as rows of the columns ``key_record`` reads, in its order."""
    return [(r.key_id, int(r.state), r.created_at, r.seal_count, r.sealing_ended_at,
             r.opens_until, r.destroyed_at) for r in records]


def lease_record(row: Sequence[Any]) -> LeaseRecord:
    """A lease from (name, holder, epoch, expires_at)."""
    return LeaseRecord(str(row[0]), str(row[1]), int(row[2]), float(row[3]))


def replica_record(row: Sequence[Any], loaded: Iterable[bytes]) -> ReplicaRecord:
    """A replica from (replica_id, host, pid, started_at, heartbeat_at, ring_version, ...)
    and its loaded keys (each store stores them its own way)."""
    return ReplicaRecord(str(row[0]), str(row[1]), int(row[2]), float(row[3]), float(row[4]),
                         int(row[5]), frozenset(loaded))


def revocation_record(row: Sequence[Any]) -> RevocationRecord:
    """A revocation from (revocation_id, kind, value, issued_before, created_at, expires_at,
    reason)."""
    return RevocationRecord(int(row[0]), row[1], bytes(row[2]), *row[3:])


def check_fence(fence: Fence, lease: Sequence[Any] | None) -> None:
    """Refuse a fenced write unless the lease row (holder, epoch) is still the fence's.
    Raises: StaleFence."""
    if lease is None or (str(lease[0]), int(lease[1])) != (fence.holder, fence.epoch):
        raise StaleFence(f"lease {fence.name!r} epoch {fence.epoch} is no longer held: another "
                         "replica took it over; nothing written")
