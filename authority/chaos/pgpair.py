"""A PostgreSQL primary and its streaming standby for the pg-failover scenario, both devdb
servers (authority/devdb.py: Debian's binaries, Unix sockets only, run as ``postgres`` when
root), and the multi-host DSN that reaches whichever of them accepts writes."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import psycopg

from authority.devdb import PORT, SUPERUSER, DevPostgres

STANDBY = "standby1"   # the standby's application_name and replication role


class PgPair:
    """A primary and a standby streaming from it, synchronously (``synchronous_standby_names``
    names the standby, and commits wait for its flush: PostgreSQL's ``synchronous_commit =
    on``) or asynchronously; one database ``authority`` made on the primary."""

    def __init__(self, primary: DevPostgres, standby: DevPostgres, synchronous: bool) -> None:
        self.primary = primary
        self.standby = standby
        self.synchronous = synchronous
        self.database = "authority"

    @classmethod
    @contextlib.contextmanager
    def started(cls, synchronous: bool) -> Iterator[PgPair]:
        """Launch both (the standby by pg_basebackup of the primary; then, when
        ``synchronous``, the primary told to wait for it), make the database; stop and remove
        both on exit. Raises: StartupError, psycopg.Error."""
        primary = DevPostgres.launch(prefix="ta-pgp-")
        standby: DevPostgres | None = None
        try:
            standby = primary.standby(STANDBY)
            if synchronous:
                primary.admin(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY}'")
                primary.admin("SELECT pg_reload_conf()")
            pair = cls(primary, standby, synchronous)
            primary.admin(f'CREATE DATABASE "{pair.database}"')
            yield pair
        finally:
            primary.stop()
            if standby is not None:
                standby.stop()

    @property
    def dsn(self) -> str:
        """libpq's multi-host DSN: the primary, then the standby, the first that accepts
        writes (``target_session_attrs=read-write``); one password (the standby is a copy)."""
        hosts = f"{self.primary.directory},{self.standby.directory}"
        return (f"host={hosts} port={PORT},{PORT} user={SUPERUSER} dbname={self.database} "
                f"password={self.primary.password} target_session_attrs=read-write")

    def replication(self) -> tuple[str, str, int] | None:
        """(state, sync_state, walsender pid) of the standby's replication as the primary
        shows it; None when it does not stream. Raises: psycopg.Error."""
        row = _one(self.primary, "SELECT state, sync_state, pid FROM pg_stat_replication "
                                 "WHERE application_name = %s", (STANDBY,))
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def pause_sender(self, pid: int) -> None:
        """SIGSTOP the primary's WAL sender ``pid`` (a network stall: no WAL reaches the
        standby; a synchronous commit waits). Raises: OSError."""
        os.kill(pid, signal.SIGSTOP)

    def fail_over(self) -> None:
        """SIGKILL the primary (postmaster and all its processes, a stopped sender too), then
        promote the standby. Raises: StartupError (the promotion failed)."""
        self.primary.kill()
        self.standby.promote()

    def writable(self, server: DevPostgres) -> bool:
        """Whether ``server`` accepts a connection and a write now. Never raises."""
        try:
            with psycopg.connect(server.dsn(self.database), autocommit=True,
                                 connect_timeout=2) as conn:
                conn.execute("CREATE TEMP TABLE probe (x int)")
        except psycopg.Error:
            return False
        return True


def _one(server: DevPostgres, sql: Any, params: tuple[object, ...]) -> Any:
    with psycopg.connect(server.dsn(), autocommit=True, connect_timeout=2) as conn:
        return conn.execute(sql, params).fetchone()
