"""Revocations and realm epochs: every change moves the policy version and notifies ``CHANNEL``
in its transaction (the replicas' change feeds wake up).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from authority.store.base import RevocationRecord
from authority.store.postgres.connection import Pool
from authority.store.postgres.feed import CHANNEL
from authority.store.rows import revocation_record


class PolicyRows(Pool):
    """Revocations, realm epochs, the policy version (a part of ``PostgresStore``)."""

    # -- revocations and realm epochs --------------------------------------------------------------

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
        return dataclasses.replace(record, revocation_id=int(row[0]))

    def load_revocations(self, now: float) -> list[RevocationRecord]:
        """Return the live revocations, oldest first."""
        with self._conn() as conn:
            rows = conn.execute("SELECT revocation_id, kind, value, issued_before, created_at, "
                                "expires_at, reason FROM revocations WHERE expires_at > "
                                "%s::float8 ORDER BY revocation_id", (now,)).fetchall()
        return [revocation_record(r) for r in rows]

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


def _policy_changed(conn: psycopg.Connection[Any], what: str) -> None:
    """Move the policy version and notify ``CHANNEL`` (delivered when the caller's
    transaction commits)."""
    row = conn.execute("UPDATE policy_version SET version = version + 1 WHERE id = 1 "
                       "RETURNING version").fetchone()
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{what} {row[0] if row else '?'}"))

