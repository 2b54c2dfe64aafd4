"""A throwaway PostgreSQL server for development, benchmarks and tests: Debian's ``postgresql``
package (scripts/bootstrap installs it) initdb'ed in a new temporary directory, used, then
stopped and removed.

- It runs as the ``postgres`` system user the Debian package creates when this process is
  root (initdb and postgres refuse to run as root), else as the current user.
- It listens only on a Unix socket in its own directory (``listen_addresses = ''``): nothing
  on TCP. The directory is made directly under the temporary directory (``/tmp``), because
  the server's user must reach it and a socket path must stay under 108 octets.
- It asks for a password (scram-sha-256, a random one made here; ``dsn`` carries it), and
  keeps PostgreSQL's durability defaults (fsync, synchronous_commit, full_page_writes): a
  commit it acknowledges is on disk, as in production.
- ``stop`` (``pg_ctl stop -m fast``) removes the directory; ``halt`` / ``resume`` stop and
  start it keeping its data (an outage, for its clients); ``kill`` SIGKILLs it (a crash).
- ``standby`` makes a streaming standby of it (pg_basebackup -R, started, its own socket
  directory), ``promote`` makes a standby the primary: the chaos scenario pg-failover.

Use it as a context manager::

    with DevPostgres.launch() as db:
        dsn = db.dsn(db.create_database())

or from a shell (``examples/cluster/run``): ``python -m authority.devdb --dsn-file PATH`` starts
one, writes the DSN of a database ``authority`` to PATH (mode 0600) and runs until SIGINT or
SIGTERM, then stops it and removes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from authority.errors import StartupError

PORT = 5432               # names the socket file only: nothing listens on TCP
SUPERUSER = "postgres"    # the database superuser initdb creates
RUN_AS = "postgres"       # the system user of Debian's package (when this process is root)
_BINARIES = ("initdb", "pg_ctl", "postgres")
_SOCKET_MAX = 107         # octets of a Unix socket path (sun_path holds 108 with the NUL)
_INSTALL = "install Debian's postgresql package (scripts/bootstrap does)"

#: postgresql.conf lines ``launch`` writes unless given others
DEFAULT_SETTINGS: Mapping[str, str | int] = {"max_connections": 200}


def find_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb, pg_ctl and postgres (None
    when there is none). Never raises."""
    found = []
    for directory in Path("/usr/lib/postgresql").glob("*/bin"):
        major = directory.parent.name
        if major.isdigit() and all((directory / name).is_file() for name in _BINARIES):
            found.append((int(major), directory))
    return max(found)[1] if found else None


def unavailable() -> str | None:
    """Why a server cannot be started here (None: it can). Never raises."""
    if find_binaries() is None:
        return f"PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: {_INSTALL}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return (f"running as root and there is no '{RUN_AS}' system user to run "
                    f"PostgreSQL as (PostgreSQL refuses root): {_INSTALL}")
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


class DevPostgres:
    """One running throwaway PostgreSQL cluster: its directory (data, log and socket) and its
    superuser's password."""

    def __init__(self, directory: Path, password: str, binaries: Path,
                 prefix: tuple[str, ...]) -> None:
        self.directory = directory
        self.password = password
        self._bin = binaries
        self._prefix = prefix       # runuser -u postgres -- (root), else nothing
        self._running = False

    def __repr__(self) -> str:      # never the password
        return f"DevPostgres({str(self.directory)!r}, running={self._running})"

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "server.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (its backends are its children), or None when it is
        not running. Never raises."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def dsn(self, dbname: str = "postgres", password: str | None = None) -> str:
        """A libpq key=value connection string for ``dbname`` as the superuser, with the
        password (``password`` instead, when given)."""
        pw = self.password if password is None else password
        return (f"host={self.directory} port={PORT} user={SUPERUSER} dbname={dbname} "
                f"password={pw}")

    def admin(self, sql: str, params: tuple[object, ...] = ()) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser.
        Raises: psycopg.Error."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql, params or None)

    def create_database(self, prefix: str = "t_") -> str:
        """A new empty database with a random name starting with ``prefix``; returns the name.
        Raises: psycopg.Error."""
        name = f"{prefix}{secrets.token_hex(6)}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection still open to it. Raises: psycopg.Error."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def terminate_connections(self, dsn: str) -> None:
        """End every session connected to the database of ``dsn`` (as a crash or a network
        cut would, for its clients). Raises: psycopg.Error."""
        from psycopg.conninfo import conninfo_to_dict

        self.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = %s AND pid <> pg_backend_pid()",
                   (conninfo_to_dict(dsn)["dbname"],))

    def halt(self) -> None:
        """``pg_ctl stop -m fast`` keeping the cluster (``resume`` starts it again): an outage
        of the database for its clients. Raises: StartupError."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """``pg_ctl start -w`` after ``halt``: returns once it accepts connections.
        Raises: StartupError."""
        self._start()

    def _start(self) -> None:
        """``pg_ctl start -w`` (60 s at most), logging to ``log_path``; ``stop`` stops it then.
        Raises: StartupError."""
        self._pg_ctl("-l", str(self.log_path), "-w", "-t", "60", "start")
        self._running = True

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``; idempotent) and remove its directory.
        Never raises."""
        if self._running:
            self._running = False
            with contextlib.suppress(Exception):
                self._pg_ctl("-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of it (as a crash of its host would): the
        data directory stays as the crash left it (``stop`` removes it). Never raises."""
        pid = self.pid
        if pid is None:
            return
        children = child_pids(pid)
        for victim in (pid, *children):
            with contextlib.suppress(OSError):
                os.kill(victim, signal.SIGKILL)
        self._running = False

    def standby(self, name: str, prefix: str = "ta-pg-standby-") -> DevPostgres:
        """A streaming standby of this server, started: a replication role ``name`` made here
        (its password: the superuser's), ``pg_basebackup -R`` of this server into a new
        temporary directory (``primary_conninfo`` names it ``application_name=name``, for
        ``synchronous_standby_names``), its own socket directory. Returns it once it accepts
        connections (read-only); on failure nothing of it is left.

        Raises: StartupError (pg_basebackup or pg_ctl failed), psycopg.Error (the role)."""
        # a utility statement takes no parameters; the password is token_urlsafe's alphabet
        self.admin(f'CREATE ROLE "{name}" WITH REPLICATION LOGIN PASSWORD '
                   f"'{self.password}'")
        directory = Path(tempfile.mkdtemp(prefix=prefix))
        other = type(self)(directory, self.password, self._bin, self._prefix)
        try:
            other._chown(directory)
            source = (f"host={self.directory} port={PORT} user={name} "
                      f"password={self.password} application_name={name}")
            other._run(str(self._bin / "pg_basebackup"), "-D", str(other.data), "-R",
                       "-X", "stream", "-c", "fast", "-d", source)
            with (other.data / "postgresql.conf").open("a") as conf:
                conf.write(f"\n# authority/devdb.py standby\n"
                           f"unix_socket_directories = '{directory}'\n")
            other._start()
        except BaseException:
            other.stop()
            raise
        return other

    def promote(self) -> None:
        """``pg_ctl promote -w`` (a standby): returns once it accepts writes.
        Raises: StartupError."""
        self._pg_ctl("-w", "-t", "60", "promote")

    def __enter__(self) -> DevPostgres:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @classmethod
    def launch(cls, settings: Mapping[str, str | int] | None = None,
               prefix: str = "ta-pg-") -> DevPostgres:
        """initdb a new cluster in a new temporary directory and start it; ``settings`` are
        extra postgresql.conf lines (default ``DEFAULT_SETTINGS``). On failure nothing is
        left behind.

        Raises: StartupError saying why (binaries missing, no ``postgres`` user, initdb or
        pg_ctl failed: with their output and the server log's tail)."""
        reason = unavailable()
        if reason is not None:
            raise StartupError(f"cannot start a PostgreSQL server: {reason}")
        binaries = find_binaries()
        assert binaries is not None
        root = os.geteuid() == 0
        directory = Path(tempfile.mkdtemp(prefix=prefix))
        server = cls(directory, secrets.token_urlsafe(18), binaries,
                     ("runuser", "-u", RUN_AS, "--") if root else ())
        try:
            if len(str(directory / f".s.PGSQL.{PORT}")) > _SOCKET_MAX:
                raise StartupError(f"PostgreSQL socket path under {directory} is longer than "
                                   f"{_SOCKET_MAX} octets: set TMPDIR to a shorter directory")
            server._chown(directory)
            server._init(DEFAULT_SETTINGS if settings is None else settings)
            server._start()
        except BaseException:
            server.stop()
            raise
        return server

    def _init(self, settings: Mapping[str, str | int]) -> None:
        """initdb (password auth for every connection), then the socket-only settings."""
        pwfile = self.directory / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        try:
            self._run(str(self._bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                      "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                      "--locale=C")
        finally:
            pwfile.unlink(missing_ok=True)
        lines = {"listen_addresses": "''", "unix_socket_directories": f"'{self.directory}'",
                 "port": PORT, **settings}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# authority/devdb.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in lines.items())

    def _pg_ctl(self, *argv: str) -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), *argv)

    def _run(self, *argv: str, timeout: float = 120) -> None:
        """Run a PostgreSQL program as the server's user. Raises: StartupError."""
        try:
            done = subprocess.run([*self._prefix, *argv], capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StartupError(f"{Path(argv[0]).name}: {exc}") from None
        if done.returncode != 0:
            raise StartupError(f"{Path(argv[0]).name} {argv[-1]} failed ({done.returncode}): "
                               f"{done.stdout.strip()} {done.stderr.strip()} "
                               f"{self._log_tail()}".strip())

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return "log: " + " | ".join(tail) if tail else ""

    def _chown(self, path: Path) -> None:
        if self._prefix:
            user = pwd.getpwnam(RUN_AS)
            os.chown(path, user.pw_uid, user.pw_gid)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (/proc). Never raises."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m authority.devdb``: start a server, create a database, write its DSN to
    ``--dsn-file`` (0600), print where it is, and run until SIGINT or SIGTERM; exit status 2
    when it cannot start."""
    parser = argparse.ArgumentParser(prog="python -m authority.devdb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn-file", type=Path, required=True, metavar="PATH",
                        help="where to write the DSN (it holds the password; mode 0600)")
    parser.add_argument("--database", default="authority", help="database to create")
    args = parser.parse_args(argv)
    try:
        db = DevPostgres.launch()
    except StartupError as exc:
        print(f"devdb: {exc}", file=sys.stderr)
        return 2
    ended = threading.Event()

    with db:
        db.admin(f'CREATE DATABASE "{args.database}"')
        args.dsn_file.touch(mode=0o600)
        args.dsn_file.write_text(db.dsn(args.database) + "\n")
        print(f"PostgreSQL {db.directory} (socket only), database {args.database}, "
              f"DSN in {args.dsn_file}", flush=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: ended.set())
        while not ended.wait(0.5):
            pass
    return 0

if __name__ == "__main__":
    sys.exit(main())
