"""The cluster's audit chain (authority/audit_pg.py) in the append-only ``audit`` table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Final

from authority.audit import canonical
from authority.store.postgres.connection import Pool

AUDIT_SELECT: Final = ("SELECT seq, time, actor, action, details::text, prev, hash "
                       "FROM audit")   # the columns ``audit_entry`` reads, in its order


class AuditRows(Pool):
    """The audit table (a part of ``PostgresStore``)."""

    # -- audit chain (authority/audit_pg.py) -------------------------------------------------------

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


def audit_entry(row: Sequence[Any] | None) -> dict[str, Any] | None:
    """An audit entry (authority/audit.py's members) from a row of ``AUDIT_SELECT``; None for
    None. Raises: ValueError if its details are not JSON (the column type forbids it)."""
    if row is None:
        return None
    seq, stamp, actor, action, details, prev, digest = row
    return {"seq": int(seq), "time": stamp, "actor": actor, "action": action,
            "details": json.loads(details), "prev": prev, "hash": digest}

