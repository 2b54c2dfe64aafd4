"""The schema, created and migrated by the service: ``MIGRATIONS`` (ordered steps, never edited
once released), ``migrate`` (the missing steps in one transaction under an advisory lock), and
the meta table's rows (``read_meta``, ``write_meta``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, LiteralString

import psycopg

from authority.errors import StartupError

log = logging.getLogger("authority.store.postgres")

_SCHEMA_LOCK: Final = 0x7469636B_65747301  # advisory lock key: schema migrations
_MIGRATION_TIMEOUT: Final = "300s"          # statement timeout while migrating

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
    (   # 5: per-node tokens (SQLite's schema 4): ticket keys wrapped under the cluster KEK,
        # deleted with their key (the cascade; DESTROYED ones by the ring's commit); join
        # requests (a wrapped KEK only once approved); the member nodes
        """CREATE TABLE wrapped_keys (
            key_id bytea PRIMARY KEY REFERENCES keys (key_id) ON DELETE CASCADE,
            kek_id text NOT NULL,
            wrapped bytea NOT NULL CHECK (octet_length(wrapped) = 40),
            check_value bytea NOT NULL CHECK (octet_length(check_value) BETWEEN 1 AND 32))""",
        """CREATE TABLE join_requests (
            fingerprint text PRIMARY KEY,
            public_key bytea NOT NULL,
            oaep_hashes text[] NOT NULL,
            node_name text NOT NULL,
            requested_at double precision NOT NULL,
            approved_by text,
            approved_at double precision,
            wrapped_kek bytea,
            oaep_hash text,
            CHECK ((approved_at IS NULL) = (approved_by IS NULL)
                   AND (approved_at IS NULL) = (wrapped_kek IS NULL)
                   AND (approved_at IS NULL) = (oaep_hash IS NULL)))""",
        "CREATE UNIQUE INDEX join_requests_approved_name ON join_requests (node_name) "
        "WHERE approved_at IS NOT NULL",
        """CREATE TABLE nodes (
            name text PRIMARY KEY,
            fingerprint text NOT NULL UNIQUE,
            approved_by text NOT NULL,
            approved_at double precision NOT NULL,
            joined_at double precision NOT NULL)""",
    ),
    (   # 6: KEK replacement (SQLite's schema 5): the cluster's current KEK; a new KEK waiting
        # for each member, wrapped to its persistent transport key (deleted with the member);
        # the members' transport keys and the KEK each last received; an approval's KEK id (an
        # approval of before had none: back to pending, to be approved again)
        "UPDATE join_requests SET approved_by = NULL, approved_at = NULL, wrapped_kek = NULL, "
        "oaep_hash = NULL WHERE approved_at IS NOT NULL",
        "ALTER TABLE join_requests ADD COLUMN kek_id text, ADD CONSTRAINT join_requests_kek_id "
        "CHECK ((approved_at IS NULL) = (kek_id IS NULL))",
        "ALTER TABLE nodes ADD COLUMN public_key bytea NOT NULL DEFAULT ''::bytea, "
        "ADD COLUMN oaep_hashes text[] NOT NULL DEFAULT '{}', "
        "ADD COLUMN kek_id text NOT NULL DEFAULT ''",
        """CREATE TABLE cluster_kek (
            id smallint PRIMARY KEY CHECK (id = 1),
            kek_id text NOT NULL CHECK (kek_id <> ''),
            since double precision NOT NULL)""",
        """CREATE TABLE kek_deliveries (
            node_name text PRIMARY KEY REFERENCES nodes (name) ON DELETE CASCADE,
            kek_id text NOT NULL CHECK (kek_id <> ''),
            wrapped_kek bytea NOT NULL CHECK (octet_length(wrapped_kek) > 0),
            oaep_hash text NOT NULL CHECK (oaep_hash <> ''),
            made_at double precision NOT NULL)""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


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
        stored = read_meta(conn, "schema") or "0"
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
            write_meta(conn, {"schema": str(known)})
            log.info("state store: schema migrated from %d to %d", version, known)
    return known


def read_meta(conn: psycopg.Connection[Any], name: str) -> str | None:
    """One value of the meta table (None if unset)."""
    row = conn.execute("SELECT value FROM meta WHERE name = %s", (name,)).fetchone()
    return None if row is None else str(row[0])


def write_meta(conn: psycopg.Connection[Any], values: dict[str, str]) -> None:
    """Insert or replace meta rows (one statement)."""
    conn.execute("INSERT INTO meta (name, value) SELECT * FROM unnest(%s::text[], %s::text[]) "
                 "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                 (list(values), list(values.values())))

