"""The state store interface: key ring metadata and the consumed-ticket set.

The embedded implementation is SQLite (authority/store/sqlite.py); replicas share a PostgreSQL
database (authority/store/postgres/). tests/test_store_contract.py holds both to this
interface.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from authority.errors import DeviceUnavailable
from authority.keys import KeyRecord


@dataclass(frozen=True)
class RevocationRecord:
    """A stored revocation: it covers the tickets of its selector issued before
    ``issued_before`` and is kept until ``expires_at``, when every covered ticket has expired."""

    revocation_id: int      # assigned by the store (0 before)
    kind: str               # "id_i", "old_sa" (value spi_i | spi_r), "ticket_id", "issued_before"
    value: bytes            # empty for "issued_before"
    issued_before: float    # covers tickets with issued_at < this (Unix seconds)
    created_at: float
    expires_at: float
    reason: str


@dataclass(frozen=True)
class Fence:
    """Proof that the writer holds lease ``name`` at ``epoch``: a store refuses a write carrying
    it (``StaleFence``) once another replica has taken the lease over (a higher epoch)."""

    name: str
    holder: str
    epoch: int


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as stored: who holds it, under which fencing epoch, until when (Unix seconds of
    the holder's clock)."""

    name: str
    holder: str
    epoch: int
    expires_at: float


@dataclass(frozen=True)
class ReplicaRecord:
    """One authority process as it last reported itself (a heartbeat).

    ``loaded``: the keys of the key ring this replica's device holds and its ring knows (what
    it can open); ``ring_version``: the key ring version it has loaded."""

    replica_id: str         # random, new at each process start
    host: str               # for display
    pid: int                # for display
    started_at: float
    heartbeat_at: float
    ring_version: int
    loaded: frozenset[bytes]


@dataclass(frozen=True)
class StoreInfo:
    """What a store is, for status: ``kind`` "sqlite" or "postgresql"; ``location`` the
    file, or ``host=... port=... dbname=... user=...`` (never a password); the schema version
    the database records."""

    kind: str
    location: str
    schema_version: int


class ChangeFeed(Protocol):
    """Wake-ups for one reader of the policy version (``Store.policy_version``): the
    PostgreSQL store's LISTEN connection, or a plain timer (SQLite: other processes' changes
    are seen by re-reading). A wake-up says only "look now": the reader compares versions, so a
    lost wake-up costs at most one ``timeout``."""

    def wait(self, timeout: float) -> None:
        """Return when a change may have been committed elsewhere (a notification, a
        connection made again: what was notified meanwhile is lost), after ``timeout`` seconds
        at the latest, or at once once closed. Never raises."""
        ...

    def close(self) -> None:
        """End the feed (a ``wait`` in progress returns soon); idempotent. Never raises."""
        ...


class PollingFeed:
    """A ChangeFeed without notifications: ``wait`` sleeps its timeout (or until closed)."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def wait(self, timeout: float) -> None:
        """Sleep ``timeout`` seconds, or until closed. Never raises."""
        self._closed.wait(timeout)

    def close(self) -> None:
        """Wake a ``wait`` in progress; later ones return at once. Never raises."""
        self._closed.set()


class StaleFence(DeviceUnavailable):
    """A fenced write carried an epoch that is no longer its lease's: another replica took the
    lease over. Nothing was written."""


class Store(Protocol):
    """Durable, thread-safe state. Every method raises DeviceUnavailable if storage fails."""

    def load_keys(self) -> list[KeyRecord]:
        """Return every key record, oldest first."""
        ...

    def save_keys(self, records: list[KeyRecord]) -> None:
        """Insert or replace the given records in one transaction (all or nothing). A stored
        ``seal_count`` is never lowered: seals reserved by another process (``reserve_seals``)
        stay counted whatever count a caller's copy of the record holds."""
        ...

    def delete_keys(self, key_ids: Sequence[bytes]) -> None:
        """Remove the records of these keys (CREATING keys given up) in one transaction."""
        ...

    def reserve_seals(self, key_id: bytes, block: int, limit: int) -> tuple[int, int] | None:
        """Reserve up to ``block`` (> 0) more seals of an ACTIVE key, never past ``limit`` (its
        nonce budget), atomically against every process on this store: concurrent callers get
        disjoint ranges. Returns (first, end): seal numbers first..end-1 are the caller's, and
        the record's ``seal_count`` is now ``end``; None if the key is unknown, not ACTIVE or its
        budget is spent (``seal_count`` >= ``limit``)."""
        ...

    def load_ring(self) -> tuple[int, list[KeyRecord]]:
        """The key ring's version and every key record (CREATING ones too), oldest first, read
        in one snapshot."""
        ...

    def ring_version(self) -> int:
        """The key ring's version (0 until the first ``commit_ring``)."""
        ...

    def commit_ring(self, version: int, save: Sequence[KeyRecord],
                    delete: Sequence[bytes] = (), fence: Fence | None = None) -> int | None:
        """Compare-and-swap on the key ring: if its version is still ``version`` (and, with
        ``fence``, the fence's lease is still held at its epoch), save ``save`` (as
        ``save_keys``: a stored seal count is never lowered), delete ``delete`` and move the
        version to ``version`` + 1, in one transaction. Returns the new version; None if the
        version had moved (nothing written).

        Raises: StaleFence (nothing written), DeviceUnavailable.
        """
        ...

    def acquire_lease(self, name: str, holder: str, now: float,
                      duration: float) -> int | None:
        """Take or renew lease ``name`` for ``holder`` until ``now`` + ``duration``, atomically
        against every process on this store: granted if it is free, held by ``holder``, or
        expired (``expires_at`` <= ``now``). A holder renewing keeps its epoch; a new holder
        gets the previous epoch + 1 (1 for a new lease). Returns the epoch; None if another
        holder has it unexpired."""
        ...

    def release_lease(self, name: str, holder: str) -> None:
        """Let lease ``name`` expire now if ``holder`` holds it (another may take it at once,
        with the next epoch)."""
        ...

    def load_lease(self, name: str) -> LeaseRecord | None:
        """Lease ``name`` as stored (None if never taken)."""
        ...

    def heartbeat(self, replica: ReplicaRecord) -> None:
        """Insert or replace this replica's record."""
        ...

    def load_replicas(self) -> list[ReplicaRecord]:
        """Every replica record, oldest start first."""
        ...

    def remove_replica(self, replica_id: str) -> None:
        """Drop a replica's record (it stopped cleanly)."""
        ...

    def purge_replicas(self, before: float) -> int:
        """Drop the records of replicas whose last heartbeat is older than ``before``; return
        how many."""
        ...

    def consume_many(self, entries: Sequence[tuple[bytes, int]], now: float) -> list[bool]:
        """Mark tickets (ticket_id, expires_at) used until they expire, in one transaction.

        Returns, per entry in order, True if it was newly consumed, False if it already was
        (a repeated id within the batch counts as already consumed).
        """
        ...

    def consumed_among(self, ticket_ids: Sequence[bytes], now: float) -> set[bytes]:
        """Return the ids among ``ticket_ids`` that have a live (unexpired) consumed entry."""
        ...

    def purge_expired(self, now: float) -> int:
        """Delete consumed entries whose tickets have expired; return how many."""
        ...

    def add_revocation(self, record: RevocationRecord) -> RevocationRecord:
        """Store a revocation; return it with its assigned id. Moves the policy version
        (``policy_version``) in the same transaction."""
        ...

    def load_revocations(self, now: float) -> list[RevocationRecord]:
        """Return the revocations that have not expired, oldest first."""
        ...

    def purge_revocations(self, now: float) -> int:
        """Delete expired revocations; return how many. Moves the policy version if it
        deleted any."""
        ...

    def load_epochs(self) -> dict[str, int]:
        """Return the policy epoch of every realm that has one above 0."""
        ...

    def bump_epoch(self, realm: str, now: float) -> int:
        """Increment a realm's policy epoch atomically; return the new epoch. Moves the
        policy version in the same transaction."""
        ...

    def policy_version(self) -> int:
        """A counter of the changes to revocations and realm epochs, moved by every change
        in the transaction that makes it: a replica whose copy was read at another version
        reads them again (one cheap read per heartbeat instead of the whole policy)."""
        ...

    def changes(self) -> ChangeFeed:
        """A new feed of wake-ups on policy changes for one reader (its own database
        connection on PostgreSQL, which also tells the store whether the database can be
        reached); close it when done."""
        ...

    def describe(self) -> StoreInfo:
        """What this store is and the schema version its database records (read now; the
        version found at open if the database cannot be read). Never raises."""
        ...

    def record_max_lifetime(self, max_lifetime: int, now: float) -> float:
        """Remember the maximum ticket lifetime this start runs with; return the lifetime
        horizon: the time until which tickets granted a longer lifetime by an earlier start may
        still be live (0 if none). A maximum lower than the previous start's moves the horizon
        to at least ``now`` + the previous maximum; it never moves back."""
        ...

    def lifetime_horizon(self) -> float:
        """The horizon ``record_max_lifetime`` last returned (0 if none)."""
        ...

    def handle_key(self) -> bytes:
        """The 32-octet key that authenticates consume handles: random, made on first use and
        kept, the same for every process on this store."""
        ...

    def consumed_count(self, now: float) -> int:
        """Return the number of live consumed entries."""
        ...

    def state_owner(self) -> tuple[str, str] | None:
        """The (backend, device) this state belongs to, as ``set_state_owner`` recorded them;
        None until then."""
        ...

    def set_state_owner(self, backend: str, device: str) -> None:
        """Record the backend ("pkcs11", "tpm") and the device (authority/statedir.py) this
        state belongs to."""
        ...

    @property
    def down_since(self) -> float | None:
        """Since when (``time.monotonic``) the store knows itself unreachable (a call found the
        database gone; cleared once it answers again); None while it does not. Never raises."""
        ...

    def close(self) -> None:
        """Flush and close."""
        ...
