"""The shared store: one PostgreSQL database that several authority processes (replicas) use at
once, through psycopg 3 and a psycopg_pool connection pool.

Every method is one transaction; most are one statement in autocommit mode, which PostgreSQL
commits before it reports the statement complete: a method that returns has committed (a
consume is acknowledged only after its commit). Whatever fails below (connection refused or
lost, a statement timeout, no free connection in time) is ``DeviceUnavailable`` with a message
that never holds the DSN's password.

The schema is created and migrated by the service: ``MIGRATIONS`` is an ordered list of steps,
each a list of statements; the database records how many it has applied (meta ``schema``). A
start applies the missing ones in one transaction under an advisory lock, so replicas starting
at once do not race; a database migrated by a newer version is refused (an older binary must not
write a schema it does not know). Later steps of the replica work arrive as new migrations: the
audit chain's table (append-only: a trigger refuses UPDATE, DELETE and TRUNCATE); the key
ring's version (the compare-and-swap of every key ring change), the replicas' heartbeats and
the leases; the policy version.

Replicas learn of each other's revocations and epoch bumps through the policy version (a
counter every such change moves in its transaction) and a notification on ``CHANNEL`` sent
with it: each replica keeps one connection of its own LISTENing (``PostgresChangeFeed``), which
also watches whether the database can be reached. When that connection is lost and cannot be
made again, the store is *down*: every call fails at once (``DeviceUnavailable``) instead of
waiting for a pooled connection, until the feed connects again; the pool is then replaced by
a new one (its connections made after the database's return, none left backing off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, LiteralString

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from authority.audit import canonical
from authority.config import PostgresSettings
from authority.errors import DeviceUnavailable, StartupError
from authority.keys import KeyRecord, KeyState
from authority.store.base import (
    Fence,
    LeaseRecord,
    ReplicaRecord,
    RevocationRecord,
    StaleFence,
    StoreInfo,
)

log = logging.getLogger(__name__)

HANDLE_KEY_LEN: Final = 32   # octets of the consume-handle key (meta "handle_key", hex)
_SCHEMA_LOCK: Final = 0x7469636B_65747301  # advisory lock key: schema migrations
_META_LOCK: Final = 0x7469636B_65747302    # advisory lock key: read-modify-write of meta rows
_MIGRATION_TIMEOUT: Final = "300s"          # statement timeout while migrating
_SECRET_KEYS: Final = ("password", "sslpassword")
_HIDDEN: Final = "********"
_ANYWHERE: Final = 6   # secrets this long are hidden wherever they appear in a message
#: the channel of policy change notifications (payload: "revocation N", "epoch N", "purge N",
#: N the new policy version)
CHANNEL: Final = "ticket_authority_policy"
#: seconds between two attempts to connect the change feed again while the database is away
RECONNECT_DELAY: Final = 0.5
#: seconds of one wait for a notification (a closed feed is noticed within one)
_SLICE: Final = 0.5
#: application_name of the change feed's connection (pg_stat_activity shows it)
FEED_APPLICATION: Final = "ticket-authority change feed"
#: TCP keepalive of every connection (ignored on a Unix socket): probes after this many idle
#: seconds, every second, 3 unanswered ones end it -- a database cut off by the network is
#: noticed in about 8 s instead of the kernel's 2 hours
_KEEPALIVE: Final = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1,
                     "keepalives_count": 3}

#: The schema, as the ordered steps that build it; step N takes a database from version N-1 to
#: N. Never edit a released step: append one.
MIGRATIONS: Final[tuple[tuple[LiteralString, ...], ...]] = (
    (   # 1: key ring, consumed set, revocations, realm epochs (as SQLite's schema 2)
        """CREATE TABLE keys (
            key_id bytea PRIMARY KEY,
            state smallint NOT NULL,
            created_at double precision NOT NULL,
            seal_count bigint NOT NULL,
            sealing_ended_at double precision,
            opens_until double precision,
            destroyed_at double precision)""",
        """CREATE TABLE consumed (
            ticket_id bytea PRIMARY KEY,
            expires_at double precision NOT NULL)""",
        "CREATE INDEX consumed_expires_at ON consumed (expires_at)",
        """CREATE TABLE revocations (
            revocation_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind text NOT NULL,
            value bytea NOT NULL,
            issued_before double precision NOT NULL,
            created_at double precision NOT NULL,
            expires_at double precision NOT NULL,
            reason text NOT NULL)""",
        "CREATE INDEX revocations_expires_at ON revocations (expires_at)",
        """CREATE TABLE realms (
            realm text PRIMARY KEY,
            epoch bigint NOT NULL,
            bumped_at double precision NOT NULL)""",
    ),
    (   # the audit chain of every replica (authority/audit_pg.py), append-only
        """CREATE TABLE audit (
            seq bigint PRIMARY KEY CHECK (seq > 0),
            time text NOT NULL,
            actor text NOT NULL,
            action text NOT NULL,
            details json NOT NULL,
            prev text NOT NULL,
            hash text NOT NULL)""",
        """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'the audit table is append-only'; END $$""",
        "CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit "
        "FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
        "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
    ),
    (   # 3: the key ring's version, replicas' heartbeats, leases (SQLite's schema 3)
        """CREATE TABLE key_ring (
            id smallint PRIMARY KEY CHECK (id = 1),
            version bigint NOT NULL)""",
        "INSERT INTO key_ring (id, version) VALUES (1, 0)",
        """CREATE TABLE replicas (
            replica_id text PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at double precision NOT NULL,
            heartbeat_at double precision NOT NULL,
            ring_version bigint NOT NULL,
            loaded bytea[] NOT NULL)""",
        """CREATE TABLE leases (
            name text PRIMARY KEY,
            holder text NOT NULL,
            epoch bigint NOT NULL,
            expires_at double precision NOT NULL)""",
    ),
    (   # 4: the policy version: moved by every revocation, purge of revocations, epoch bump
        """CREATE TABLE policy_version (
            id smallint PRIMARY KEY CHECK (id = 1),
            version bigint NOT NULL)""",
        "INSERT INTO policy_version (id, version) VALUES (1, 0)",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

AUDIT_SELECT: Final = ("SELECT seq, time, actor, action, details::text, prev, hash "
                       "FROM audit")   # the columns ``audit_entry`` reads, in its order
_KEY_SELECT: Final = ("SELECT key_id, state, created_at, seal_count, sealing_ended_at, "
                      "opens_until, destroyed_at FROM keys ORDER BY created_at, key_id")
_KEY_UPSERT: Final = (
    "INSERT INTO keys (key_id, state, created_at, seal_count, sealing_ended_at, opens_until, "
    "destroyed_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (key_id) DO UPDATE SET state = EXCLUDED.state, "
    "created_at = EXCLUDED.created_at, "
    "seal_count = GREATEST(keys.seal_count, EXCLUDED.seal_count), "
    "sealing_ended_at = EXCLUDED.sealing_ended_at, opens_until = EXCLUDED.opens_until, "
    "destroyed_at = EXCLUDED.destroyed_at")


class PostgresStore:
    """Store backed by a PostgreSQL database shared by every replica. Thread-safe (a pool)."""

    def __init__(self, settings: PostgresSettings,
                 migrations: Sequence[Sequence[LiteralString]] = MIGRATIONS) -> None:
        """Connect, create or migrate the schema, and open the pool.

        Raises: StartupError (an unparsable DSN, the database unreachable or refusing us, a
        schema newer than ``migrations`` knows, a failed migration), naming the database by
        its host, port, database and user only.
        """
        self._dsn = settings.dsn.reveal()
        self.target = describe_dsn(self._dsn)
        self._timeout_ms = max(1, math.ceil(settings.statement_timeout * 1000))
        self._pool_size = settings.pool_size
        self.connect_timeout = settings.connect_timeout
        connect_timeout = max(1, math.ceil(settings.connect_timeout))
        user_timeout = math.ceil((settings.statement_timeout + settings.connect_timeout) * 1000)
        #: what every connection is opened with (the pool's and the change feeds')
        self.connect_kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": connect_timeout, **_KEEPALIVE,
            "tcp_user_timeout": user_timeout}
        self._state_lock = threading.Lock()   # the pool's replacement, the down mark
        self._down_since: float | None = None  # monotonic time the feed found it unreachable
        try:
            with psycopg.connect(self._dsn, **self.connect_kwargs) as conn:
                self.schema_version = migrate(conn, migrations, self.target)
        except psycopg.Error as exc:
            raise StartupError(f"state store {self.target}: {self.scrub(str(exc))}") from None
        try:
            self._pool = self._open_pool()
        except psycopg.Error as exc:
            raise StartupError(f"state store {self.target}: {self.scrub(str(exc))}") from None

    def _open_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """A new pool, open with its first connection made.

        Raises: psycopg.Error (PoolTimeout: no connection within ``connect_timeout``).
        """
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._dsn, kwargs=self.connect_kwargs, min_size=1, max_size=self._pool_size,
            open=False, configure=self._configure, check=_check_connection,
            name="state-store", timeout=self.connect_timeout)
        try:
            pool.open(wait=True, timeout=self.connect_timeout)
        except psycopg.Error:
            pool.close()
            raise
        return pool

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new pool connection: the statement timeout, and a plan made for each execution
        of a prepared statement (``plan_cache_mode``): a generic plan cached while the consumed
        table was small or never analysed scans all of it for every lookup later (measured:
        28 ms instead of 0.3 ms for 100 ids among 30 000 entries)."""
        conn.execute("SELECT set_config('statement_timeout', %s, false), "
                     "set_config('plan_cache_mode', 'force_custom_plan', false)",
                     (f"{self._timeout_ms}ms",))

    def scrub(self, text: str) -> str:
        """``text`` without the DSN or any password it holds (for errors and logs)."""
        return scrub_secrets(text, self._dsn)

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (autocommit: each statement commits when it completes).

        Raises: DeviceUnavailable if the database fails, is unreachable or no connection is
        free within ``connect_timeout`` (its message without secrets); at once while the store
        is down (``mark_down``).
        """
        down = self._down_since
        if down is not None:
            raise DeviceUnavailable(f"state store unreachable: {self.target} has not answered "
                                    f"for {time.monotonic() - down:.1f} s; reconnecting")
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise DeviceUnavailable(f"state store failed: {self.scrub(str(exc))}") from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside one transaction, committed when the body ends (rolled
        back if it raises). Raises: DeviceUnavailable, as ``_conn``."""
        with self._conn() as conn, conn.transaction():
            yield conn

    # -- key ring ----------------------------------------------------------------------------

    def load_keys(self) -> list[KeyRecord]:
        """Return every key record, oldest first."""
        with self._conn() as conn:
            rows = conn.execute(_KEY_SELECT).fetchall()
        return [_key(r) for r in rows]

    def save_keys(self, records: list[KeyRecord]) -> None:
        """Insert or replace the records in one transaction; a stored seal count is never
        lowered (other processes' reservations stay counted)."""
        if not records:
            return
        with self._tx() as conn, conn.cursor() as cursor:
            cursor.executemany(_KEY_UPSERT, _key_rows(records))

    def delete_keys(self, key_ids: Sequence[bytes]) -> None:
        """Remove the records of these keys (one statement)."""
        if not key_ids:
            return
        with self._conn() as conn:
            conn.execute("DELETE FROM keys WHERE key_id = ANY(%s::bytea[])", (list(key_ids),))

    def reserve_seals(self, key_id: bytes, block: int, limit: int) -> tuple[int, int] | None:
        """Reserve up to ``block`` seals of an ACTIVE key, never past ``limit``, atomically
        across every process on this database (one statement; the row lock orders concurrent
        reservations). Returns (first, end): seal numbers first..end-1 are the caller's; None
        if the key is unknown, not ACTIVE or its budget is spent."""
        with self._conn() as conn:
            row = conn.execute(
                "UPDATE keys AS k SET seal_count = LEAST(old.seal_count + %(block)s, %(limit)s) "
                "FROM (SELECT key_id, seal_count FROM keys WHERE key_id = %(key)s "
                "AND state = %(active)s AND seal_count < %(limit)s FOR UPDATE) AS old "
                "WHERE k.key_id = old.key_id RETURNING old.seal_count, k.seal_count",
                {"key": key_id, "block": block, "limit": limit,
                 "active": int(KeyState.ACTIVE)}).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def load_ring(self) -> tuple[int, list[KeyRecord]]:
        """The key ring's version and every key record, oldest first, in one snapshot (a
        REPEATABLE READ transaction)."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            version = _ring_version(conn)
            rows = conn.execute(_KEY_SELECT).fetchall()
        return version, [_key(r) for r in rows]

    def ring_version(self) -> int:
        """The key ring's version (one statement)."""
        with self._conn() as conn:
            return _ring_version(conn)

    def commit_ring(self, version: int, save: Sequence[KeyRecord],
                    delete: Sequence[bytes] = (), fence: Fence | None = None) -> int | None:
        """Compare-and-swap on the key ring in one transaction: the version row's update (its
        row lock orders concurrent commits; a loser finds the version moved), the fence checked
        under a share lock on the lease row (a takeover waits for this commit, or this commit
        sees its new epoch). Returns the new version, None if it had moved.
        Raises: StaleFence."""
        with self._tx() as conn:
            if fence is not None:
                row = conn.execute("SELECT holder, epoch FROM leases WHERE name = %s FOR SHARE",
                                   (fence.name,)).fetchone()
                if row is None or (str(row[0]), int(row[1])) != (fence.holder, fence.epoch):
                    raise StaleFence(f"lease {fence.name!r} epoch {fence.epoch} is no longer "
                                     "held: another replica took it over; nothing written")
            moved = conn.execute("UPDATE key_ring SET version = version + 1 "
                                 "WHERE id = 1 AND version = %s RETURNING version",
                                 (version,)).fetchone()
            if moved is None:
                return None
            if save:
                with conn.cursor() as cursor:
                    cursor.executemany(_KEY_UPSERT, _key_rows(save))
            if delete:
                conn.execute("DELETE FROM keys WHERE key_id = ANY(%s::bytea[])", (list(delete),))
        return int(moved[0])

    # -- leases and replicas -----------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, now: float,
                      duration: float) -> int | None:
        """Take or renew a lease in one statement (an insert, or an update of a row held by
        ``holder`` or expired; the row lock orders concurrent takers). Returns its epoch, None
        if another holds it unexpired."""
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO leases AS l (name, holder, epoch, expires_at) "
                "VALUES (%(name)s, %(holder)s, 1, %(until)s) "
                "ON CONFLICT (name) DO UPDATE SET "
                "epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch ELSE l.epoch + 1 END, "
                "holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at "
                "WHERE l.holder = EXCLUDED.holder OR l.expires_at <= %(now)s::float8 "
                "RETURNING epoch",
                {"name": name, "holder": holder, "until": now + duration,
                 "now": now}).fetchone()
        return None if row is None else int(row[0])

    def release_lease(self, name: str, holder: str) -> None:
        """Let the lease expire now if ``holder`` holds it (one statement)."""
        with self._conn() as conn:
            conn.execute("UPDATE leases SET expires_at = 0 WHERE name = %s AND holder = %s",
                         (name, holder))

    def load_lease(self, name: str) -> LeaseRecord | None:
        """The stored lease, or None."""
        with self._conn() as conn:
            row = conn.execute("SELECT name, holder, epoch, expires_at FROM leases "
                               "WHERE name = %s", (name,)).fetchone()
        return None if row is None else LeaseRecord(str(row[0]), str(row[1]), int(row[2]),
                                                     float(row[3]))

    def heartbeat(self, replica: ReplicaRecord) -> None:
        """Insert or replace the replica's record (one statement)."""
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO replicas (replica_id, host, pid, started_at, heartbeat_at, "
                "ring_version, loaded) VALUES (%s, %s, %s, %s, %s, %s, %s::bytea[]) "
                "ON CONFLICT (replica_id) DO UPDATE SET host = EXCLUDED.host, "
                "pid = EXCLUDED.pid, started_at = EXCLUDED.started_at, "
                "heartbeat_at = EXCLUDED.heartbeat_at, ring_version = EXCLUDED.ring_version, "
                "loaded = EXCLUDED.loaded",
                (replica.replica_id, replica.host, replica.pid, replica.started_at,
                 replica.heartbeat_at, replica.ring_version, sorted(replica.loaded)))

    def load_replicas(self) -> list[ReplicaRecord]:
        """Every replica record, oldest start first."""
        with self._conn() as conn:
            rows = conn.execute("SELECT replica_id, host, pid, started_at, heartbeat_at, "
                                "ring_version, loaded FROM replicas "
                                "ORDER BY started_at, replica_id").fetchall()
        return [ReplicaRecord(str(r[0]), str(r[1]), int(r[2]), float(r[3]), float(r[4]),
                              int(r[5]), frozenset(bytes(k) for k in r[6])) for r in rows]

    def remove_replica(self, replica_id: str) -> None:
        """Drop a replica's record."""
        with self._conn() as conn:
            conn.execute("DELETE FROM replicas WHERE replica_id = %s", (replica_id,))

    def purge_replicas(self, before: float) -> int:
        """Drop records of replicas silent since before ``before``; return how many."""
        with self._conn() as conn:
            return conn.execute("DELETE FROM replicas WHERE heartbeat_at < %s::float8",
                                (before,)).rowcount

    # -- consumed set ------------------------------------------------------------------------

    def consume_many(self, entries: Sequence[tuple[bytes, int]], now: float) -> list[bool]:
        """Mark tickets used until they expire: one INSERT ... ON CONFLICT ... RETURNING for
        the whole batch, answering per item; an expired leftover entry is replaced (and counts
        as new). Returns when committed."""
        if not entries:
            return []
        ids = [ticket_id for ticket_id, _ in entries]
        with self._conn() as conn:
            rows = conn.execute(
                "INSERT INTO consumed (ticket_id, expires_at) "
                "SELECT DISTINCT ON (id) id, exp "
                "FROM unnest(%s::bytea[], %s::float8[]) WITH ORDINALITY AS t(id, exp, n) "
                "ORDER BY id, n "
                "ON CONFLICT (ticket_id) DO UPDATE SET expires_at = EXCLUDED.expires_at "
                "WHERE consumed.expires_at <= %s::float8 "
                "RETURNING ticket_id",
                (ids, [float(expires_at) for _, expires_at in entries], now)).fetchall()
        new = {bytes(r[0]) for r in rows}
        fresh: list[bool] = []
        for ticket_id in ids:   # a repeated id: only its first occurrence is new
            fresh.append(ticket_id in new)
            new.discard(ticket_id)
        return fresh

    def consumed_among(self, ticket_ids: Sequence[bytes], now: float) -> set[bytes]:
        """Return the ids that have a live consumed entry (one statement)."""
        if not ticket_ids:
            return set()
        with self._conn() as conn:
            rows = conn.execute("SELECT ticket_id FROM consumed WHERE ticket_id = "
                                "ANY(%s::bytea[]) AND expires_at > %s::float8",
                                (list(ticket_ids), now)).fetchall()
        return {bytes(r[0]) for r in rows}

    def purge_expired(self, now: float) -> int:
        """Delete the entries of expired tickets in bulk (one range delete on the expires_at
        index); return how many."""
        with self._conn() as conn:
            return conn.execute("DELETE FROM consumed WHERE expires_at <= %s::float8",
                                (now,)).rowcount

    def consumed_count(self, now: float) -> int:
        """Return the number of live consumed entries."""
        with self._conn() as conn:
            row = conn.execute("SELECT count(*) FROM consumed WHERE expires_at > %s::float8",
                               (now,)).fetchone()
        return int(row[0]) if row else 0

    # -- revocations and realm epochs --------------------------------------------------------

    def add_revocation(self, record: RevocationRecord) -> RevocationRecord:
        """Store a revocation; returns it with its new id. The policy version moves and the
        replicas are notified, in the same transaction (a notification is delivered only if
        it commits)."""
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO revocations (kind, value, issued_before, created_at, expires_at, "
                "reason) VALUES (%s, %s, %s, %s, %s, %s) RETURNING revocation_id",
                (record.kind, record.value, record.issued_before, record.created_at,
                 record.expires_at, record.reason)).fetchone()
            _policy_changed(conn, "revocation")
        assert row is not None
        return RevocationRecord(int(row[0]), record.kind, record.value, record.issued_before,
                                record.created_at, record.expires_at, record.reason)

    def load_revocations(self, now: float) -> list[RevocationRecord]:
        """Return the live revocations, oldest first."""
        with self._conn() as conn:
            rows = conn.execute("SELECT revocation_id, kind, value, issued_before, created_at, "
                                "expires_at, reason FROM revocations WHERE expires_at > "
                                "%s::float8 ORDER BY revocation_id", (now,)).fetchall()
        return [RevocationRecord(int(r[0]), r[1], bytes(r[2]), *r[3:]) for r in rows]

    def purge_revocations(self, now: float) -> int:
        """Delete revocations whose covered tickets have all expired; return the count."""
        with self._tx() as conn:
            purged = conn.execute("DELETE FROM revocations WHERE expires_at <= %s::float8",
                                  (now,)).rowcount
            if purged:
                _policy_changed(conn, "purge")
        return purged

    def load_epochs(self) -> dict[str, int]:
        """Return every realm whose policy epoch was bumped, with its epoch."""
        with self._conn() as conn:
            rows = conn.execute("SELECT realm, epoch FROM realms").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def bump_epoch(self, realm: str, now: float) -> int:
        """Increment a realm's policy epoch (from 0 if never bumped), move the policy version
        and notify the replicas, in one transaction."""
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO realms (realm, epoch, bumped_at) VALUES (%s, 1, %s) "
                "ON CONFLICT (realm) DO UPDATE SET epoch = realms.epoch + 1, "
                "bumped_at = EXCLUDED.bumped_at RETURNING epoch", (realm, now)).fetchone()
            _policy_changed(conn, "epoch")
        assert row is not None
        return int(row[0])

    def policy_version(self) -> int:
        """The counter of revocation and epoch changes (one row)."""
        with self._conn() as conn:
            row = conn.execute("SELECT version FROM policy_version WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    # -- reachability: the change feed ---------------------------------------------------------

    def changes(self) -> PostgresChangeFeed:
        """A new LISTEN connection's feed (connected at its first ``wait``)."""
        return PostgresChangeFeed(self)

    def connect(self, application_name: str) -> psycopg.Connection[Any]:
        """A new connection of its own (not pooled), as the pool's are made, named
        ``application_name`` (pg_stat_activity). Raises: psycopg.Error."""
        return psycopg.connect(self._dsn, application_name=application_name,
                               **self.connect_kwargs)

    @property
    def down_since(self) -> float | None:
        """Since when (``time.monotonic``) the store is down; None while it is not."""
        return self._down_since

    def mark_down(self, reason: str) -> None:
        """The database cannot be reached (a change feed lost its connection and could not
        make one again): from now on every call fails at once until ``restore``. Never
        raises."""
        with self._state_lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.error("state store %s unreachable, calls fail until it answers again: %s",
                  self.target, self.scrub(reason))

    def restore(self) -> None:
        """The database answers again (a change feed connected after losing its connection):
        replace the pool by a new one, whose connections are made now (the old one's may be
        broken, and its own reconnection backs off up to minutes), then let calls through.

        Raises: DeviceUnavailable (no connection within ``connect_timeout``: still down).
        """
        try:
            pool = self._open_pool()
        except psycopg.Error as exc:
            raise DeviceUnavailable(f"state store failed: {self.scrub(str(exc))}") from None
        with self._state_lock:
            old, self._pool = self._pool, pool
            was_down, self._down_since = self._down_since, None
        threading.Thread(target=old.close, kwargs={"timeout": self.connect_timeout},
                         name="state-store-old-pool", daemon=True).start()
        if was_down is not None:
            log.warning("state store %s answers again after %.1f s", self.target,
                        time.monotonic() - was_down)

    def describe(self) -> StoreInfo:
        """``postgresql``, the database (no password), the schema version its meta table
        records (the one migrated to at open if it cannot be read now)."""
        try:
            with self._conn() as conn:
                stored = _meta(conn, "schema")
        except DeviceUnavailable:
            stored = None
        version = int(stored) if stored and stored.isdigit() else self.schema_version
        return StoreInfo("postgresql", self.target.removeprefix("postgresql "), version)

    # -- meta --------------------------------------------------------------------------------

    def record_max_lifetime(self, max_lifetime: int, now: float) -> float:
        """Store this start's maximum lifetime; return the (possibly moved) horizon, in one
        transaction serialised against other processes' (an advisory lock)."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_META_LOCK,))
            previous = _meta(conn, "max_lifetime")
            horizon = float(_meta(conn, "lifetime_horizon") or 0)
            if previous is not None and int(previous) > max_lifetime:
                horizon = max(horizon, now + int(previous))
            _set_meta(conn, {"max_lifetime": str(max_lifetime),
                             "lifetime_horizon": repr(horizon)})
        return horizon

    def lifetime_horizon(self) -> float:
        """The stored lifetime horizon (0 if none)."""
        with self._conn() as conn:
            return float(_meta(conn, "lifetime_horizon") or 0)

    def handle_key(self) -> bytes:
        """The consume-handle key: the first process to ask makes it (insert if absent), every
        process reads the one stored."""
        with self._conn() as conn:
            conn.execute("INSERT INTO meta (name, value) VALUES ('handle_key', %s) "
                         "ON CONFLICT (name) DO NOTHING", (secrets.token_hex(HANDLE_KEY_LEN),))
            value = _meta(conn, "handle_key")   # a new statement: sees whichever insert won
        assert value is not None
        return bytes.fromhex(value)

    def state_owner(self) -> tuple[str, str] | None:
        """The recorded (backend, device) of this state (meta "backend", "device"), or None."""
        with self._conn() as conn:
            rows = dict(conn.execute("SELECT name, value FROM meta WHERE name IN "
                                     "('backend', 'device')").fetchall())
        backend, device = rows.get("backend"), rows.get("device")
        return None if backend is None or device is None else (str(backend), str(device))

    def set_state_owner(self, backend: str, device: str) -> None:
        """Record the backend and device of this state, in one statement."""
        with self._conn() as conn:
            _set_meta(conn, {"backend": backend, "device": device})

    # -- audit chain (authority/audit_pg.py) -------------------------------------------------

    def append_audit(self, make: Callable[[dict[str, Any] | None], dict[str, Any]]
                     ) -> dict[str, Any]:
        """Append one entry to the audit table in one transaction holding the table's
        EXCLUSIVE lock (appends of every replica queue, reads go on): ``make(head)`` gets the
        last entry (None: none yet) and returns the next, inserted and committed before this
        returns it. The lock is taken before the head is read, so two replicas appending at
        once write seq n and n+1, never two entries after one head (seq is the key, too).

        Raises: DeviceUnavailable (nothing inserted; if the connection is lost during the
        commit, the entry may be there), whatever ``make`` raises (nothing inserted).
        """
        with self._tx() as conn:
            conn.execute("LOCK TABLE audit IN EXCLUSIVE MODE")
            entry = make(audit_entry(conn.execute(
                AUDIT_SELECT + " ORDER BY seq DESC LIMIT 1").fetchone()))
            conn.execute("INSERT INTO audit (seq, time, actor, action, details, prev, hash) "
                         "VALUES (%s, %s, %s, %s, %s::json, %s, %s)",
                         (entry["seq"], entry["time"], entry["actor"], entry["action"],
                          canonical(entry["details"]).decode(), entry["prev"], entry["hash"]))
        return entry

    def audit_head(self) -> dict[str, Any] | None:
        """The audit table's last entry (None if it has none)."""
        with self._conn() as conn:
            return audit_entry(conn.execute(
                AUDIT_SELECT + " ORDER BY seq DESC LIMIT 1").fetchone())

    def close(self) -> None:
        """Close the pool's connections. Never raises."""
        self._pool.close(timeout=5.0)


class PostgresChangeFeed:
    """One replica's LISTEN connection on ``CHANNEL`` (a ``ChangeFeed``), and its watch on
    the database: used by one thread at a time.

    A lost connection is made again at once; if that fails in a way that says the database
    cannot be reached (no answer, shutting down, starting up), the store is marked down
    (``PostgresStore.mark_down``: its calls fail at once) and the feed tries again every
    ``RECONNECT_DELAY`` seconds; once connected after a loss, the store's pool is replaced
    (``restore``) and calls go through again. A refusal that is not about reaching it (a
    password, too many connections) is logged and retried the same way, without marking the
    store down: its pooled connections may still work.
    """

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._conn: psycopg.Connection[Any] | None = None
        self._lost = False           # a connection was lost: restore the store once back
        self._closed = threading.Event()
        self._waiting = False        # a ``wait`` is in progress (it owns the connection)

    def wait(self, timeout: float) -> None:
        """Return at the first notification, after ``timeout`` seconds, or (not connected)
        once an attempt to connect succeeded or failed (then after ``RECONNECT_DELAY``).
        Never raises."""
        self._waiting = True
        try:
            self._wait(timeout)
        finally:
            self._waiting = False
            if self._closed.is_set():
                self._drop()

    def _wait(self, timeout: float) -> None:
        if self._closed.is_set():
            return
        if self._conn is None:
            if not self._connect():
                self._closed.wait(min(timeout, RECONNECT_DELAY))
            return
        try:
            self._listen(self._conn, timeout)
        except psycopg.Error as exc:
            log.warning("state store change feed lost its connection: %s",
                        self._store.scrub(str(exc)))
            self._drop()
            self._lost = True
            if not self._connect():   # at once: a session ended alone comes back at once
                self._closed.wait(min(timeout, RECONNECT_DELAY))

    def _listen(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        """Wait for a notification up to ``timeout`` seconds, in slices of ``_SLICE`` (a
        ``close`` from another thread is seen within one). Raises: psycopg.Error."""
        deadline = time.monotonic() + timeout
        while not self._closed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            received = conn.notifies(timeout=min(remaining, _SLICE), stop_after=1)
            try:
                for _ in received:
                    return
            finally:
                received.close()

    def _connect(self) -> bool:
        """Connect and LISTEN; after a loss, restore the store. Returns whether connected.
        Never raises."""
        if self._closed.is_set():
            return False
        try:
            conn = self._store.connect(FEED_APPLICATION)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            reason = str(exc)
            if _unreachable(exc):
                self._store.mark_down(reason)
            else:
                log.error("state store change feed cannot connect: %s",
                          self._store.scrub(reason))
            return False
        self._conn = conn
        if self._lost or self._store.down_since is not None:
            try:
                self._store.restore()
            except DeviceUnavailable as exc:
                self._store.mark_down(exc.message)
                self._drop()
                return False
            self._lost = False
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """End the feed and close its connection (a ``wait`` in progress in another thread
        returns within ``_SLICE`` seconds and closes it). Never raises."""
        self._closed.set()
        if not self._waiting:
            self._drop()


def _unreachable(exc: psycopg.Error) -> bool:
    """Whether a failure to connect says the database cannot be reached: no answer at all
    (no SQLSTATE), a connection exception (class 08) or an operator intervention (class 57:
    shutting down, starting up, crashed)."""
    state = exc.sqlstate
    return state is None or state[:2] in ("08", "57")


def _check_connection(conn: psycopg.Connection[Any]) -> None:
    """Before the pool hands a connection out: one that has something to read while idle (a
    server that ended it sent its last message and closed: a restart, a terminated session)
    is tested with a round trip and dropped if it fails; a quiet one costs one ``select``.
    Raises: psycopg.Error (the pool discards the connection and takes another)."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        ConnectionPool.check_connection(conn)


def _policy_changed(conn: psycopg.Connection[Any], what: str) -> None:
    """Move the policy version and notify ``CHANNEL`` (delivered when the caller's
    transaction commits)."""
    row = conn.execute("UPDATE policy_version SET version = version + 1 WHERE id = 1 "
                       "RETURNING version").fetchone()
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{what} {row[0] if row else '?'}"))


def migrate(conn: psycopg.Connection[Any],
            migrations: Sequence[Sequence[LiteralString]] = MIGRATIONS,
            target: str = "the database") -> int:
    """Bring the database's schema to ``len(migrations)``: the missing steps, in order, in one
    transaction under an advisory lock (a replica starting at the same time waits, then finds
    the work done). Returns the version.

    Raises: StartupError if the database has a newer schema than ``migrations`` (or an
    unreadable version); psycopg.Error if a statement fails (nothing is applied).
    """
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (_MIGRATION_TIMEOUT,))
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS meta (name text PRIMARY KEY, "
                     "value text NOT NULL)")
        stored = _meta(conn, "schema") or "0"
        if not stored.isdigit():
            raise StartupError(f"state store: schema version {stored!r} of {target} is not "
                               "a number")
        version, known = int(stored), len(migrations)
        if version > known:
            raise StartupError(
                f"state store: schema {version} is newer than this version reads ({known}): "
                f"upgrade ike-ticket-authority on this host ({target} was migrated by a newer "
                "release)")
        for step in migrations[version:]:
            for statement in step:
                conn.execute(statement)
        if version < known:
            _set_meta(conn, {"schema": str(known)})
            log.info("state store: schema migrated from %d to %d", version, known)
    return known


def audit_entry(row: Sequence[Any] | None) -> dict[str, Any] | None:
    """An audit entry (authority/audit.py's members) from a row of ``AUDIT_SELECT``; None for
    None. Raises: ValueError if its details are not JSON (the column type forbids it)."""
    if row is None:
        return None
    seq, stamp, actor, action, details, prev, digest = row
    return {"seq": int(seq), "time": stamp, "actor": actor, "action": action,
            "details": json.loads(details), "prev": prev, "hash": digest}


def _ring_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT version FROM key_ring WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def _key(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(bytes(row[0]), KeyState(row[1]), *row[2:])


def _key_rows(records: Sequence[KeyRecord]) -> list[tuple[Any, ...]]:
    return [(r.key_id, int(r.state), r.created_at, r.seal_count, r.sealing_ended_at,
             r.opens_until, r.destroyed_at) for r in records]


def _meta(conn: psycopg.Connection[Any], name: str) -> str | None:
    """One value of the meta table (None if unset)."""
    row = conn.execute("SELECT value FROM meta WHERE name = %s", (name,)).fetchone()
    return None if row is None else str(row[0])


def _set_meta(conn: psycopg.Connection[Any], values: dict[str, str]) -> None:
    """Insert or replace meta rows (one statement)."""
    conn.execute("INSERT INTO meta (name, value) SELECT * FROM unnest(%s::text[], %s::text[]) "
                 "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                 (list(values), list(values.values())))


def describe_dsn(dsn: str) -> str:
    """What names the database in messages: ``postgresql host=... port=... dbname=...
    user=...`` (never the password or other options).

    Raises: StartupError if ``dsn`` is not a connection string (without repeating it: a
    malformed one may hold a password).
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise StartupError("state store postgresql: the DSN is not a libpq connection string "
                           "or postgresql:// URI") from None
    shown = [f"{k}={params[k]}" for k in ("host", "port", "dbname", "user") if params.get(k)]
    return " ".join(["postgresql", *shown])


def scrub_secrets(text: str, dsn: str) -> str:
    """``text`` with the DSN, its password(s) and anything shaped ``password=...`` or
    ``//user:password@`` replaced by ``********``. Never raises."""
    hidden = [dsn]
    with contextlib.suppress(psycopg.Error):
        params = conninfo_to_dict(dsn)
        hidden += [str(params[k]) for k in _SECRET_KEYS if params.get(k)]
    hidden += re.findall(r"//[^/@:\s]*:([^@\s]+)@", dsn)   # a URI's password as written
    for secret in sorted({s for s in hidden if s}, key=len, reverse=True):
        if len(secret) >= _ANYWHERE:
            text = text.replace(secret, _HIDDEN)
        else:   # a short one only as a word of its own: "y" must not garble "directory"
            text = re.sub(rf"(?<![\w.-]){re.escape(secret)}(?![\w.-])", _HIDDEN, text)
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\1{_HIDDEN}", text,
                  flags=re.IGNORECASE)
    return re.sub(r"(//[^/@:\s]*:)[^@\s]+@", rf"\1{_HIDDEN}@", text)
