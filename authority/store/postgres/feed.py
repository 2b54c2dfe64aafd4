"""One replica's change feed: a LISTEN connection of its own on ``CHANNEL``, which also watches
whether the database can be reached (and marks the store down, then restores it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Final

import psycopg

from authority.errors import DeviceUnavailable
from authority.store.postgres.connection import Pool, unreachable

log = logging.getLogger("authority.store.postgres")

#: the channel of policy change notifications (payload: "revocation N", "epoch N", "purge N",
#: N the new policy version)
CHANNEL: Final = "ticket_authority_policy"
#: seconds between two attempts to connect the change feed again while the database is away
RECONNECT_DELAY: Final = 0.5
#: seconds of one wait for a notification (a closed feed is noticed within one)
_SLICE: Final = 0.5
#: application_name of the change feed's connection (pg_stat_activity shows it)
FEED_APPLICATION: Final = "ticket-authority change feed"


class PostgresChangeFeed:
    """One replica's LISTEN connection on ``CHANNEL`` (a ``ChangeFeed``), and its watch on
    the database: used by one thread at a time.

    A lost connection is made again at once; if that fails in a way that says the database
    cannot be reached (no answer, shutting down, starting up), the store is marked down
    (``PostgresStore.mark_down``: its calls fail at once) and the feed tries again every
    ``RECONNECT_DELAY`` seconds; once connected after a loss, the store's pool is replaced
    (``restore``) and calls go through again. The pool marks the store down too (a pool
    connection that cannot be made, no pooled connection within ``connect_timeout``): while
    connected, the feed then restores it every ``RECONNECT_DELAY`` seconds until it answers.
    A refusal that is not about reaching it (a password, too many connections) is logged and
    retried the same way, without marking the store down: its pooled connections may still
    work.
    """

    def __init__(self, store: Pool) -> None:
        self._store = store
        store.watched()
        self._conn: psycopg.Connection[Any] | None = None
        self._lost = False           # a connection was lost: restore the store once back
        self._closed = threading.Event()
        self._waiting = False        # a ``wait`` is in progress (it owns the connection)

    def wait(self, timeout: float) -> None:
        """Return at the first notification, after ``timeout`` seconds, or (not connected)
        once an attempt to connect succeeded or failed (then after ``RECONNECT_DELAY``).
        Never raises."""
        self._waiting = True
        try:
            self._wait(timeout)
        finally:
            self._waiting = False
            if self._closed.is_set():
                self._drop()

    def _wait(self, timeout: float) -> None:
        if self._closed.is_set():
            return
        if self._conn is None:
            if not self._connect():
                self._closed.wait(min(timeout, RECONNECT_DELAY))
            return
        if self._store.down_since is not None and not self._restore():
            # marked down by the pool while this connection lived: try again shortly
            self._closed.wait(min(timeout, RECONNECT_DELAY))
            return
        try:
            self._listen(self._conn, timeout)
        except psycopg.Error as exc:
            log.warning("state store change feed lost its connection: %s",
                        self._store.scrub(str(exc)))
            self._drop()
            self._lost = True
            if not self._connect():   # at once: a session ended alone comes back at once
                self._closed.wait(min(timeout, RECONNECT_DELAY))

    def _listen(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        """Wait for a notification up to ``timeout`` seconds, in slices of ``_SLICE`` (a
        ``close`` from another thread is seen within one). Raises: psycopg.Error."""
        deadline = time.monotonic() + timeout
        while not self._closed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            received = conn.notifies(timeout=min(remaining, _SLICE), stop_after=1)
            try:
                for _ in received:
                    return
            finally:
                received.close()

    def _connect(self) -> bool:
        """Connect and LISTEN; after a loss, restore the store. Returns whether connected.
        Never raises."""
        if self._closed.is_set():
            return False
        try:
            conn = self._store.connect(FEED_APPLICATION)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            reason = str(exc)
            if unreachable(exc):
                self._store.mark_down(reason)
            else:
                log.error("state store change feed cannot connect: %s",
                          self._store.scrub(reason))
            return False
        self._conn = conn
        if self._lost or self._store.down_since is not None:
            if not self._restore():
                self._drop()
                return False
            self._lost = False
        return True

    def _restore(self) -> bool:
        """Replace the store's pool (``restore``); returns whether it answered (else the
        store stays marked down). Never raises."""
        try:
            self._store.restore()
        except DeviceUnavailable as exc:
            self._store.mark_down(exc.message)
            return False
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """End the feed and close its connection (a ``wait`` in progress in another thread
        returns within ``_SLICE`` seconds and closes it). Never raises."""
        self._closed.set()
        if not self._waiting:
            self._drop()

