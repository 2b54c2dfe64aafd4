"""``--store postgresql``: the bench's own PostgreSQL (authority/devdb.py), a fresh database
for each server measured on it, and the size of its consumed-ticket table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from authority.devdb import DevPostgres
from authority.errors import StartupError

#: the file, in the state directory, holding the DSN of one database (mode 0600: it holds the
#: password; the server reads it as postgresql.dsn_file)
DSN_FILE = "bench-postgresql-{name}.dsn"
#: the [postgresql] table given to the server (its pool size is the default's)
_SECTION = '[postgresql]\ndsn_file = "{path}"\n'


class BenchDatabase:
    """A PostgreSQL started on first use and removed on ``close``; ``fresh`` makes the
    database of the next server (so no server sees another's keys or consumed tickets)."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._server: DevPostgres | None = None
        self._dsn_files: list[Path] = []

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (its backends are its children), None before ``fresh``."""
        return self._server.pid if self._server is not None else None

    def fresh(self) -> tuple[str, Callable[[], int | None]]:
        """Start the server if needed, create a new database and write its DSN file; return
        the ``[postgresql]`` table of a server's config for it, and a reader of the size of
        its consumed table.

        Raises: StartupError (PostgreSQL missing or failing to start; the database not
        created)."""
        if self._server is None:
            self._server = DevPostgres.launch()
        try:
            name = self._server.create_database("bench_")
        except Exception as exc:   # psycopg.Error, kept out of the caller's imports
            raise StartupError(f"PostgreSQL: cannot create the bench's database: {exc}"
                               ) from None
        dsn = self._server.dsn(name)
        path = self._state_dir / DSN_FILE.format(name=name)
        self._dsn_files.append(path)
        path.touch(mode=0o600)
        path.write_text(dsn + "\n")
        return _SECTION.format(path=path), lambda: consumed_size(dsn)

    def close(self) -> None:
        """Stop the server and remove it and the DSN files. Never raises."""
        for path in self._dsn_files:
            path.unlink(missing_ok=True)
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> BenchDatabase:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def consumed_size(dsn: str) -> int | None:
    """Bytes of the consumed table (heap, indexes, TOAST) of the database of ``dsn``, or None
    when unreadable. Never raises."""
    try:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_total_relation_size('consumed')").fetchone()
    except Exception:   # psycopg.Error or a missing table: not measured
        return None
    return int(row[0]) if row is not None and row[0] is not None else None
