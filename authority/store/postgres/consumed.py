"""The consumed set: one INSERT ... ON CONFLICT ... RETURNING per batch, answering per item;
bulk purge on the expires_at index.
"""

from __future__ import annotations

from collections.abc import Sequence

from authority.store.postgres.connection import Pool


class ConsumedRows(Pool):
    """The consumed set (a part of ``PostgresStore``)."""

    # -- consumed set ------------------------------------------------------------------------------

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
