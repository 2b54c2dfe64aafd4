"""The embedded store: one SQLite file in the state directory (WAL mode, one writer lock)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from authority.errors import DeviceUnavailable, StartupError
from authority.keys import KeyRecord, KeyState
from authority.store.base import (
    ChangeFeed,
    Fence,
    JoinRequest,
    KekDelivery,
    LeaseRecord,
    NodeRecord,
    PollingFeed,
    ReplicaRecord,
    RevocationRecord,
    StoreInfo,
    WrappedKey,
)
from authority.store.rows import (
    check_approval,
    check_deliveries,
    check_fence,
    check_founding,
    check_join_request,
    check_wrapped,
    destroyed_ids,
    expiry_bound,
    join_request,
    kek_delivery,
    key_record,
    key_rows,
    lease_record,
    node_record,
    replacement_allowed,
    replica_record,
    revocation_record,
    wrapped_key,
)

#: 1: keys, consumed. 2: + revocations, realms. 3: + key ring version, replicas, leases, policy
#: version (an older file is migrated on open; the policy version table, added before schema 3
#: was released, is created on open if missing). 4: + wrapped keys, join requests, nodes (per-node
#: tokens under a cluster KEK). 5: + the cluster's current KEK, KEK deliveries, the members'
#: transport keys and KEK ids, the KEK id of an approval (``_UPGRADE_4``).
SCHEMA_VERSION = 5
HANDLE_KEY_LEN = 32  # octets of the consume-handle key (meta "handle_key", hex)
_CHUNK = 500  # ids per IN (...) query, well under SQLite's parameter limit
#: seconds a statement waits for another connection's write lock (another process sharing the
#: file: server.processes) before failing with "database is locked" (UNAVAILABLE)
BUSY_TIMEOUT = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id BLOB PRIMARY KEY,
    state INTEGER NOT NULL,
    created_at REAL NOT NULL,
    seal_count INTEGER NOT NULL,
    sealing_ended_at REAL,
    opens_until REAL,
    destroyed_at REAL
);
CREATE TABLE IF NOT EXISTS consumed (
    ticket_id BLOB PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revocations (
    revocation_id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    value BLOB NOT NULL,
    issued_before REAL NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS realms (
    realm TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    bumped_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    ring_version INTEGER NOT NULL,
    loaded TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS wrapped_keys (
    key_id BLOB PRIMARY KEY REFERENCES keys (key_id) ON DELETE CASCADE,
    kek_id TEXT NOT NULL,
    wrapped BLOB NOT NULL CHECK (length(wrapped) = 40),
    check_value BLOB NOT NULL CHECK (length(check_value) BETWEEN 1 AND 32)
);
CREATE TABLE IF NOT EXISTS join_requests (
    fingerprint TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    oaep_hashes TEXT NOT NULL,
    node_name TEXT NOT NULL,
    requested_at REAL NOT NULL,
    approved_by TEXT,
    approved_at REAL,
    wrapped_kek BLOB,
    oaep_hash TEXT,
    kek_id TEXT CHECK ((approved_at IS NULL) = (kek_id IS NULL)),
    CHECK ((approved_at IS NULL) = (approved_by IS NULL)
           AND (approved_at IS NULL) = (wrapped_kek IS NULL)
           AND (approved_at IS NULL) = (oaep_hash IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS join_requests_approved_name ON join_requests (node_name)
    WHERE approved_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    approved_by TEXT NOT NULL,
    approved_at REAL NOT NULL,
    joined_at REAL NOT NULL,
    public_key BLOB NOT NULL DEFAULT x'',
    oaep_hashes TEXT NOT NULL DEFAULT '',
    kek_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS cluster_kek (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    kek_id TEXT NOT NULL CHECK (kek_id <> ''),
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kek_deliveries (
    node_name TEXT PRIMARY KEY REFERENCES nodes (name) ON DELETE CASCADE,
    kek_id TEXT NOT NULL CHECK (kek_id <> ''),
    wrapped_kek BLOB NOT NULL CHECK (length(wrapped_kek) > 0),
    oaep_hash TEXT NOT NULL CHECK (oaep_hash <> ''),
    made_at REAL NOT NULL
);
"""
#: schema 4 -> 5, for the tables the script above does not make again (``_upgrade_4``): an
#: approval made before had no KEK id, so an approved request goes back to pending (approved
#: again, under the cluster's current KEK); a member of before has no transport key recorded
_UPGRADE_4 = (
    "UPDATE join_requests SET approved_by = NULL, approved_at = NULL, wrapped_kek = NULL, "
    "oaep_hash = NULL WHERE approved_at IS NOT NULL",
    "ALTER TABLE join_requests ADD COLUMN kek_id TEXT "
    "CHECK ((approved_at IS NULL) = (kek_id IS NULL))",
    "ALTER TABLE nodes ADD COLUMN public_key BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE nodes ADD COLUMN oaep_hashes TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE nodes ADD COLUMN kek_id TEXT NOT NULL DEFAULT ''",
)
#: one-row version counters (the key ring's, the policy's), created at 0
_COUNTERS = ("key_ring", "policy_version")
_SCHEMA += "".join(f"CREATE TABLE IF NOT EXISTS {name} (id INTEGER PRIMARY KEY CHECK (id = 1), "
                   f"version INTEGER NOT NULL);\nINSERT OR IGNORE INTO {name} VALUES (1, 0);\n"
                   for name in _COUNTERS)
_KEY_UPSERT = ("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE "
               "SET state=excluded.state, created_at=excluded.created_at, "
               "seal_count=max(seal_count, excluded.seal_count), "
               "sealing_ended_at=excluded.sealing_ended_at, opens_until=excluded.opens_until, "
               "destroyed_at=excluded.destroyed_at")
_KEY_SELECT = ("SELECT key_id, state, created_at, seal_count, sealing_ended_at, opens_until, "
               "destroyed_at FROM keys ORDER BY created_at, key_id")
_WRAPPED_SELECT = "SELECT key_id, kek_id, wrapped, check_value FROM wrapped_keys"
#: an approved request not completed back to pending: its wrapped KEK is of a replaced KEK
_UNAPPROVE = ("UPDATE join_requests SET approved_by = NULL, approved_at = NULL, "
              "wrapped_kek = NULL, oaep_hash = NULL, kek_id = NULL "
              "WHERE approved_at IS NOT NULL")
_JOIN_SELECT = ("SELECT fingerprint, public_key, oaep_hashes, node_name, requested_at, "
                "approved_by, approved_at, wrapped_kek, oaep_hash, kek_id FROM join_requests")
_NODE_SELECT = ("SELECT name, fingerprint, approved_by, approved_at, joined_at, public_key, "
                "oaep_hashes, kek_id FROM nodes")
_NODE_INSERT = ("INSERT INTO nodes (name, fingerprint, approved_by, approved_at, joined_at, "
                "public_key, oaep_hashes, kek_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
#: every KEK id a stored row names (``kek_ids_in_use``)
_KEK_IDS = ("SELECT kek_id FROM cluster_kek UNION SELECT kek_id FROM wrapped_keys "
            "UNION SELECT kek_id FROM kek_deliveries UNION SELECT kek_id FROM join_requests "
            "WHERE kek_id IS NOT NULL UNION SELECT kek_id FROM nodes WHERE kek_id <> ''")


class SqliteStore:
    """Store backed by one SQLite database file. Thread-safe through one lock."""

    def __init__(self, path: Path, synchronous: str = "NORMAL",
                 busy_timeout: float = BUSY_TIMEOUT, sole_writer: bool = False) -> None:
        """Open (creating if needed) the database at ``path``. Other processes may share the
        file (WAL): a write (``BEGIN IMMEDIATE``) waits up to ``busy_timeout`` seconds for
        theirs to commit.

        ``sole_writer``: no other process writes the file's consumed set (one ``serve``
        holding the state directory's lock, ``server.processes`` 1). The store then keeps the
        consumed ids in memory as well (``ConsumedIndex``), and a lookup reads the file only
        for an id found there: a redeem of an unconsumed ticket costs no query.

        Raises: StartupError if the file cannot be opened or has an unknown schema version.
        """
        self.path = path
        self._lock = threading.Lock()
        self._index: ConsumedIndex | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA foreign_keys=ON")   # a key's deletion takes its blob
            self._db.executescript(_SCHEMA)
            self._check_schema()
            if sole_writer:
                self._index = ConsumedIndex(
                    bytes(r[0]) for r in self._db.execute("SELECT ticket_id FROM consumed"))
        except sqlite3.Error as exc:
            raise StartupError(f"state store {path}: {exc}") from exc

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] in ("1", "2", "3"):  # the script above already created the newer tables
            self._db.execute("UPDATE meta SET value=? WHERE name='schema'", (str(SCHEMA_VERSION),))
        elif row[0] == "4":
            self._upgrade_4()
        elif row[0] != str(SCHEMA_VERSION):
            raise StartupError(f"state store {self.path}: schema {row[0]}, this version "
                               f"reads {SCHEMA_VERSION}")

    def _upgrade_4(self) -> None:
        """Schema 4 -> 5 in one transaction under the file's write lock (another process
        opening the file at once waits, then finds it done). Raises: sqlite3.Error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if _meta(self._db, "schema") == "4":
                for statement in _UPGRADE_4:
                    self._db.execute(statement)
                self._db.execute("UPDATE meta SET value=? WHERE name='schema'",
                                 (str(SCHEMA_VERSION),))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _tx(self, committed: Callable[[], object] | None = None
            ) -> Iterator[sqlite3.Connection]:
        """Run the body in one transaction under the lock; ``BEGIN IMMEDIATE`` takes the
        file's write lock first, waiting (busy timeout) while another process holds it.
        ``committed`` runs once the transaction committed, still under the lock.

        Raises: DeviceUnavailable naming the file if SQLite fails (the transaction is rolled
        back), "database is locked" included when the wait exceeded the busy timeout.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                if committed is not None:
                    committed()
            except sqlite3.Error as exc:
                raise DeviceUnavailable(f"state store failed: {exc} ({self.path})") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Run read-only statements under the lock, each in SQLite's own implicit read
        transaction (WAL: a consistent snapshot, no write lock, no file-lock round trip).

        Raises: DeviceUnavailable naming the file if SQLite fails.
        """
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise DeviceUnavailable(f"state store failed: {exc} ({self.path})") from exc

    def load_keys(self) -> list[KeyRecord]:
        """Return every key record, oldest first."""
        with self._tx() as db:
            rows = db.execute(_KEY_SELECT).fetchall()
        return [key_record(r) for r in rows]

    def save_keys(self, records: list[KeyRecord]) -> None:
        """Insert or replace the records in one transaction; a stored seal count is never
        lowered (seals another process reserved stay counted)."""
        with self._tx() as db:
            db.executemany(_KEY_UPSERT, key_rows(records))
            _drop_blobs(db, destroyed_ids(records))

    def delete_keys(self, key_ids: Sequence[bytes]) -> None:
        """Remove the records of these keys in one transaction (their blobs by the foreign
        key's cascade)."""
        with self._tx() as db:
            db.executemany("DELETE FROM keys WHERE key_id=?", [(k,) for k in key_ids])

    def reserve_seals(self, key_id: bytes, block: int, limit: int) -> tuple[int, int] | None:
        """Reserve up to ``block`` seals of an ACTIVE key, never past ``limit``, in one
        transaction (the file's write lock orders processes). Returns (first, end), or None if
        the key is unknown, not ACTIVE or spent."""
        with self._tx() as db:
            row = db.execute("SELECT seal_count FROM keys WHERE key_id=? AND state=?",
                             (key_id, int(KeyState.ACTIVE))).fetchone()
            if row is None or int(row[0]) >= limit:
                return None
            first = int(row[0])
            end = min(first + block, limit)
            db.execute("UPDATE keys SET seal_count=? WHERE key_id=?", (end, key_id))
        return first, end

    def load_ring(self) -> tuple[int, list[KeyRecord]]:
        """The key ring's version and every key record, oldest first, in one transaction."""
        with self._tx() as db:
            version = _ring_version(db)
            rows = db.execute(_KEY_SELECT).fetchall()
        return version, [key_record(r) for r in rows]

    def ring_version(self) -> int:
        """The key ring's version."""
        with self._read() as db:
            return _ring_version(db)

    def commit_ring(self, version: int, save: Sequence[KeyRecord],
                    delete: Sequence[bytes] = (), fence: Fence | None = None) -> int | None:
        """Compare-and-swap on the key ring in one transaction (the file's write lock orders
        processes); the blobs of keys saved DESTROYED or deleted go with them. Returns the new
        version, None if it had moved. Raises: StaleFence."""
        with self._tx() as db:
            if fence is not None:
                check_fence(fence, db.execute("SELECT holder, epoch FROM leases WHERE name=?",
                                              (fence.name,)).fetchone())
            if _ring_version(db) != version:
                return None
            db.executemany(_KEY_UPSERT, key_rows(save))
            _drop_blobs(db, destroyed_ids(save))
            db.executemany("DELETE FROM keys WHERE key_id=?", [(k,) for k in delete])
            db.execute("UPDATE key_ring SET version=? WHERE id=1", (version + 1,))
        return version + 1

    def acquire_lease(self, name: str, holder: str, now: float,
                      duration: float) -> int | None:
        """Take or renew a lease in one transaction; returns its epoch, None if another holds
        it unexpired."""
        with self._tx() as db:
            row = db.execute("SELECT holder, epoch, expires_at FROM leases WHERE name=?",
                             (name,)).fetchone()
            if row is None:
                epoch = 1
            elif str(row[0]) == holder:
                epoch = int(row[1])
            elif float(row[2]) <= now:
                epoch = int(row[1]) + 1
            else:
                return None
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                       (name, holder, epoch, now + duration))
        return epoch

    def release_lease(self, name: str, holder: str) -> None:
        """Let the lease expire now if ``holder`` holds it."""
        with self._tx() as db:
            db.execute("UPDATE leases SET expires_at=0 WHERE name=? AND holder=?",
                       (name, holder))

    def load_lease(self, name: str) -> LeaseRecord | None:
        """The stored lease, or None."""
        with self._read() as db:
            row = db.execute("SELECT name, holder, epoch, expires_at FROM leases WHERE name=?",
                             (name,)).fetchone()
        return None if row is None else lease_record(row)

    def heartbeat(self, replica: ReplicaRecord) -> None:
        """Insert or replace the replica's record (its loaded keys as hex, comma-separated)."""
        loaded = ",".join(sorted(k.hex() for k in replica.loaded))
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (replica.replica_id, replica.host, replica.pid, replica.started_at,
                        replica.heartbeat_at, replica.ring_version, loaded))

    def load_replicas(self) -> list[ReplicaRecord]:
        """Every replica record, oldest start first."""
        with self._read() as db:
            rows = db.execute("SELECT replica_id, host, pid, started_at, heartbeat_at, "
                              "ring_version, loaded FROM replicas "
                              "ORDER BY started_at, replica_id").fetchall()
        return [replica_record(r, (bytes.fromhex(k) for k in str(r[6]).split(",") if k))
                for r in rows]

    def remove_replica(self, replica_id: str) -> None:
        """Drop a replica's record."""
        with self._tx() as db:
            db.execute("DELETE FROM replicas WHERE replica_id=?", (replica_id,))

    def purge_replicas(self, before: float) -> int:
        """Drop records of replicas silent since before ``before``; return how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM replicas WHERE heartbeat_at<?", (before,)).rowcount

    def consume_many(self, entries: Sequence[tuple[bytes, int]], now: float) -> list[bool]:
        """Mark tickets used in one transaction; True where newly consumed. An expired leftover
        entry is replaced."""
        if not entries:
            return []
        fresh: list[bool] = []
        with self._tx() as db:
            live = self._consumed(db, [ticket_id for ticket_id, _ in entries], now)
            for ticket_id, _ in entries:
                fresh.append(ticket_id not in live)
                live.add(ticket_id)
            rows = [entry for entry, new in zip(entries, fresh, strict=True) if new]
            if self._index is not None:   # before the commit: at worst an id too many
                self._index.add(ticket_id for ticket_id, _ in rows)
            db.executemany("INSERT OR REPLACE INTO consumed VALUES (?, ?)", rows)
        return fresh

    def consumed_among(self, ticket_ids: Sequence[bytes], now: float) -> set[bytes]:
        """Return the ids that have a live consumed entry."""
        if not ticket_ids:
            return set()
        with self._read() as db:
            return self._consumed(db, ticket_ids, now)

    def _consumed(self, db: sqlite3.Connection, ticket_ids: Sequence[bytes],
                  now: float) -> set[bytes]:
        """The ids of ``ticket_ids`` with a live entry; with ``sole_writer`` only those the
        in-memory index has are looked up in the file (none: no query). Call under the lock."""
        if self._index is not None:
            ticket_ids = self._index.among(ticket_ids)
        return self._live(db, ticket_ids, now) if ticket_ids else set()

    @staticmethod
    def _live(db: sqlite3.Connection, ticket_ids: Sequence[bytes], now: float) -> set[bytes]:
        found: set[bytes] = set()
        for start in range(0, len(ticket_ids), _CHUNK):
            chunk = list(ticket_ids[start:start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = db.execute(f"SELECT ticket_id FROM consumed WHERE ticket_id IN ({marks}) "  # noqa: S608
                              "AND expires_at>?", [*chunk, now])
            found.update(bytes(r[0]) for r in rows)
        return found

    def purge_expired(self, now: float) -> int:
        """Delete entries of expired tickets; return the count."""
        gone: list[bytes] = []
        index = self._index
        with self._tx(None if index is None else lambda: index.discard(gone)) as db:
            gone.extend(bytes(r[0]) for r in db.execute(
                "DELETE FROM consumed WHERE expires_at<=? RETURNING ticket_id", (now,)))
        return len(gone)

    def add_revocation(self, record: RevocationRecord) -> RevocationRecord:
        """Store a revocation; returns it with its new id."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO revocations (kind, value, issued_before, created_at, expires_at, "
                "reason) VALUES (?, ?, ?, ?, ?, ?)",
                (record.kind, record.value, record.issued_before, record.created_at,
                 record.expires_at, record.reason))
            revocation_id = int(cursor.lastrowid or 0)
            _policy_changed(db)
        return dataclasses.replace(record, revocation_id=revocation_id)

    def load_revocations(self, now: float) -> list[RevocationRecord]:
        """Return the live revocations, oldest first."""
        with self._tx() as db:
            rows = db.execute("SELECT revocation_id, kind, value, issued_before, created_at, "
                              "expires_at, reason FROM revocations WHERE expires_at>? "
                              "ORDER BY revocation_id", (now,)).fetchall()
        return [revocation_record(r) for r in rows]

    def purge_revocations(self, now: float) -> int:
        """Delete revocations whose covered tickets have all expired; return the count."""
        with self._tx() as db:
            purged = db.execute("DELETE FROM revocations WHERE expires_at<=?", (now,)).rowcount
            if purged:
                _policy_changed(db)
        return purged

    def load_epochs(self) -> dict[str, int]:
        """Return every realm whose policy epoch was bumped, with its epoch."""
        with self._tx() as db:
            rows = db.execute("SELECT realm, epoch FROM realms").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def bump_epoch(self, realm: str, now: float) -> int:
        """Increment a realm's policy epoch (from 0 if never bumped) in one transaction."""
        with self._tx() as db:
            row = db.execute("SELECT epoch FROM realms WHERE realm=?", (realm,)).fetchone()
            epoch = (int(row[0]) if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO realms VALUES (?, ?, ?)", (realm, epoch, now))
            _policy_changed(db)
        return epoch

    def policy_version(self) -> int:
        """The counter of revocation and epoch changes (one row)."""
        with self._read() as db:
            row = db.execute("SELECT version FROM policy_version WHERE id=1").fetchone()
        return int(row[0]) if row else 0

    def changes(self) -> ChangeFeed:
        """A timer: SQLite tells no one of a change; readers re-read the policy version."""
        return PollingFeed()

    def describe(self) -> StoreInfo:
        """``sqlite``, the file, the schema version it records (SCHEMA_VERSION if it cannot
        be read now)."""
        try:
            with self._read() as db:
                version = _meta(db, "schema")
        except DeviceUnavailable:   # failing, or closed
            version = None
        return StoreInfo("sqlite", str(self.path),
                         int(version) if version and version.isdigit() else SCHEMA_VERSION)

    def record_max_lifetime(self, max_lifetime: int, now: float) -> float:
        """Store this start's maximum lifetime; return the (possibly moved) horizon, in one
        transaction."""
        with self._tx() as db:
            previous = _meta(db, "max_lifetime")
            horizon = float(_meta(db, "lifetime_horizon") or 0)
            if previous is not None and int(previous) > max_lifetime:
                horizon = max(horizon, now + int(previous))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("max_lifetime", str(max_lifetime)),
                            ("lifetime_horizon", repr(horizon))])
        return horizon

    def lifetime_horizon(self) -> float:
        """The stored lifetime horizon (0 if none)."""
        with self._read() as db:
            return float(_meta(db, "lifetime_horizon") or 0)

    def handle_key(self) -> bytes:
        """The consume-handle key; made (32 random octets) in the meta table on first use, in
        one transaction, so concurrent first uses agree."""
        with self._tx() as db:
            value = _meta(db, "handle_key")
            if value is None:
                value = secrets.token_hex(HANDLE_KEY_LEN)
                db.execute("INSERT INTO meta VALUES ('handle_key', ?)", (value,))
        return bytes.fromhex(value)

    def consumed_count(self, now: float) -> int:
        """Return the number of live consumed entries."""
        with self._tx() as db:
            row = db.execute("SELECT COUNT(*) FROM consumed WHERE expires_at>?", (now,)).fetchone()
        return int(row[0])

    def state_owner(self) -> tuple[str, str] | None:
        """The recorded (backend, device) of this state (meta "backend", "device"), or None."""
        with self._read() as db:
            backend, device = _meta(db, "backend"), _meta(db, "device")
        return None if backend is None or device is None else (backend, device)

    def set_state_owner(self, backend: str, device: str) -> None:
        """Record the backend and device of this state, in one transaction."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("backend", backend), ("device", device)])

    # -- wrapped keys, join requests, nodes (issue 15) ---------------------------------------------

    def save_wrapped(self, key_id: bytes, kek_id: str, blob: bytes, check: bytes) -> bool:
        """Store a live key's blob (replacing one only with the same check value), in one
        transaction. Returns whether it was stored. Raises: ValueError, DeviceUnavailable."""
        check_wrapped(blob, check)
        with self._tx() as db:
            row = db.execute("SELECT state FROM keys WHERE key_id=?", (key_id,)).fetchone()
            if row is None or int(row[0]) == KeyState.DESTROYED:
                return False
            return db.execute(
                "INSERT INTO wrapped_keys VALUES (?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE "
                "SET kek_id=excluded.kek_id, wrapped=excluded.wrapped "
                "WHERE check_value=excluded.check_value",
                (key_id, kek_id, blob, check)).rowcount == 1

    def load_wrapped(self, key_ids: Sequence[bytes] | None = None) -> dict[bytes, WrappedKey]:
        """The stored blobs by key id (of ``key_ids``, or all)."""
        with self._read() as db:
            if key_ids is None:
                rows = db.execute(_WRAPPED_SELECT).fetchall()
            else:
                rows = [r for start in range(0, len(key_ids), _CHUNK)
                        for r in _wrapped_among(db, key_ids[start:start + _CHUNK])]
        return {bytes(r[0]): wrapped_key(r) for r in rows}

    def delete_wrapped(self, key_ids: Sequence[bytes]) -> None:
        """Remove the blobs of these keys in one transaction."""
        with self._tx() as db:
            _drop_blobs(db, key_ids)

    def add_join_request(self, fingerprint: str, public_key_der: bytes,
                         oaep_hashes: Sequence[str], node_name: str, now: float) -> bool:
        """Publish a pending request unless its fingerprint is stored or its name is a
        member's, in one transaction. Raises: ValueError, DeviceUnavailable."""
        check_join_request(fingerprint, public_key_der, oaep_hashes, node_name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name=?", (node_name,)).fetchone():
                return False
            return db.execute(
                "INSERT INTO join_requests (fingerprint, public_key, oaep_hashes, node_name, "
                "requested_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
                (fingerprint, public_key_der, ",".join(oaep_hashes), node_name,
                 now)).rowcount == 1

    def list_join_requests(self, now: float) -> list[JoinRequest]:
        """The unexpired requests, oldest first."""
        with self._read() as db:
            rows = db.execute(f"{_JOIN_SELECT} WHERE coalesce(approved_at, requested_at)>? "
                              "ORDER BY requested_at, fingerprint",
                              (expiry_bound(now),)).fetchall()
        return [join_request(r, str(r[2]).split(",")) for r in rows]

    def approve_join(self, fingerprint: str, wrapped_kek: bytes, oaep_hash: str,
                     approver: str, now: float, *, kek_id: str) -> bool:
        """Compare-and-swap on a pending, unexpired request offering ``oaep_hash`` whose name
        is free, with the current KEK, in one transaction (the file's write lock orders every
        membership change). Raises: ValueError, DeviceUnavailable."""
        check_approval(wrapped_kek, approver, kek_id)
        with self._tx() as db:
            row = db.execute("SELECT oaep_hashes, node_name FROM join_requests WHERE "
                             "fingerprint=? AND approved_at IS NULL AND requested_at>?",
                             (fingerprint, expiry_bound(now))).fetchone()
            if row is None or oaep_hash not in str(row[0]).split(","):
                return False
            if _name_taken(db, str(row[1])) or _current_kek(db) != kek_id:
                return False
            db.execute("UPDATE join_requests SET approved_by=?, approved_at=?, wrapped_kek=?, "
                       "oaep_hash=?, kek_id=? WHERE fingerprint=?",
                       (approver, now, wrapped_kek, oaep_hash, kek_id, fingerprint))
        return True

    def take_wrapped_kek(self, fingerprint: str) -> tuple[bytes, str, str] | None:
        """The approved request's wrapped KEK, OAEP hash and KEK id, or None."""
        with self._read() as db:
            row = db.execute("SELECT wrapped_kek, oaep_hash, kek_id FROM join_requests WHERE "
                             "fingerprint=? AND approved_at IS NOT NULL",
                             (fingerprint,)).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]), str(row[2]))

    def complete_join(self, fingerprint: str, now: float) -> NodeRecord | None:
        """Make the approved request's node a member and delete the request, in one
        transaction; None if it is not an approved one."""
        with self._tx() as db:
            row = db.execute("SELECT node_name, approved_by, approved_at, public_key, "
                             "oaep_hashes, kek_id FROM join_requests "
                             "WHERE fingerprint=? AND approved_at IS NOT NULL",
                             (fingerprint,)).fetchone()
            if row is None:
                return None
            node = NodeRecord(str(row[0]), fingerprint, str(row[1]), float(row[2]), now,
                              bytes(row[3]), tuple(_split(row[4])), str(row[5]))
            db.execute("DELETE FROM join_requests WHERE fingerprint=?", (fingerprint,))
            _insert_node(db, node)
        return node

    def purge_join_requests(self, now: float) -> int:
        """Delete the expired requests; return how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM join_requests WHERE "
                              "coalesce(approved_at, requested_at)<=?",
                              (expiry_bound(now),)).rowcount

    def list_nodes(self) -> list[NodeRecord]:
        """The members, oldest join first."""
        with self._read() as db:
            rows = db.execute(f"{_NODE_SELECT} ORDER BY joined_at, name").fetchall()
        return [node_record(r, _split(r[6])) for r in rows]

    def remove_node(self, name: str) -> bool:
        """Drop a member's record (its delivery by the foreign key's cascade); whether there
        was one."""
        with self._tx() as db:
            return db.execute("DELETE FROM nodes WHERE name=?", (name,)).rowcount == 1

    # -- the cluster KEK (issue 15) ----------------------------------------------------------------

    def found_cluster(self, name: str, fingerprint: str, public_key_der: bytes,
                      oaep_hashes: Sequence[str], kek_id: str, now: float) -> NodeRecord | None:
        """The first member and the first KEK, in one transaction; None if the cluster has a
        member or a KEK. Raises: ValueError, DeviceUnavailable."""
        check_founding(fingerprint, public_key_der, oaep_hashes, name, kek_id)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM nodes UNION ALL SELECT 1 FROM cluster_kek").fetchone():
                return None
            node = NodeRecord(name, fingerprint, name, now, now, public_key_der,
                              tuple(oaep_hashes), kek_id)
            _insert_node(db, node)
            db.execute("INSERT INTO cluster_kek VALUES (1, ?, ?)", (kek_id, now))
        return node

    def cluster_kek(self) -> str | None:
        """The current KEK's id, or None."""
        with self._read() as db:
            return _current_kek(db)

    def replace_kek(self, removed: str, maker: str, new_kek_id: str,
                    deliveries: Mapping[str, tuple[bytes, str]], now: float) -> bool:
        """Remove ``removed`` under ``maker``'s new KEK with its deliveries, compare-and-swap
        on the membership, in one transaction (the file's write lock orders it with every
        membership change). Raises: ValueError, DeviceUnavailable."""
        check_deliveries(new_kek_id, deliveries)
        with self._tx() as db:
            members = [str(r[0]) for r in db.execute("SELECT name FROM nodes")]
            if not replacement_allowed(members, _current_kek(db), removed, maker, new_kek_id,
                                       deliveries):
                return False
            db.execute("DELETE FROM nodes WHERE name=?", (removed,))
            db.execute("DELETE FROM kek_deliveries WHERE node_name=?", (maker,))
            db.execute("INSERT OR REPLACE INTO cluster_kek VALUES (1, ?, ?)", (new_kek_id, now))
            db.execute("UPDATE nodes SET kek_id=? WHERE name=?", (new_kek_id, maker))
            db.executemany("INSERT OR REPLACE INTO kek_deliveries VALUES (?, ?, ?, ?, ?)",
                           [(node, new_kek_id, blob, oaep_hash, now)
                            for node, (blob, oaep_hash) in deliveries.items()])
            db.execute(_UNAPPROVE)
        return True

    def kek_delivery(self, node_name: str) -> KekDelivery | None:
        """The delivery waiting for this member, or None."""
        with self._read() as db:
            row = db.execute("SELECT node_name, kek_id, wrapped_kek, oaep_hash, made_at "
                             "FROM kek_deliveries WHERE node_name=?", (node_name,)).fetchone()
        return None if row is None else kek_delivery(row)

    def kek_received(self, node_name: str, kek_id: str) -> bool:
        """Delete the member's delivery of ``kek_id`` and record the KEK as the member's, in
        one transaction; False if there is no such delivery."""
        with self._tx() as db:
            if db.execute("DELETE FROM kek_deliveries WHERE node_name=? AND kek_id=?",
                          (node_name, kek_id)).rowcount != 1:
                return False
            db.execute("UPDATE nodes SET kek_id=? WHERE name=?", (kek_id, node_name))
        return True

    def kek_ids_in_use(self) -> set[str]:
        """Every KEK id a stored row names (one statement)."""
        with self._read() as db:
            return {str(r[0]) for r in db.execute(_KEK_IDS)}

    @property
    def down_since(self) -> float | None:

        """Always None: a local file is never unreachable (a failing call raises instead)."""
        return None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def _policy_changed(db: sqlite3.Connection) -> None:
    """Move the policy version (inside the caller's transaction)."""
    db.execute("UPDATE policy_version SET version=version+1 WHERE id=1")


def _drop_blobs(db: sqlite3.Connection, key_ids: Sequence[bytes]) -> None:
    """Delete the wrapped blobs of these keys (inside the caller's transaction)."""
    db.executemany("DELETE FROM wrapped_keys WHERE key_id=?", [(k,) for k in key_ids])


def _wrapped_among(db: sqlite3.Connection, key_ids: Sequence[bytes]) -> list[Any]:
    """The blob rows of these keys (at most ``_CHUNK`` ids)."""
    marks = ",".join("?" * len(key_ids))
    return db.execute(f"{_WRAPPED_SELECT} WHERE key_id IN ({marks})",
                      list(key_ids)).fetchall()


def _split(hashes: str) -> list[str]:
    """The OAEP hashes as stored (comma-separated; empty for none)."""
    return [h for h in str(hashes).split(",") if h]


def _insert_node(db: sqlite3.Connection, node: NodeRecord) -> None:
    """Store a member (inside the caller's transaction)."""
    db.execute(_NODE_INSERT, (node.name, node.fingerprint, node.approved_by, node.approved_at,
                              node.joined_at, node.public_key, ",".join(node.oaep_hashes),
                              node.kek_id))


def _current_kek(db: sqlite3.Connection) -> str | None:
    """The cluster's current KEK id (None before the first)."""
    row = db.execute("SELECT kek_id FROM cluster_kek WHERE id=1").fetchone()
    return None if row is None else str(row[0])


def _name_taken(db: sqlite3.Connection, name: str) -> bool:
    """Whether a member or an approved request has this node name."""
    return db.execute("SELECT 1 FROM nodes WHERE name=? UNION ALL SELECT 1 FROM join_requests "
                      "WHERE node_name=? AND approved_at IS NOT NULL",
                      (name, name)).fetchone() is not None


def _ring_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT version FROM key_ring WHERE id=1").fetchone()
    return int(row[0]) if row else 0


def _meta(db: sqlite3.Connection, name: str) -> str | None:
    """One value of the meta table (None if unset)."""
    row = db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
    return None if row is None else str(row[0])


class ConsumedIndex:
    """The ids of a consumed set kept in memory by the one process that writes it: a superset
    of the file's ids at every moment (an id is added before its transaction commits and
    removed after its deletion commits), so an id it lacks is not consumed. Thread-safe: the
    store changes it under its lock, and each set operation is atomic."""

    def __init__(self, ids: Iterable[bytes]) -> None:
        self._ids = set(ids)

    def __len__(self) -> int:
        return len(self._ids)

    def among(self, ticket_ids: Sequence[bytes]) -> list[bytes]:
        """The ids of ``ticket_ids`` the index has (only those may be consumed)."""
        ids = self._ids
        return [ticket_id for ticket_id in ticket_ids if ticket_id in ids]

    def add(self, ticket_ids: Iterable[bytes]) -> None:
        """Add ids (before their transaction commits)."""
        self._ids.update(ticket_ids)

    def discard(self, ticket_ids: Iterable[bytes]) -> None:
        """Remove ids whose entries were deleted (after the deletion committed)."""
        self._ids.difference_update(ticket_ids)

