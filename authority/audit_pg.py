"""The audit chain of replicas sharing a PostgreSQL database: one chain for the whole cluster,
kept in the database's ``audit`` table (authority/store/postgres/, an append-only table).

Each row is one entry of authority/audit.py's format: the columns seq, time, actor, action,
details (JSON), prev and hash are its members, and the entry rendered as the file's canonical
line is what the hash covers; so ``verify_lines`` checks the table as it checks a file, and a
table exported in seq order as canonical lines is a valid audit log file.

One chain, not one per replica: an append locks the table (EXCLUSIVE: other appends wait,
readers do not), reads the last entry, inserts the next and commits, so two replicas appending
at once write seq n and n+1, linked, never two entries after one head (seq is also the key).
One chain orders every admin and key event of the cluster (a rotation on A, then a retirement
on B) and is checked by one command; per-replica chains would need merging by time, and a
replica's chain ends with the replica, unnoticed.

No local file besides: the database is where the cluster's state changes are committed, so it
is where their record belongs; a copy in each replica's file would hold only that replica's
entries (gaps: not verifiable on its own) or need a chain of its own, and writing two places
cannot be one step, so fail-closed would have to pick one anyway. What stays on the host is
the log line (INFO) naming each entry's seq and hash: an anchor outside the database against
a rewrite of the whole table by someone holding its owner's rights (docs/threat-model.md).

Fail-closed as the file: an entry that cannot be committed (database down, statement timeout,
the table locked) refuses the action with UNAVAILABLE, and callers record before they change
anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import psycopg

from authority.audit import (
    GENESIS,
    AuditUnavailable,
    DamagedHead,
    VerifyResult,
    canonical,
    head_of,
    new_entry,
    verify_lines,
)
from authority.config import PostgresSettings
from authority.errors import DeviceUnavailable, StartupError
from authority.store.postgres import AUDIT_SELECT, audit_entry, describe_dsn, scrub_secrets

log = logging.getLogger(__name__)

VERIFY_HINT = "run 'ticket-authority audit verify --config FILE'"


@runtime_checkable
class AuditTable(Protocol):
    """What keeps the table: authority/store/postgres/store.py's PostgresStore."""

    target: str   # names the database in messages, without secrets

    def append_audit(self, make: Callable[[dict[str, Any] | None], dict[str, Any]]
                     ) -> dict[str, Any]:
        """Append ``make(last entry)`` under the table's lock; return it once committed.
        Raises: DeviceUnavailable, whatever ``make`` raises."""
        ...

    def audit_head(self) -> dict[str, Any] | None:
        """The last entry (None: none). Raises: DeviceUnavailable."""
        ...


def _link(head: dict[str, Any] | None) -> tuple[int, str]:
    """(seq, hash) of the chain's last entry, checked as a link on its own; (0, GENESIS) for
    none. Raises: DamagedHead."""
    if head is None:
        return 0, GENESIS
    try:
        return head_of(canonical(head) + b"\n")
    except ValueError as exc:
        raise DamagedHead(str(exc), head["seq"]) from None


class PostgresAuditLog:
    """The ``AuditSink`` of a replica on PostgreSQL; thread-safe (the store's pool) and
    fail-closed."""

    def __init__(self, store: AuditTable, now: Callable[[], float] | None = None) -> None:
        """Check the chain's last entry in the database.

        Raises: StartupError (the database cannot be read, or its last entry is damaged).
        """
        self._store = store
        self._now = now or (lambda: datetime.now(UTC).timestamp())
        self._closed = False
        try:
            head = store.audit_head()
            _, self._prev = _link(head)
        except DeviceUnavailable as exc:
            raise StartupError(f"audit: cannot read the audit chain of {store.target}: "
                               f"{exc}") from None
        except DamagedHead as exc:
            raise StartupError(f"audit: the last entry (seq {exc.seq}) of the audit chain in "
                               f"{store.target} is damaged ({exc.reason}); {VERIFY_HINT}"
                               ) from None

    def record(self, actor: str, action: str, details: Mapping[str, Any]) -> None:
        """Append the entry after the database's head and commit it.

        Raises: AuditUnavailable if it cannot be committed or the last entry is damaged (the
        caller's action must not take effect).
        """
        if self._closed:
            raise AuditUnavailable("audit log closed: action refused")

        def make(head: dict[str, Any] | None) -> dict[str, Any]:
            seq, prev = _link(head)
            return new_entry(seq + 1, prev, self._now(), actor, action, details)

        try:
            entry = self._store.append_audit(make)
        except DeviceUnavailable as exc:
            log.error("audit entry not written (%s): refusing %s by %s", exc, action, actor)
            raise AuditUnavailable(
                f"audit log cannot be written ({exc}): action refused") from None
        except DamagedHead as exc:
            log.error("audit chain: the last entry is damaged (%s): refusing %s by %s", exc,
                      action, actor)
            raise AuditUnavailable(f"audit log cannot be written (its last entry is damaged: "
                                   f"{exc}; {VERIFY_HINT}): action refused") from None
        self._prev = entry["hash"]
        log.info("audit: seq %d %s by %s, hash %s", entry["seq"], action, actor, entry["hash"])

    @property
    def last_hash(self) -> str:
        """The hash of the last entry this replica wrote or read (the head then)."""
        return self._prev

    def close(self) -> None:
        """Later ``record`` calls raise AuditUnavailable (the store is closed by its owner).
        Never raises."""
        self._closed = True


def verify_database(settings: PostgresSettings) -> VerifyResult:
    """Check the whole audit chain in the database of ``settings``, in seq order, in one
    read-only snapshot (replicas may append meanwhile); ``first_bad_line`` is the stored seq
    of the first bad entry. Reads only: never creates or migrates anything.

    Raises: DeviceUnavailable (cannot connect or read, or no audit table: no authority has
    started on this database), its message without the DSN's secrets.
    """
    dsn = settings.dsn.reveal()
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, math.ceil(settings.connect_timeout))
                             ) as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            found = conn.execute("SELECT to_regclass('audit')").fetchone()
            if found is None or found[0] is None:
                raise DeviceUnavailable("no audit table (no authority has started on this "
                                        "database)")
            with conn.cursor(name="audit_verify") as cursor:
                cursor.itersize = 1000
                cursor.execute(AUDIT_SELECT + " ORDER BY seq")
                return verify_lines(_lines(cursor))
    except psycopg.Error as exc:
        raise DeviceUnavailable(scrub_secrets(str(exc), dsn)) from None


def _lines(rows: Iterable[Any]) -> Iterator[tuple[int, bytes]]:
    """(seq, the entry as its canonical line) for each row of ``AUDIT_SELECT``."""
    for row in rows:
        entry = audit_entry(row)
        assert entry is not None
        yield entry["seq"], canonical(entry) + b"\n"


def describe(settings: PostgresSettings) -> str:
    """What names the database in messages (no secrets). Raises: StartupError (no DSN)."""
    return describe_dsn(settings.dsn.reveal())
