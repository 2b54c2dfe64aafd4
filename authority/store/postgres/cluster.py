"""The replicas' rows: their heartbeats and the leases (the maintenance lease and its fencing
epoch).
"""

from __future__ import annotations

from authority.store.base import LeaseRecord, ReplicaRecord
from authority.store.postgres.connection import Pool
from authority.store.rows import lease_record, replica_record


class ClusterRows(Pool):
    """Leases and replica records (a part of ``PostgresStore``)."""

    # -- leases and replicas -----------------------------------------------------------------------

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
        return None if row is None else lease_record(row)

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
        return [replica_record(r, (bytes(k) for k in r[6])) for r in rows]

    def remove_replica(self, replica_id: str) -> None:
        """Drop a replica's record."""
        with self._conn() as conn:
            conn.execute("DELETE FROM replicas WHERE replica_id = %s", (replica_id,))

    def purge_replicas(self, before: float) -> int:
        """Drop records of replicas silent since before ``before``; return how many."""
        with self._conn() as conn:
            return conn.execute("DELETE FROM replicas WHERE heartbeat_at < %s::float8",
                                (before,)).rowcount
