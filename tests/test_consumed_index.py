"""The SQLite store's in-memory consumed index (``sole_writer``: one process writes the file's
consumed set, so a redeem of an unconsumed ticket is answered without a query): its answers are
the file's at every step, a query is made only for an id it has, it is rebuilt from the file on
open, and the service uses it only when it is the file's one writer (``server.processes`` 1)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from authority.app import open_store
from authority.config import ServerSettings
from authority.store.sqlite import SqliteStore
from tests.conftest import make_config

NOW = 1_800_000_000.0


def ids(n: int) -> list[bytes]:
    return [secrets.token_bytes(16) for _ in range(n)]


@pytest.fixture
def sole(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "authority.db", sole_writer=True)
    yield store
    store.close()


def queries_of(store: SqliteStore) -> list[str]:
    """Every statement ``store`` runs on its connection from now on (SQLite's trace hook)."""
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    return seen


def test_an_unconsumed_ticket_costs_no_query_a_consumed_one_is_looked_up(
        sole: SqliteStore) -> None:
    consumed, other = ids(2)
    assert sole.consume_many([(consumed, int(NOW) + 60)], NOW) == [True]
    seen = queries_of(sole)
    assert sole.consumed_among([other], NOW) == set()
    assert seen == []                                       # answered from memory
    assert sole.consumed_among([other, consumed], NOW) == {consumed}
    assert len(seen) == 1 and "FROM consumed" in seen[0]    # one query, for the one id
    assert consumed.hex() in seen[0] and other.hex() not in seen[0]
    seen.clear()
    assert sole.consume_many([(other, int(NOW) + 60)], NOW) == [True]
    assert not [q for q in seen if q.startswith("SELECT")]  # a fresh consume: no lookup


def test_the_index_answers_as_the_file_through_consumes_and_purges(
        sole: SqliteStore, tmp_path: Path) -> None:
    """A reader of the same file without an index (another connection: the file's truth) and
    the indexed store agree after every consume, expiry and purge."""
    reader = SqliteStore(tmp_path / "authority.db")
    try:
        pool = ids(40)
        for step in range(8):
            now = NOW + 10 * step
            batch = pool[step * 5:(step + 1) * 5]
            expiry = [int(now) + (5 if i % 2 else 100) for i in range(len(batch))]
            fresh = sole.consume_many(list(zip(batch, expiry, strict=True)), now)
            assert fresh == [True] * len(batch)
            assert sole.consume_many([(batch[0], expiry[0])], now) == [False]   # a replay
            if step % 3 == 2:
                sole.purge_expired(now)
            assert sole.consumed_among(pool, now) == reader.consumed_among(pool, now)
        assert len(sole._index or ()) == reader.consumed_count(0)   # purged ids left memory
    finally:
        reader.close()


def test_a_reopened_store_rebuilds_the_index_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "authority.db"
    plain = SqliteStore(path)
    consumed = ids(3)
    plain.consume_many([(t, int(NOW) + 60) for t in consumed], NOW)
    plain.close()
    sole = SqliteStore(path, sole_writer=True)
    try:
        assert sole.consumed_among([*consumed, *ids(2)], NOW) == set(consumed)
    finally:
        sole.close()


@pytest.mark.parametrize(("processes", "indexed"), [("auto", True), (1, True), (2, False)])
def test_the_service_indexes_only_as_the_files_one_writer(
        tmp_path: Path, processes: int | str, indexed: bool) -> None:
    config = make_config(tmp_path)
    config = replace(config, server=replace(config.server, processes=processes))
    assert isinstance(config.server, ServerSettings)
    store = open_store(config)
    try:
        assert isinstance(store, SqliteStore) and (store._index is not None) is indexed
    finally:
        store.close()
