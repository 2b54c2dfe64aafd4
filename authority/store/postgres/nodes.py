"""Per-node tokens' rows (issue 15): ticket keys wrapped under the cluster KEK (each bound to its
key's record, deleted with it), join requests and the member nodes. Membership changes take an
advisory lock, so that two of them (two approvals of one node name, an approval and a join's
completion) never decide on the same snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg

from authority.keys import KeyState
from authority.store.base import JoinRequest, NodeRecord, WrappedKey
from authority.store.postgres.connection import Pool
from authority.store.rows import (
    check_approval,
    check_join_request,
    check_wrapped,
    expiry_bound,
    join_request,
    node_record,
    wrapped_key,
)

_MEMBERSHIP_LOCK: Final = 0x7469636B_65747303   # advisory lock key: join requests and nodes
_WRAPPED_SELECT: Final = "SELECT key_id, kek_id, wrapped, check_value FROM wrapped_keys"
_JOIN_SELECT: Final = ("SELECT fingerprint, public_key, oaep_hashes, node_name, requested_at, "
                       "approved_by, approved_at, wrapped_kek, oaep_hash, kek_id "
                       "FROM join_requests")
#: a live key's blob, inserted under a share lock on its record (a commit destroying it waits,
#: or this insert sees it DESTROYED and inserts nothing); replaced only with its check value
_WRAPPED_UPSERT: Final = (
    "INSERT INTO wrapped_keys AS w (key_id, kek_id, wrapped, check_value) "
    "SELECT key_id, %(kek)s, %(blob)s, %(check)s FROM keys "
    "WHERE key_id = %(key)s AND state <> %(destroyed)s FOR SHARE "
    "ON CONFLICT (key_id) DO UPDATE SET kek_id = EXCLUDED.kek_id, wrapped = EXCLUDED.wrapped "
    "WHERE w.check_value = EXCLUDED.check_value RETURNING w.key_id")
_APPROVE: Final = (
    "UPDATE join_requests AS r SET approved_by = %(by)s, approved_at = %(now)s::float8, "
    "wrapped_kek = %(kek)s, oaep_hash = %(hash)s, kek_id = %(kek_id)s "
    "WHERE fingerprint = %(fp)s AND approved_at IS NULL AND requested_at > %(bound)s::float8 "
    "AND %(hash)s = ANY(oaep_hashes) "
    "AND %(kek_id)s = (SELECT kek_id FROM cluster_kek WHERE id = 1) "
    "AND NOT EXISTS (SELECT 1 FROM nodes WHERE name = r.node_name) "
    "AND NOT EXISTS (SELECT 1 FROM join_requests AS o WHERE o.node_name = r.node_name "
    "AND o.approved_at IS NOT NULL) RETURNING fingerprint")


class NodeRows(Pool):
    """Wrapped keys, join requests and nodes (a part of ``PostgresStore``)."""

    # -- wrapped keys ------------------------------------------------------------------------------

    def save_wrapped(self, key_id: bytes, kek_id: str, blob: bytes, check: bytes) -> bool:
        """Store a live key's blob (replacing one only with the same check value), in one
        statement. Returns whether it was stored. Raises: ValueError, DeviceUnavailable."""
        check_wrapped(blob, check)
        with self._conn() as conn:
            row = conn.execute(_WRAPPED_UPSERT, {
                "key": key_id, "kek": kek_id, "blob": blob, "check": check,
                "destroyed": int(KeyState.DESTROYED)}).fetchone()
        return row is not None

    def load_wrapped(self, key_ids: Sequence[bytes] | None = None) -> dict[bytes, WrappedKey]:
        """The stored blobs by key id (of ``key_ids``, or all), one statement."""
        with self._conn() as conn:
            if key_ids is None:
                rows = conn.execute(_WRAPPED_SELECT).fetchall()
            else:
                rows = conn.execute(_WRAPPED_SELECT + " WHERE key_id = ANY(%s::bytea[])",
                                    (list(key_ids),)).fetchall()
        return {bytes(r[0]): wrapped_key(r) for r in rows}

    def delete_wrapped(self, key_ids: Sequence[bytes]) -> None:
        """Remove the blobs of these keys (one statement)."""
        if not key_ids:
            return
        with self._conn() as conn:
            conn.execute("DELETE FROM wrapped_keys WHERE key_id = ANY(%s::bytea[])",
                         (list(key_ids),))

    # -- join requests and nodes -------------------------------------------------------------------

    def add_join_request(self, fingerprint: str, public_key_der: bytes,
                         oaep_hashes: Sequence[str], node_name: str, now: float) -> bool:
        """Publish a pending request unless its fingerprint is stored or its name is a
        member's (one transaction under the membership lock). Raises: ValueError,
        DeviceUnavailable."""
        check_join_request(fingerprint, public_key_der, oaep_hashes, node_name)
        with self._tx() as conn:
            lock_membership(conn)
            row = conn.execute(
                "INSERT INTO join_requests (fingerprint, public_key, oaep_hashes, node_name, "
                "requested_at) SELECT %(fp)s, %(der)s, %(hashes)s::text[], %(name)s, "
                "%(now)s::float8 WHERE NOT EXISTS (SELECT 1 FROM nodes WHERE name = %(name)s) "
                "ON CONFLICT (fingerprint) DO NOTHING RETURNING fingerprint",
                {"fp": fingerprint, "der": public_key_der, "hashes": list(oaep_hashes),
                 "name": node_name, "now": now}).fetchone()
        return row is not None

    def list_join_requests(self, now: float) -> list[JoinRequest]:
        """The unexpired requests, oldest first (one statement)."""
        with self._conn() as conn:
            rows = conn.execute(_JOIN_SELECT + " WHERE coalesce(approved_at, requested_at) > "
                                "%s::float8 ORDER BY requested_at, fingerprint",
                                (expiry_bound(now),)).fetchall()
        return [join_request(r, r[2]) for r in rows]

    def approve_join(self, fingerprint: str, wrapped_kek: bytes, oaep_hash: str,
                     approver: str, now: float, *, kek_id: str) -> bool:
        """Compare-and-swap on a pending, unexpired request offering ``oaep_hash`` whose name
        is free, with the current KEK (one update under the membership lock, which orders it
        after any other membership change or KEK replacement). Raises: ValueError,
        DeviceUnavailable."""
        check_approval(wrapped_kek, approver, kek_id)
        with self._tx() as conn:
            lock_membership(conn)
            row = conn.execute(_APPROVE, {
                "by": approver, "now": now, "kek": wrapped_kek, "hash": oaep_hash,
                "kek_id": kek_id, "fp": fingerprint, "bound": expiry_bound(now)}).fetchone()
        return row is not None

    def take_wrapped_kek(self, fingerprint: str) -> tuple[bytes, str, str] | None:
        """The approved request's wrapped KEK, OAEP hash and KEK id, or None."""
        with self._conn() as conn:
            row = conn.execute("SELECT wrapped_kek, oaep_hash, kek_id FROM join_requests "
                               "WHERE fingerprint = %s AND approved_at IS NOT NULL",
                               (fingerprint,)).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]), str(row[2]))

    def complete_join(self, fingerprint: str, now: float) -> NodeRecord | None:
        """Make the approved request's node a member and delete the request (one transaction
        under the membership lock); None if it is not an approved one."""
        with self._tx() as conn:
            lock_membership(conn)
            row = conn.execute("DELETE FROM join_requests WHERE fingerprint = %s "
                               "AND approved_at IS NOT NULL RETURNING node_name, approved_by, "
                               "approved_at, public_key, oaep_hashes, kek_id",
                               (fingerprint,)).fetchone()
            if row is None:
                return None
            node = NodeRecord(str(row[0]), fingerprint, str(row[1]), float(row[2]), now,
                              bytes(row[3]), tuple(row[4]), str(row[5]))
            insert_node(conn, node)
        return node

    def purge_join_requests(self, now: float) -> int:
        """Delete the expired requests (one statement); return how many."""
        with self._conn() as conn:
            return conn.execute("DELETE FROM join_requests WHERE "
                                "coalesce(approved_at, requested_at) <= %s::float8",
                                (expiry_bound(now),)).rowcount

    def list_nodes(self) -> list[NodeRecord]:
        """The members, oldest join first."""
        with self._conn() as conn:
            rows = conn.execute("SELECT name, fingerprint, approved_by, approved_at, joined_at, "
                                "public_key, oaep_hashes, kek_id FROM nodes "
                                "ORDER BY joined_at, name").fetchall()
        return [node_record(r, r[6]) for r in rows]

    def remove_node(self, name: str) -> bool:
        """Drop a member's record (its delivery by the foreign key's cascade; under the
        membership lock); whether there was one."""
        with self._tx() as conn:
            lock_membership(conn)
            return conn.execute("DELETE FROM nodes WHERE name = %s", (name,)).rowcount == 1


def lock_membership(conn: psycopg.Connection[Any]) -> None:
    """Take the membership lock until the transaction ends (one membership change or KEK
    replacement at a time, each deciding on what the previous one committed)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MEMBERSHIP_LOCK,))


def insert_node(conn: psycopg.Connection[Any], node: NodeRecord) -> None:
    """Store a member (inside the caller's transaction)."""
    conn.execute("INSERT INTO nodes (name, fingerprint, approved_by, approved_at, joined_at, "
                 "public_key, oaep_hashes, kek_id) VALUES (%s, %s, %s, %s, %s, %s, %s::text[], "
                 "%s)", (node.name, node.fingerprint, node.approved_by, node.approved_at,
                         node.joined_at, node.public_key, list(node.oaep_hashes), node.kek_id))
