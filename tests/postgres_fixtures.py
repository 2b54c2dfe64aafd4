"""A real PostgreSQL server for the tests: authority/devdb.py's throwaway server (Debian's
``postgresql``, installed by scripts/bootstrap), started once per test session, a fresh
database per test.

devdb runs it as the ``postgres`` system user when the tests run as root, on a Unix socket
only, with a password (scram-sha-256; the tests' DSNs carry it, so secret handling is
exercised) and PostgreSQL's durability defaults (fsync, synchronous_commit): an acknowledged
consume is a committed one. It is stopped (``pg_ctl stop -m fast``) and its directory removed
at the end of the session. Without the binaries the tests that need it are skipped, saying why
(``devdb.unavailable``).

Import the fixtures explicitly::

    from tests.postgres_fixtures import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator

import pytest

from authority import devdb

#: the tests' server: devdb's (``halt``/``resume`` only on a ``private_server``: other tests
#: share the session's)
PostgresServer = devdb.DevPostgres

_SETTINGS = {**devdb.DEFAULT_SETTINGS, "shared_buffers": "32MB"}


def _launch() -> PostgresServer:
    """A new server, or skip the calling test saying why PostgreSQL cannot run here.
    Raises: StartupError when it can but does not start."""
    reason = devdb.unavailable()
    if reason is not None:
        pytest.skip(reason)
    return PostgresServer.launch(settings=_SETTINGS)


_lock = threading.Lock()
_shared: list[PostgresServer] = []


def shared_server() -> PostgresServer:
    """The session's server, started on first use (and stopped at exit at the latest).
    Skips the calling test when PostgreSQL cannot run here."""
    with _lock:
        if not _shared:
            server = _launch()
            atexit.register(server.stop)
            _shared.append(server)
        return _shared[0]


def private_server() -> Iterator[PostgresServer]:
    """A server of the caller's own (stopped and removed afterwards), for tests that stop and
    restart it (``halt``, ``resume``); skips when PostgreSQL cannot run here. Use as a
    fixture's body: ``yield from private_server()``."""
    server = _launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this test session (one, whichever modules import this)."""
    server = shared_server()
    yield server
    server.stop()   # at the end of the session; idempotent


@pytest.fixture(name="postgres_dsn")
def postgres_dsn_fixture(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN of a fresh, empty database of its own (dropped afterwards)."""
    name = postgres_server.create_database()
    yield postgres_server.dsn(name)
    postgres_server.drop_database(name)
