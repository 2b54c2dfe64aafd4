"""A ``PostgresStore``'s connections: the pool (each connection configured and checked before
use), the one-transaction-per-method context managers, the change feeds' own connections, and
the down mark an unreachable database sets (calls fail at once until the pool is replaced).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, LiteralString, Self

import psycopg
from psycopg_pool import ConnectionPool

from authority.config import PostgresSettings
from authority.errors import DeviceUnavailable, StartupError
from authority.store.postgres.dsn import describe_dsn, scrub_secrets
from authority.store.postgres.schema import MIGRATIONS, migrate

log = logging.getLogger("authority.store.postgres")

#: TCP keepalive of every connection (ignored on a Unix socket): probes after this many idle
#: seconds, every second, 3 unanswered ones end it -- a database cut off by the network is
#: noticed in about 8 s instead of the kernel's 2 hours
_KEEPALIVE: Final = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1,
                     "keepalives_count": 3}


#: what a server that is not accepting connections answers (shutting down, starting up, ...)
_NOT_ACCEPTING: Final = "the database system is"


class Pool:
    """The connections of a ``PostgresStore``: its pool (replaced after an outage), one
    transaction per method (``_conn``, ``_tx``), connections of their own (``connect``), and
    the *down* mark that fails calls at once while the database cannot be reached."""

    # -- opening -----------------------------------------------------------------------------------

    def __init__(self, settings: PostgresSettings,
                 migrations: Sequence[Sequence[LiteralString]] = MIGRATIONS) -> None:
        """Connect, create or migrate the schema, and open the pool.

        Raises: StartupError (an unparsable DSN, the database unreachable or refusing us, a
        schema newer than ``migrations`` knows, a failed migration), naming the database by
        its host, port, database and user only.
        """
        self._dsn = settings.dsn.reveal()
        self.target = describe_dsn(self._dsn)
        self._timeout_ms = max(1, math.ceil(settings.statement_timeout * 1000))
        self._pool_size = settings.pool_size
        self.connect_timeout = settings.connect_timeout
        connect_timeout = max(1, math.ceil(settings.connect_timeout))
        user_timeout = math.ceil((settings.statement_timeout + settings.connect_timeout) * 1000)
        #: what every connection is opened with (the pool's and the change feeds')
        self.connect_kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": connect_timeout, **_KEEPALIVE,
            "tcp_user_timeout": user_timeout}
        self._state_lock = threading.Lock()   # the pool's replacement, the down mark
        self._down_since: float | None = None  # monotonic time it was found unreachable
        #: a change feed follows this store (it restores it): only then does a pool
        #: connection that cannot be made mark the store down
        self._watched = False
        try:
            with psycopg.connect(self._dsn, **self.connect_kwargs) as conn:
                self.schema_version = migrate(conn, migrations, self.target)
            self._pool = self._open_pool()
        except psycopg.Error as exc:
            raise StartupError(f"state store {self.target}: {self.scrub(str(exc))}") from None

    def _open_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """A new pool, open with its first connection made.

        Raises: psycopg.Error (PoolTimeout: no connection within ``connect_timeout``).
        """
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._dsn, connection_class=_WatchedConnection,
            kwargs={**self.connect_kwargs, "on_failure": self._connect_failed},
            min_size=1, max_size=self._pool_size, open=False, configure=self._configure,
            check=_check_connection,
            name="state-store", timeout=self.connect_timeout)
        try:
            pool.open(wait=True, timeout=self.connect_timeout)
        except psycopg.Error:
            pool.close()
            raise
        return pool

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new pool connection: the statement timeout; the server ends a transaction left
        idle for 2 x that + 1 s (a replica stopped inside one, by SIGSTOP or a hung host, would
        otherwise hold its locks, the audit table's or a row's, until it resumed; ours never
        wait between statements); and a plan made for each execution
        of a prepared statement (``plan_cache_mode``): a generic plan cached while the consumed
        table was small or never analysed scans all of it for every lookup later (measured:
        28 ms instead of 0.3 ms for 100 ids among 30 000 entries)."""
        conn.execute("SELECT set_config('statement_timeout', %s, false), "
                     "set_config('idle_in_transaction_session_timeout', %s, false), "
                     "set_config('plan_cache_mode', 'force_custom_plan', false)",
                     (f"{self._timeout_ms}ms", f"{2 * self._timeout_ms + 1000}ms"))

    def scrub(self, text: str) -> str:
        """``text`` without the DSN or any password it holds (for errors and logs)."""
        return scrub_secrets(text, self._dsn)

    # -- one transaction per method ----------------------------------------------------------------

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (autocommit: each statement commits when it completes).

        Raises: DeviceUnavailable if the database fails, is unreachable or no connection is
        free within ``connect_timeout`` (its message without secrets); at once while the store
        is down (``mark_down``).
        """
        down = self._down_since
        if down is not None:
            raise DeviceUnavailable(f"state store unreachable: {self.target} has not answered "
                                    f"for {time.monotonic() - down:.1f} s; reconnecting")
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            if self._down_since is not None:   # ``mark_down`` closed the pool while we waited
                raise DeviceUnavailable(f"state store unreachable: {self.target}; "
                                        "reconnecting") from None
            raise DeviceUnavailable(f"state store failed: {self.scrub(str(exc))}") from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside one transaction, committed when the body ends (rolled
        back if it raises). Raises: DeviceUnavailable, as ``_conn``."""
        with self._conn() as conn, conn.transaction():
            yield conn

    # -- reachability ------------------------------------------------------------------------------

    def connect(self, application_name: str) -> psycopg.Connection[Any]:
        """A new connection of its own (not pooled), as the pool's are made, named
        ``application_name`` (pg_stat_activity). Raises: psycopg.Error."""
        return psycopg.connect(self._dsn, application_name=application_name,
                               **self.connect_kwargs)

    @property
    def down_since(self) -> float | None:
        """Since when (``time.monotonic``) the store is down; None while it is not."""
        return self._down_since

    def mark_down(self, reason: str) -> None:
        """The database cannot be reached (a change feed lost its connection and could not
        make one again, or a pool connection could not be made for that reason): from now
        on every call fails at once until ``restore``, and the pool is closed, so that calls
        waiting for one of its connections fail now instead of after ``connect_timeout``.
        Never raises."""
        with self._state_lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            pool = self._pool
        # not in this thread: it may be one of the pool's workers, which ``close`` joins
        threading.Thread(target=pool.close, kwargs={"timeout": self.connect_timeout},
                         name="state-store-down-pool", daemon=True).start()
        log.error("state store %s unreachable, calls fail until it answers again: %s",
                  self.target, self.scrub(reason))

    def watched(self) -> None:
        """A change feed follows this store from now on (it restores a store marked down):
        a pool connection that cannot be made because the database cannot be reached marks
        the store down at once. Without one the pool keeps retrying on its own. Never
        raises."""
        self._watched = True

    def _connect_failed(self, exc: psycopg.Error) -> None:
        """A pool connection could not be made: if that says the database cannot be reached
        and a change feed will restore the store, mark it down. Never raises."""
        if self._watched and unreachable(exc):
            self.mark_down(str(exc))

    def restore(self) -> None:
        """The database answers again (a change feed connected after losing its connection):
        replace the pool by a new one, whose connections are made now (the old one's may be
        broken, and its own reconnection backs off up to minutes), then let calls through.

        Raises: DeviceUnavailable (no connection within ``connect_timeout``: still down).
        """
        try:
            pool = self._open_pool()
        except psycopg.Error as exc:
            raise DeviceUnavailable(f"state store failed: {self.scrub(str(exc))}") from None
        with self._state_lock:
            old, self._pool = self._pool, pool
            was_down, self._down_since = self._down_since, None
        threading.Thread(target=old.close, kwargs={"timeout": self.connect_timeout},
                         name="state-store-old-pool", daemon=True).start()
        if was_down is not None:
            log.warning("state store %s answers again after %.1f s", self.target,
                        time.monotonic() - was_down)

    def close(self) -> None:
        """Close the pool's connections. Never raises."""
        self._pool.close(timeout=5.0)


def unreachable(exc: psycopg.Error) -> bool:
    """Whether a failure to connect says the database cannot be reached: a connection
    exception (SQLSTATE class 08) or an operator intervention (class 57: shutting down,
    starting up, crashed); a failure without SQLSTATE (libpq gives none for a refused
    connection) when no server answered at all (no FATAL message: refused, no socket, no
    answer in time) or it answered that it is not accepting connections ("the database
    system is shutting down / starting up / in recovery mode"). A refusal of this client
    (a password, a database that does not exist, too many connections) is not."""
    state = exc.sqlstate
    if state is not None:
        return state[:2] in ("08", "57")
    text = str(exc)
    return "FATAL:" not in text or _NOT_ACCEPTING in text


class _WatchedConnection(psycopg.Connection[Any]):
    """A pool connection: a failure to make it is reported to ``on_failure`` (the pool's
    kwargs carry it), then raised as usual."""

    @classmethod
    def connect(cls, conninfo: str = "", *,  # type: ignore[override]
                on_failure: Callable[[psycopg.Error], None] | None = None,
                **kwargs: Any) -> Self:
        """Connect as ``psycopg.Connection.connect``. Raises: psycopg.Error."""
        try:
            return super().connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            if on_failure is not None:
                on_failure(exc)
            raise


def _check_connection(conn: psycopg.Connection[Any]) -> None:
    """Before the pool hands a connection out: one that has something to read while idle (a
    server that ended it sent its last message and closed: a restart, a terminated session)
    is tested with a round trip and dropped if it fails; a quiet one costs one ``select``.
    Raises: psycopg.Error (the pool discards the connection and takes another)."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        ConnectionPool.check_connection(conn)

