"""The meta rows every replica shares: the lifetime horizon, the consume-handle key, the
state's owner; and what ``describe`` reports.
"""

from __future__ import annotations

import secrets
from typing import Final

from authority.errors import DeviceUnavailable
from authority.store.base import StoreInfo
from authority.store.postgres.connection import Pool
from authority.store.postgres.schema import read_meta, write_meta

HANDLE_KEY_LEN: Final = 32   # octets of the consume-handle key (meta "handle_key", hex)
_META_LOCK: Final = 0x7469636B_65747302    # advisory lock key: read-modify-write of meta rows


class MetaRows(Pool):
    """Meta rows and the store's description (a part of ``PostgresStore``)."""

    # -- meta --------------------------------------------------------------------------------------

    def describe(self) -> StoreInfo:
        """``postgresql``, the database (no password), the schema version its meta table
        records (the one migrated to at open if it cannot be read now)."""
        try:
            with self._conn() as conn:
                stored = read_meta(conn, "schema")
        except DeviceUnavailable:
            stored = None
        version = int(stored) if stored and stored.isdigit() else self.schema_version
        return StoreInfo("postgresql", self.target.removeprefix("postgresql "), version)

    def record_max_lifetime(self, max_lifetime: int, now: float) -> float:
        """Store this start's maximum lifetime; return the (possibly moved) horizon, in one
        transaction serialised against other processes' (an advisory lock)."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_META_LOCK,))
            previous = read_meta(conn, "max_lifetime")
            horizon = float(read_meta(conn, "lifetime_horizon") or 0)
            if previous is not None and int(previous) > max_lifetime:
                horizon = max(horizon, now + int(previous))
            write_meta(conn, {"max_lifetime": str(max_lifetime),
                             "lifetime_horizon": repr(horizon)})
        return horizon

    def lifetime_horizon(self) -> float:
        """The stored lifetime horizon (0 if none)."""
        with self._conn() as conn:
            return float(read_meta(conn, "lifetime_horizon") or 0)

    def handle_key(self) -> bytes:
        """The consume-handle key: the first process to ask makes it (insert if absent), every
        process reads the one stored."""
        with self._conn() as conn:
            conn.execute("INSERT INTO meta (name, value) VALUES ('handle_key', %s) "
                         "ON CONFLICT (name) DO NOTHING", (secrets.token_hex(HANDLE_KEY_LEN),))
            value = read_meta(conn, "handle_key")   # a new statement: sees whichever insert won
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
            write_meta(conn, {"backend": backend, "device": device})
