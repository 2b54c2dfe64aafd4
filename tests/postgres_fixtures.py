"""A real PostgreSQL server for the tests: Debian's package (``postgresql``, installed by
scripts/bootstrap), started once per test session in a temporary directory, a fresh database
per test.

The server is initdb'ed and run as the ``postgres`` system user the Debian package creates when
the tests run as root (initdb and postgres refuse root), else as the current user. It listens
only on a Unix socket in its directory (``listen_addresses = ''``), asks for a password
(scram-sha-256; the tests' DSNs carry it, so secret handling is exercised), and keeps
PostgreSQL's durability defaults (fsync, synchronous_commit): an acknowledged consume is a
committed one. It is stopped (``pg_ctl stop -m fast``) and its directory removed at the end of
the session. Without the binaries the tests that need it are skipped, saying why.

Import the fixtures explicitly::

    from tests.postgres_fixtures import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PORT = 5432          # names the socket file only: nothing listens on TCP
SUPERUSER = "postgres"
_RUN_AS = "postgres"  # the system user of Debian's package, when the tests run as root


def find_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb, pg_ctl and postgres (None if
    there is none)."""
    found = []
    for directory in Path("/usr/lib/postgresql").glob("*/bin"):
        major = directory.parent.name
        if major.isdigit() and all((directory / p).is_file()
                                   for p in ("initdb", "pg_ctl", "postgres")):
            found.append((int(major), directory))
    return max(found)[1] if found else None


def _unavailable() -> str | None:
    """Why the server cannot run here (None: it can)."""
    if find_binaries() is None:
        return ("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin "
                "(scripts/bootstrap --test installs Debian's postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_RUN_AS)
        except KeyError:
            return f"running as root and no '{_RUN_AS}' system user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


@dataclass
class PostgresServer:
    """One running PostgreSQL cluster: its directory (the socket is there too) and password."""

    directory: Path
    password: str
    _prefix: tuple[str, ...] = ()
    _bin: Path = Path()
    _running: bool = False

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def dsn(self, dbname: str = "postgres", password: str | None = None) -> str:
        """A libpq key=value connection string for ``dbname``, with the password."""
        pw = self.password if password is None else password
        return (f"host={self.directory} port={PORT} user={SUPERUSER} dbname={dbname} "
                f"password={pw}")

    def admin(self, sql: str, params: tuple[object, ...] = ()) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql, params or None)  # type: ignore[arg-type]

    def terminate_connections(self, dsn: str) -> None:
        """End every session connected to the database of ``dsn`` (as a crash or a network
        cut would, for its clients)."""
        from psycopg.conninfo import conninfo_to_dict

        self.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = %s AND pid <> pg_backend_pid()",
                   (conninfo_to_dict(dsn)["dbname"],))

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"t_{secrets.token_hex(6)}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection still open to it."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _run(self, *argv: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._prefix, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): "
                               f"{done.stdout.strip()} {done.stderr.strip()}")

    def start(self) -> None:
        """initdb, configure (Unix socket in ``directory`` only), pg_ctl start -w."""
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        self._run(str(self._bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                  "--locale=C")
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# tests/postgres_fixtures.py\nlisten_addresses = ''\n"
                       f"unix_socket_directories = '{self.directory}'\nport = {PORT}\n"
                       "max_connections = 200\nshared_buffers = 32MB\n")
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.directory / "server.log"), "-w", "-t", "60", "start")
        self._running = True

    def halt(self) -> None:
        """pg_ctl stop -m fast, keeping the cluster (``resume`` starts it again): an outage
        of the database for its clients. Only on a server of one's own (``private_server``):
        other tests share the session's."""
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop",
                  timeout=60)

    def resume(self) -> None:
        """pg_ctl start -w after ``halt``: returns once it accepts connections."""
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.directory / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """pg_ctl stop -m fast (idempotent), then remove the directory."""
        if self._running:
            self._running = False
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                          "-w", "stop", timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _chown(self, path: Path) -> None:
        if self._prefix:
            user = pwd.getpwnam(_RUN_AS)
            os.chown(path, user.pw_uid, user.pw_gid)

    @classmethod
    def launch(cls) -> PostgresServer:
        """Start a server in a new temporary directory. Raises: RuntimeError."""
        binaries = find_binaries()
        assert binaries is not None
        prefix = ("runuser", "-u", _RUN_AS, "--") if os.geteuid() == 0 else ()
        # directly under /tmp: the server's user must reach it (pytest's tmp dirs are 0700
        # root's), and a socket path must stay under 108 octets
        directory = Path(tempfile.mkdtemp(prefix="ta-pg-"))
        server = cls(directory, secrets.token_urlsafe(18), prefix, binaries)
        server._chown(directory)
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        return server


_lock = threading.Lock()
_shared: list[PostgresServer] = []


def shared_server() -> PostgresServer:
    """The session's server, started on first use (and stopped at exit at the latest).
    Skips the calling test when PostgreSQL cannot run here."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    with _lock:
        if not _shared:
            server = PostgresServer.launch()
            atexit.register(server.stop)
            _shared.append(server)
        return _shared[0]


def private_server() -> Iterator[PostgresServer]:
    """A server of the caller's own (stopped and removed afterwards), for tests that stop and
    restart it (``halt``, ``resume``); skips when PostgreSQL cannot run here. Use as a
    fixture's body: ``yield from private_server()``."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer.launch()
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
