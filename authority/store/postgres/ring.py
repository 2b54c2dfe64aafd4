"""The key ring's rows: key records (a stored seal count never lowered), seal reservations,
and the compare-and-swap commit on the ring's version (fenced by the maintenance lease).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg

from authority.keys import KeyRecord, KeyState
from authority.store.base import Fence
from authority.store.postgres.connection import Pool
from authority.store.rows import check_fence, destroyed_ids, key_record, key_rows

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


class RingRows(Pool):
    """Key records and the key ring's version (a part of ``PostgresStore``)."""

    # -- key ring ----------------------------------------------------------------------------------

    def load_keys(self) -> list[KeyRecord]:
        """Return every key record, oldest first."""
        with self._conn() as conn:
            rows = conn.execute(_KEY_SELECT).fetchall()
        return [key_record(r) for r in rows]

    def save_keys(self, records: list[KeyRecord]) -> None:
        """Insert or replace the records in one transaction; a stored seal count is never
        lowered (other processes' reservations stay counted); the blobs of records saved
        DESTROYED go in it."""
        if not records:
            return
        with self._tx() as conn:
            with conn.cursor() as cursor:
                cursor.executemany(_KEY_UPSERT, key_rows(records))
            _drop_blobs(conn, destroyed_ids(records))

    def delete_keys(self, key_ids: Sequence[bytes]) -> None:
        """Remove the records of these keys (one statement; their blobs by the foreign key's
        cascade)."""
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
        return version, [key_record(r) for r in rows]

    def ring_version(self) -> int:
        """The key ring's version (one statement)."""
        with self._conn() as conn:
            return _ring_version(conn)

    def commit_ring(self, version: int, save: Sequence[KeyRecord],
                    delete: Sequence[bytes] = (), fence: Fence | None = None) -> int | None:
        """Compare-and-swap on the key ring in one transaction: the version row's update (its
        row lock orders concurrent commits; a loser finds the version moved), the fence checked
        under a share lock on the lease row (a takeover waits for this commit, or this commit
        sees its new epoch); the blobs of keys saved DESTROYED (here) or deleted (the foreign
        key's cascade) go in it. Returns the new version, None if it had moved.
        Raises: StaleFence."""
        with self._tx() as conn:
            if fence is not None:
                check_fence(fence, conn.execute("SELECT holder, epoch FROM leases "
                                                "WHERE name = %s FOR SHARE",
                                                (fence.name,)).fetchone())
            moved = conn.execute("UPDATE key_ring SET version = version + 1 "
                                 "WHERE id = 1 AND version = %s RETURNING version",
                                 (version,)).fetchone()
            if moved is None:
                return None
            if save:
                with conn.cursor() as cursor:
                    cursor.executemany(_KEY_UPSERT, key_rows(save))
                _drop_blobs(conn, destroyed_ids(save))
            if delete:
                conn.execute("DELETE FROM keys WHERE key_id = ANY(%s::bytea[])", (list(delete),))
        return int(moved[0])


def _drop_blobs(conn: psycopg.Connection[Any], key_ids: Sequence[bytes]) -> None:
    """Delete the wrapped blobs of these keys (inside the caller's transaction)."""
    if key_ids:
        conn.execute("DELETE FROM wrapped_keys WHERE key_id = ANY(%s::bytea[])", (list(key_ids),))


def _ring_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT version FROM key_ring WHERE id = 1").fetchone()
    return int(row[0]) if row else 0
