"""Records from the stores' rows, and key records to rows: the SQLite and the PostgreSQL store
select the same columns in the same order (each keeps its own SQL) and build the same records
from them here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from authority.keys import KeyRecord, KeyState
from authority.store.base import (
    CHECK_VALUE_MAX,
    JOIN_REQUEST_TTL,
    WRAPPED_KEY_LEN,
    Fence,
    JoinRequest,
    KekDelivery,
    LeaseRecord,
    NodeRecord,
    ReplicaRecord,
    RevocationRecord,
    StaleFence,
    WrappedKey,
)


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


# -- wrapped keys, join requests, nodes (issue 15) -----------------------------------------------

def destroyed_ids(records: Sequence[KeyRecord]) -> list[bytes]:
    """The ids of the records saved DESTROYED: their wrapped blobs go in the same
    transaction."""
    return [r.key_id for r in records if r.state == KeyState.DESTROYED]


def check_wrapped(blob: bytes, check: bytes) -> None:
    """Refuse what is not a wrapped ticket key and its check value.
    Raises: ValueError."""
    if len(blob) != WRAPPED_KEY_LEN:
        raise ValueError(f"a wrapped key is {WRAPPED_KEY_LEN} octets (AES key wrap of an "
                         f"AES-256 key), not {len(blob)}: not stored")
    if not 0 < len(check) <= CHECK_VALUE_MAX:
        raise ValueError(f"a key check value is 1 to {CHECK_VALUE_MAX} octets, not "
                         f"{len(check)}: not stored")


def wrapped_key(row: Sequence[Any]) -> WrappedKey:
    """A wrapped key from (key_id, kek_id, blob, check_value)."""
    return WrappedKey(bytes(row[0]), str(row[1]), bytes(row[2]), bytes(row[3]))


def check_join_request(fingerprint: str, public_key_der: bytes, oaep_hashes: Sequence[str],
                       node_name: str) -> None:
    """Refuse a join request whose fingerprint is not its key's (an operator comparing it
    would approve another key), without a hash, or with an empty or comma-holding name.
    Raises: ValueError."""
    if fingerprint != hashlib.sha256(public_key_der).hexdigest():
        raise ValueError("the fingerprint is not the SHA-256 of the public key: not stored")
    if not oaep_hashes or not all(_plain(h) for h in (*oaep_hashes, node_name)):
        raise ValueError("a join request needs its OAEP hashes and a node name, each "
                         "non-empty and without a comma: not stored")


def _plain(name: str) -> bool:
    return bool(name) and "," not in name


def check_approval(wrapped_kek: bytes, approver: str, kek_id: str) -> None:
    """Refuse an approval without a wrapped KEK, an approver or the KEK's id.
    Raises: ValueError."""
    if not wrapped_kek or not approver or not kek_id:
        raise ValueError("an approval needs the wrapped KEK, its id and the approver: "
                         "not stored")


def check_founding(fingerprint: str, public_key_der: bytes, oaep_hashes: Sequence[str],
                   name: str, kek_id: str) -> None:
    """Refuse a first member as ``check_join_request`` refuses a request, or without a KEK id.
    Raises: ValueError."""
    check_join_request(fingerprint, public_key_der, oaep_hashes, name)
    if not kek_id:
        raise ValueError("a cluster's first KEK needs its id: not stored")


def check_deliveries(new_kek_id: str, deliveries: Mapping[str, tuple[bytes, str]]) -> None:
    """Refuse a KEK replacement without the new KEK's id, or a delivery without its wrapped
    KEK or OAEP hash. Raises: ValueError."""
    if not new_kek_id:
        raise ValueError("a new KEK needs its id: not stored")
    if not all(blob and oaep_hash for blob, oaep_hash in deliveries.values()):
        raise ValueError("a KEK delivery needs the wrapped KEK and its OAEP hash: not stored")


def replacement_allowed(members: Iterable[str], current: str | None, removed: str, maker: str,
                        new_kek_id: str, recipients: Iterable[str]) -> bool:
    """Whether a KEK replacement holds against the membership read in its transaction: both
    members, distinct, a KEK id other than the current one, and deliveries for exactly the
    other members."""
    others = set(members)
    if removed == maker or removed not in others or maker not in others:
        return False
    return new_kek_id != current and set(recipients) == others - {removed, maker}


def join_request(row: Sequence[Any], oaep_hashes: Iterable[str]) -> JoinRequest:
    """A join request from (fingerprint, public_key, oaep_hashes, node_name, requested_at,
    approved_by, approved_at, wrapped_kek, oaep_hash, kek_id) and its hashes (each store
    stores them its own way)."""
    kek = None if row[7] is None else bytes(row[7])
    return JoinRequest(str(row[0]), bytes(row[1]), tuple(oaep_hashes), str(row[3]),
                       float(row[4]), row[5], row[6], kek, row[8], row[9])


def expiry_bound(now: float) -> float:
    """Requests (pending: requested, approved: approved) at or before this have expired."""
    return now - JOIN_REQUEST_TTL


def node_record(row: Sequence[Any], oaep_hashes: Iterable[str]) -> NodeRecord:
    """A member from (name, fingerprint, approved_by, approved_at, joined_at, public_key,
    oaep_hashes, kek_id) and its hashes (each store stores them its own way)."""
    return NodeRecord(str(row[0]), str(row[1]), str(row[2]), float(row[3]), float(row[4]),
                      bytes(row[5]), tuple(oaep_hashes), str(row[7]))


def kek_delivery(row: Sequence[Any]) -> KekDelivery:
    """A delivery from (node_name, kek_id, wrapped_kek, oaep_hash, made_at)."""
    return KekDelivery(str(row[0]), str(row[1]), bytes(row[2]), str(row[3]), float(row[4]))
