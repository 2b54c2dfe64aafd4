"""The state store interface: key ring metadata and the consumed-ticket set.

The embedded implementation is SQLite (authority/store/sqlite.py); replicas share a PostgreSQL
database (authority/store/postgres/). tests/test_store_contract.py holds both to this
interface.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

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


#: seconds a join request waits for an approval (from ``requested_at``), and an approved one for
#: its joiner's ``complete_join`` (from ``approved_at``): afterwards it is refused and purged. A
#: constant, not a setting: the joiner's transport key is a session object that lives only as
#: long as its ``cluster join`` process waits, and an hour covers an operator comparing the
#: fingerprint out of band.
JOIN_REQUEST_TTL: Final = 3600.0
#: octets of a wrapped ticket key: an AES-256 key under AES key wrap (RFC 3394, or RFC 5649,
#: whose output for a 32-octet key has the same length); anything else is refused, so a raw key
#: value (32 octets) can never be stored as a blob
WRAPPED_KEY_LEN: Final = 40
#: octets a key's check value may have (the node's choice; see ``WrappedKey``)
CHECK_VALUE_MAX: Final = 32


def digest(data: bytes) -> str:
    """A short stand-in for a blob in a repr or a log: its length and a SHA-256 prefix."""
    return f"<{len(data)} octets, sha256 {hashlib.sha256(data).hexdigest()[:12]}>"


@dataclass(frozen=True, repr=False)
class WrappedKey:
    """A ticket key wrapped under the cluster KEK ``kek_id`` (AES key wrap), as stored with its
    key's record: never the key's value. The store binds the blob to ``key_id`` (its row's
    key) and deletes it with the key (destroyed or deleted). ``check`` is the key's check value
    the creating node computed in its token (a MAC under the key over its id): a node that
    unwrapped the blob computes it again and refuses a copy whose value differs, so a blob moved
    onto another key id (with its check value: the blob does not carry its id) is refused."""

    key_id: bytes
    kek_id: str
    blob: bytes
    check: bytes

    def __repr__(self) -> str:
        return (f"WrappedKey(key_id={self.key_id.hex()}, kek_id={self.kek_id!r}, "
                f"blob={digest(self.blob)}, check={digest(self.check)})")


@dataclass(frozen=True, repr=False)
class JoinRequest:
    """A node's request to join the cluster: its transport public key (DER
    SubjectPublicKeyInfo), whose SHA-256 ``fingerprint`` an operator compares out of band, the
    OAEP hashes its token can unwrap with (preferred first) and the name it asks for. Once
    approved: who approved it, when, and the KEK ``kek_id`` (the cluster's current one: a new
    KEK puts the request back to pending) wrapped to that key with ``oaep_hash``; a request
    nobody approved never has one."""

    fingerprint: str
    public_key: bytes
    oaep_hashes: tuple[str, ...]
    node_name: str
    requested_at: float
    approved_by: str | None = None
    approved_at: float | None = None
    wrapped_kek: bytes | None = None
    oaep_hash: str | None = None
    kek_id: str | None = None

    @property
    def expires_at(self) -> float:
        """When it is refused and purged: ``JOIN_REQUEST_TTL`` after its request, or after its
        approval once approved."""
        return (self.requested_at if self.approved_at is None else self.approved_at) \
            + JOIN_REQUEST_TTL

    def __repr__(self) -> str:
        kek = None if self.wrapped_kek is None else digest(self.wrapped_kek)
        return (f"JoinRequest(fingerprint={self.fingerprint!r}, node_name={self.node_name!r}, "
                f"public_key={digest(self.public_key)}, oaep_hashes={self.oaep_hashes!r}, "
                f"requested_at={self.requested_at!r}, approved_by={self.approved_by!r}, "
                f"approved_at={self.approved_at!r}, wrapped_kek={kek}, "
                f"oaep_hash={self.oaep_hash!r}, kek_id={self.kek_id!r})")


@dataclass(frozen=True, repr=False)
class NodeRecord:
    """A member of the cluster: a node whose token holds the KEK (it unwrapped it and said so,
    ``complete_join``; the first member made it, ``found_cluster``), with its persistent
    transport key (DER SubjectPublicKeyInfo, its SHA-256 ``fingerprint`` and the OAEP hashes its
    token unwraps with), to which a new KEK is wrapped when a member is removed, and the id of
    the KEK it last received (``kek_id``). A founder is approved by itself."""

    name: str
    fingerprint: str
    approved_by: str
    approved_at: float
    joined_at: float
    public_key: bytes = b""
    oaep_hashes: tuple[str, ...] = ()
    kek_id: str = ""

    def __repr__(self) -> str:
        return (f"NodeRecord(name={self.name!r}, fingerprint={self.fingerprint!r}, "
                f"approved_by={self.approved_by!r}, approved_at={self.approved_at!r}, "
                f"joined_at={self.joined_at!r}, public_key={digest(self.public_key)}, "
                f"oaep_hashes={self.oaep_hashes!r}, kek_id={self.kek_id!r})")


@dataclass(frozen=True, repr=False)
class KekDelivery:
    """A new cluster KEK ``kek_id`` waiting for member ``node_name``: wrapped (RSA-OAEP with
    ``oaep_hash``) to the member's persistent transport key by the member that made it
    (``Store.replace_kek``), at ``made_at``. The member unwraps it and acknowledges it
    (``Store.kek_received``), which deletes it."""

    node_name: str
    kek_id: str
    wrapped_kek: bytes
    oaep_hash: str
    made_at: float

    def __repr__(self) -> str:
        return (f"KekDelivery(node_name={self.node_name!r}, kek_id={self.kek_id!r}, "
                f"wrapped_kek={digest(self.wrapped_kek)}, oaep_hash={self.oaep_hash!r}, "
                f"made_at={self.made_at!r})")


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
        stay counted whatever count a caller's copy of the record holds. The wrapped blob of
        a record saved DESTROYED is deleted in the same transaction."""
        ...

    def delete_keys(self, key_ids: Sequence[bytes]) -> None:
        """Remove the records of these keys (CREATING keys given up) and their wrapped blobs
        in one transaction."""
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
        version to ``version`` + 1, in one transaction, which also deletes the wrapped blob of
        every key saved DESTROYED or deleted (a blob and the KEK would bring the key back).
        Returns the new version; None if the version had moved (nothing written).

        Raises: StaleFence (nothing written), DeviceUnavailable.
        """
        ...

    def save_wrapped(self, key_id: bytes, kek_id: str, blob: bytes, check: bytes) -> bool:
        """Store the wrapped blob of a key whose record is stored and not DESTROYED (atomically
        against a commit destroying it), replacing its blob under another KEK only if
        ``check`` is the stored check value (a key id stands for one key value for ever).
        Returns whether it was stored.

        Raises: ValueError (a blob not ``WRAPPED_KEY_LEN`` octets, a check value empty or
        longer than ``CHECK_VALUE_MAX``: nothing stored), DeviceUnavailable.
        """
        ...

    def load_wrapped(self, key_ids: Sequence[bytes] | None = None) -> dict[bytes, WrappedKey]:
        """The stored blobs by key id: of ``key_ids`` (those that have one), or all."""
        ...

    def delete_wrapped(self, key_ids: Sequence[bytes]) -> None:
        """Remove the blobs of these keys (their records stay), in one transaction."""
        ...

    def add_join_request(self, fingerprint: str, public_key_der: bytes,
                         oaep_hashes: Sequence[str], node_name: str, now: float) -> bool:
        """Publish a pending join request. Returns False (nothing stored) if a request with
        this fingerprint is stored already, or a member node has this name.

        Raises: ValueError (``fingerprint`` not the SHA-256 of ``public_key_der`` in
        lower-case hex, no hash, a hash or a name empty or holding a comma), DeviceUnavailable.
        """
        ...

    def list_join_requests(self, now: float) -> list[JoinRequest]:
        """The requests not expired at ``now`` (``JoinRequest.expires_at``), pending and
        approved, oldest first."""
        ...

    def approve_join(self, fingerprint: str, wrapped_kek: bytes, oaep_hash: str,
                     approver: str, now: float, *, kek_id: str) -> bool:
        """Compare-and-swap: attach the KEK ``kek_id`` wrapped to the request's key, if
        ``kek_id`` is the cluster's current KEK (``cluster_kek``), the request is still pending,
        not expired, offers ``oaep_hash``, and its name is neither a member's nor another
        approved request's (atomically against every other membership change and KEK
        replacement). Returns whether it did.

        Raises: ValueError (an empty ``wrapped_kek``, ``approver`` or ``kek_id``),
        DeviceUnavailable.
        """
        ...

    def take_wrapped_kek(self, fingerprint: str) -> tuple[bytes, str, str] | None:
        """For the joiner: (the wrapped KEK, its OAEP hash, the KEK's id) once its request was
        approved; None while it is pending or when there is no such request."""
        ...

    def complete_join(self, fingerprint: str, now: float) -> NodeRecord | None:
        """The joiner unwrapped the KEK: make it a member (with the request's public key and
        OAEP hashes, and the approval's KEK id) and delete its request (the wrapped KEK with
        it), in one transaction. Returns the new member; None if the request is not an
        approved one (nothing changed)."""
        ...

    def purge_join_requests(self, now: float) -> int:
        """Delete the requests expired at ``now`` (approved ones with their wrapped KEK);
        return how many."""
        ...

    def list_nodes(self) -> list[NodeRecord]:
        """The members, oldest join first."""
        ...

    def remove_node(self, name: str) -> bool:
        """Drop a member's record (and a KEK delivery waiting for it); returns whether there
        was one. (Its token still holds the KEK: keys wrapped later are safe from it only
        under a new KEK, ``replace_kek``.)"""
        ...

    # -- the cluster KEK (issue 15) ----------------------------------------------------------------

    def found_cluster(self, name: str, fingerprint: str, public_key_der: bytes,
                      oaep_hashes: Sequence[str], kek_id: str, now: float) -> NodeRecord | None:
        """Make the first member (approved by itself, at ``now``) and ``kek_id`` the cluster's
        first KEK, in one transaction. Returns the member; None (nothing changed) if the
        cluster has a member or a current KEK already.

        Raises: ValueError (as ``add_join_request``; an empty ``kek_id``), DeviceUnavailable.
        """
        ...

    def cluster_kek(self) -> str | None:
        """The id of the cluster's current KEK, under which new ticket keys are wrapped; None
        before ``found_cluster``."""
        ...

    def replace_kek(self, removed: str, maker: str, new_kek_id: str,
                    deliveries: Mapping[str, tuple[bytes, str]], now: float) -> bool:
        """Remove member ``removed`` under a new KEK that member ``maker`` made, in one
        transaction, compare-and-swap against every other membership change: only if both are
        members, ``removed`` != ``maker``, ``new_kek_id`` is not the current KEK's id and
        ``deliveries`` (member name -> (the new KEK wrapped to its transport key, the OAEP
        hash)) names exactly the other members. Then: ``removed`` and any delivery waiting for
        it are deleted, ``new_kek_id`` becomes the current KEK and ``maker``'s ``kek_id`` (a
        delivery still waiting for ``maker``, of an older KEK, is deleted), each delivery is
        stored (replacing an older one; ``made_at`` = ``now``), and every approved join request
        not completed goes back to pending (its wrapped KEK, of the old KEK, and its approval
        are cleared: it needs a new approval). Returns whether it did (False: nothing changed).

        Raises: ValueError (an empty ``new_kek_id``, wrapped KEK or OAEP hash),
        DeviceUnavailable.
        """
        ...

    def kek_delivery(self, node_name: str) -> KekDelivery | None:
        """The KEK delivery waiting for this member, or None."""
        ...

    def kek_received(self, node_name: str, kek_id: str) -> bool:
        """The member unwrapped its delivery of KEK ``kek_id`` into its token: delete the
        delivery and record ``kek_id`` as the member's, in one transaction. Returns False
        (nothing changed) if no delivery of ``kek_id`` waits for it."""
        ...

    def kek_ids_in_use(self) -> set[str]:
        """The KEK ids something stored still needs: the current KEK's, the KEK of every
        wrapped ticket key, of every approved join request's and waiting delivery's wrapped
        KEK, and every member's ``kek_id``. A KEK not among them may be destroyed in a
        token."""
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
