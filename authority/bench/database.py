"""``--store postgresql``: the bench's own PostgreSQL (authority/devdb.py), a fresh database
for each server measured on it, and the size of its consumed-ticket table."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from authority.devdb import DevPostgres
from authority.errors import StartupError

#: the file, in the state directory, holding the DSN of the current database (mode 0600: it
#: holds the password; the server reads it as postgresql.dsn_file)
DSN_FILE = "bench-postgresql.dsn"
#: the [postgresql] table given to the server (its pool size is the default's)
_SECTION = '[postgresql]\ndsn_file = "{path}"\n'


class BenchDatabase:
    """A PostgreSQL started on first use and removed on ``close``; ``fresh`` makes the
    database of the next server (so no server sees another's keys or consumed tickets)."""

    def __init__(self, state_dir: Path) -> None:
        self._dsn_file = state_dir / DSN_FILE
        self._server: DevPostgres | None = None
        self._dsn = ""

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (its backends are its children), None before ``fresh``."""
        return self._server.pid if self._server is not None else None

    def fresh(self) -> str:
        """Start the server if needed, create a new database, write its DSN file and return
        the ``[postgresql]`` table of a server's config for it.

        Raises: StartupError (PostgreSQL missing or failing to start; the database not
        created)."""
        if self._server is None:
            self._server = DevPostgres.launch()
        try:
            self._dsn = self._server.dsn(self._server.create_database("bench_"))
        except Exception as exc:   # psycopg.Error, kept out of the caller's imports
            raise StartupError(f"PostgreSQL: cannot create the bench's database: {exc}"
                               ) from None
        self._dsn_file.touch(mode=0o600)
        self._dsn_file.write_text(self._dsn + "\n")
        return _SECTION.format(path=self._dsn_file)

    def consumed_size(self) -> int | None:
        """Bytes of the current database's consumed table (heap, indexes, TOAST), or None
        when unreadable. Never raises."""
        if not self._dsn:
            return None
        try:
            import psycopg

            with psycopg.connect(self._dsn, autocommit=True) as conn:
                row = conn.execute("SELECT pg_total_relation_size('consumed')").fetchone()
        except Exception:   # psycopg.Error or a missing table: not measured
            return None
        return int(row[0]) if row is not None and row[0] is not None else None

    def close(self) -> None:
        """Stop the server and remove it and the DSN file. Never raises."""
        self._dsn_file.unlink(missing_ok=True)
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> BenchDatabase:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
