"""The store checks, read-only: the state store is reachable, its schema is the one this
release reads, there is disk left; and what the clock, replica and lease checks need from it
(the store's clock, the replicas' heartbeats, the maintenance lease, the key ring, the
recorded owner).

Neither store has a read-only open (both create or migrate the schema when opened), so the
doctor reads the same tables through a read-only connection of its own: SQLite's file opened
``mode=ro``, a PostgreSQL session with ``read_only`` set. Rows become records through the
stores' own builders (authority/store/rows.py).
"""

from __future__ import annotations

import math
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from authority.cluster import MAINTENANCE
from authority.config import Config, PostgresSettings
from authority.doctor.report import Check, failure, ok, warning
from authority.keys import KeyState
from authority.store.base import LeaseRecord, ReplicaRecord
from authority.store.rows import lease_record, replica_record

#: free space (bytes) on the state directory's file system below which doctor warns / fails
DISK_WARN: Final = 512 << 20
DISK_FAIL: Final = 64 << 20
#: key states whose keys the device must hold
_LIVE: Final = (KeyState.ACTIVE, KeyState.DECRYPT_ONLY, KeyState.PENDING)
_REPLICAS: Final = ("SELECT replica_id, host, pid, started_at, heartbeat_at, ring_version "
                    "FROM replicas ORDER BY started_at, replica_id")


@dataclass
class StoreFacts:
    """What the store checks read (None: could not be read)."""

    checks: list[Check] = field(default_factory=list)
    kind: str = ""
    store_now: float | None = None          # PostgreSQL's clock, Unix seconds
    local_at: float | None = None           # this host's clock when it was read
    owner: tuple[str, str] | None = None    # the recorded (backend, device)
    ring: set[bytes] | None = None          # ids of the live keys of the key ring
    replicas: list[ReplicaRecord] | None = None
    lease: LeaseRecord | None = None


class _Reader:
    """The few reads doctor makes, on one read-only connection (``?`` or ``%s`` markers)."""

    def __init__(self, conn: Any, mark: str) -> None:
        self._conn = conn
        self._mark = mark

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(self._conn.execute(sql.replace("?", self._mark), tuple(args)).fetchall())

    def meta(self, name: str) -> str | None:
        found = self.rows("SELECT value FROM meta WHERE name = ?", (name,))
        return None if not found else str(found[0][0])


def check_store(config: Config, wall: Callable[[], float]) -> StoreFacts:
    """Reach the store read-only and read what the other checks need; ``wall`` is this
    host's clock. Never raises: each problem is a failed check."""
    facts = StoreFacts()
    if config.postgresql is None:
        _sqlite(config.state_dir / "authority.db", facts)
    else:
        _postgres(config.postgresql, facts, wall)
    facts.checks.append(_disk(config.state_dir))
    return facts


def _sqlite(path: Path, facts: StoreFacts) -> None:
    from authority.store.sqlite import SCHEMA_VERSION

    facts.kind = "sqlite"
    if not path.is_file():
        facts.checks.append(warning("store.reachable", f"{path} does not exist yet",
                                    "serve creates it at its first start"))
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        facts.checks.append(failure("store.reachable", f"cannot open {path}: {exc}",
                                    "check the state directory's permissions and disk"))
        return
    try:
        _read(_Reader(conn, "?"), f"sqlite {path}", SCHEMA_VERSION, facts)
    except sqlite3.Error as exc:
        facts.checks.append(failure("store.schema", f"cannot read {path}: {exc}",
                                    "restore the state from a backup (docs/operations.md)"))
    finally:
        conn.close()


def _postgres(settings: PostgresSettings, facts: StoreFacts, wall: Callable[[], float]) -> None:
    import psycopg

    from authority.store.postgres.dsn import describe_dsn, scrub_secrets
    from authority.store.postgres.schema import SCHEMA_VERSION

    facts.kind = "postgresql"
    dsn = settings.dsn.reveal()
    target = describe_dsn(dsn)
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, math.ceil(settings.connect_timeout))
                             ) as conn:
            conn.read_only = True   # BEGIN READ ONLY: nothing can be written
            before = wall()
            found = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8, "
                                 "to_regclass('meta') IS NOT NULL").fetchone()
            assert found is not None
            facts.local_at = (before + wall()) / 2
            facts.store_now = float(found[0])
            if not found[1]:
                facts.checks.append(ok("store.reachable", f"{target} reachable"))
                facts.checks.append(warning("store.schema", f"{target} has no schema yet",
                                            "serve creates it at its first start"))
                return
            _read(_Reader(conn, "%s"), target, SCHEMA_VERSION, facts)
    except psycopg.Error as exc:
        facts.checks.append(failure(
            "store.reachable", f"{target}: {scrub_secrets(str(exc), dsn).strip()}",
            "check that PostgreSQL runs and accepts this host, and postgresql.dsn (host, port, "
            "dbname, user, password in dsn_file or ~/.pgpass)"))


def _read(reader: _Reader, target: str, known: int, facts: StoreFacts) -> None:
    """Schema version, owner, key ring, replicas and lease. Raises: the driver's errors."""
    facts.checks.append(ok("store.reachable", f"{target} reachable"))
    stored = reader.meta("schema")
    facts.checks.append(_schema(target, stored, known))
    backend, device = reader.meta("backend"), reader.meta("device")
    facts.owner = None if backend is None or device is None else (backend, device)
    facts.ring = {bytes(r[0]) for r in reader.rows("SELECT key_id, state FROM keys")
                  if r[1] in _LIVE}
    facts.replicas = [replica_record(r, ()) for r in reader.rows(_REPLICAS)]
    lease = reader.rows("SELECT name, holder, epoch, expires_at FROM leases WHERE name = ?",
                        (MAINTENANCE,))
    facts.lease = lease_record(lease[0]) if lease else None


def _schema(target: str, stored: str | None, known: int) -> Check:
    if stored is None or not stored.isdigit():
        return failure("store.schema", f"{target} records no schema version ({stored!r})",
                       "restore the state from a backup (docs/operations.md)")
    version = int(stored)
    if version > known:
        return failure("store.schema", f"{target} has schema {version}, newer than this "
                                       f"release reads ({known})",
                       "upgrade ike-ticket-authority on this host (a newer release migrated "
                       "the store)")
    if version < known:
        return warning("store.schema", f"{target} has schema {version}; this release "
                                       f"migrates it to {known} at start",
                       "back the store up before the upgrade's first start (doctor never "
                       "migrates)")
    return ok("store.schema", f"schema {version} (this release's)")


def _disk(state_dir: Path) -> Check:
    """Free space where the state directory is (the SQLite file, the audit log, the token)."""
    probe = state_dir if state_dir.exists() else state_dir.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return failure("store.disk", f"cannot stat {probe}: {exc.strerror}",
                       "create the state directory, or set state_dir")
    free = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB at {probe}"
    if usage.free < DISK_FAIL:
        return failure("store.disk", free, "free disk space: a full disk fails every consume "
                                           "and audit write")
    if usage.free < DISK_WARN:
        return warning("store.disk", free, "free disk space before it runs out (consumed "
                                           "tickets and the audit log grow with traffic)")
    return ok("store.disk", free)
