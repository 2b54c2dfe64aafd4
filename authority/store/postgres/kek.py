"""The cluster KEK's rows (issue 15): the current KEK, founded with the first member and replaced
when a member is removed, and the deliveries of a new KEK to the other members. Each change
takes the membership lock (nodes.py), so that a replacement and a join (an approval under the
old KEK, a join's completion) never decide on the same snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import psycopg

from authority.store.base import KekDelivery, NodeRecord
from authority.store.postgres.connection import Pool
from authority.store.postgres.nodes import insert_node, lock_membership
from authority.store.rows import (
    check_deliveries,
    check_founding,
    kek_delivery,
    replacement_allowed,
)

#: every KEK id a stored row names (``kek_ids_in_use``)
_KEK_IDS: Final = (
    "SELECT kek_id FROM cluster_kek UNION SELECT kek_id FROM wrapped_keys "
    "UNION SELECT kek_id FROM kek_deliveries UNION SELECT kek_id FROM join_requests "
    "WHERE kek_id IS NOT NULL UNION SELECT kek_id FROM nodes WHERE kek_id <> ''")
#: the new KEK's deliveries, one per member (replacing an older one)
_DELIVER: Final = (
    "INSERT INTO kek_deliveries (node_name, kek_id, wrapped_kek, oaep_hash, made_at) "
    "SELECT d.node, %(kek_id)s, d.blob, d.hash, %(now)s::float8 "
    "FROM unnest(%(nodes)s::text[], %(blobs)s::bytea[], %(hashes)s::text[]) "
    "AS d(node, blob, hash) ON CONFLICT (node_name) DO UPDATE SET kek_id = EXCLUDED.kek_id, "
    "wrapped_kek = EXCLUDED.wrapped_kek, oaep_hash = EXCLUDED.oaep_hash, "
    "made_at = EXCLUDED.made_at")
#: an approved request not completed back to pending: its wrapped KEK is of a replaced KEK
_UNAPPROVE: Final = (
    "UPDATE join_requests SET approved_by = NULL, approved_at = NULL, wrapped_kek = NULL, "
    "oaep_hash = NULL, kek_id = NULL WHERE approved_at IS NOT NULL")


class KekRows(Pool):
    """The cluster KEK and its deliveries (a part of ``PostgresStore``)."""

    def found_cluster(self, name: str, fingerprint: str, public_key_der: bytes,
                      oaep_hashes: Sequence[str], kek_id: str, now: float) -> NodeRecord | None:
        """The first member and the first KEK (one transaction under the membership lock);
        None if the cluster has a member or a KEK. Raises: ValueError, DeviceUnavailable."""
        check_founding(fingerprint, public_key_der, oaep_hashes, name, kek_id)
        with self._tx() as conn:
            lock_membership(conn)
            if conn.execute("SELECT 1 FROM nodes UNION ALL SELECT 1 FROM cluster_kek "
                            "LIMIT 1").fetchone():
                return None
            node = NodeRecord(name, fingerprint, name, now, now, public_key_der,
                              tuple(oaep_hashes), kek_id)
            insert_node(conn, node)
            conn.execute("INSERT INTO cluster_kek (id, kek_id, since) VALUES (1, %s, %s)",
                         (kek_id, now))
        return node

    def cluster_kek(self) -> str | None:
        """The current KEK's id, or None (one statement)."""
        with self._conn() as conn:
            return _current_kek(conn)

    def replace_kek(self, removed: str, maker: str, new_kek_id: str,
                    deliveries: Mapping[str, tuple[bytes, str]], now: float) -> bool:
        """Remove ``removed`` under ``maker``'s new KEK with its deliveries, compare-and-swap
        on the membership read under the membership lock, in one transaction.
        Raises: ValueError, DeviceUnavailable."""
        check_deliveries(new_kek_id, deliveries)
        with self._tx() as conn:
            lock_membership(conn)
            members = [str(r[0]) for r in conn.execute("SELECT name FROM nodes")]
            if not replacement_allowed(members, _current_kek(conn), removed, maker, new_kek_id,
                                       deliveries):
                return False
            conn.execute("DELETE FROM nodes WHERE name = %s", (removed,))
            conn.execute("DELETE FROM kek_deliveries WHERE node_name = %s", (maker,))
            conn.execute("INSERT INTO cluster_kek (id, kek_id, since) VALUES (1, %s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET kek_id = EXCLUDED.kek_id, "
                         "since = EXCLUDED.since", (new_kek_id, now))
            conn.execute("UPDATE nodes SET kek_id = %s WHERE name = %s", (new_kek_id, maker))
            _deliver(conn, new_kek_id, deliveries, now)
            conn.execute(_UNAPPROVE)
        return True

    def kek_delivery(self, node_name: str) -> KekDelivery | None:
        """The delivery waiting for this member, or None (one statement)."""
        with self._conn() as conn:
            row = conn.execute("SELECT node_name, kek_id, wrapped_kek, oaep_hash, made_at "
                               "FROM kek_deliveries WHERE node_name = %s",
                               (node_name,)).fetchone()
        return None if row is None else kek_delivery(row)

    def kek_received(self, node_name: str, kek_id: str) -> bool:
        """Delete the member's delivery of ``kek_id`` and record the KEK as the member's (one
        transaction under the membership lock); False if there is no such delivery."""
        with self._tx() as conn:
            lock_membership(conn)
            if conn.execute("DELETE FROM kek_deliveries WHERE node_name = %s AND kek_id = %s",
                            (node_name, kek_id)).rowcount != 1:
                return False
            conn.execute("UPDATE nodes SET kek_id = %s WHERE name = %s", (kek_id, node_name))
        return True

    def kek_ids_in_use(self) -> set[str]:
        """Every KEK id a stored row names (one statement)."""
        with self._conn() as conn:
            return {str(r[0]) for r in conn.execute(_KEK_IDS)}


def _current_kek(conn: psycopg.Connection[Any]) -> str | None:
    """The cluster's current KEK id (None before the first)."""
    row = conn.execute("SELECT kek_id FROM cluster_kek WHERE id = 1").fetchone()
    return None if row is None else str(row[0])


def _deliver(conn: psycopg.Connection[Any], kek_id: str,
             deliveries: Mapping[str, tuple[bytes, str]], now: float) -> None:
    """Store the deliveries of KEK ``kek_id`` (inside the caller's transaction)."""
    if not deliveries:
        return
    nodes = list(deliveries)
    conn.execute(_DELIVER, {"kek_id": kek_id, "now": now, "nodes": nodes,
                            "blobs": [deliveries[n][0] for n in nodes],
                            "hashes": [deliveries[n][1] for n in nodes]})
