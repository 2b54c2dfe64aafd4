"""Scenario 5 (issue 16), PostgreSQL primary failover, as CI runs it: replicas on a primary
with a synchronous standby, the WAL sender paused, the primary SIGKILLed, the standby promoted;
the row holds (0 wrong, 0 acknowledged consumes lost, every replica back), and the same run
with asynchronous replication was measured (its lost consumes are a figure, not judged)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psycopg
import pytest

from authority import devdb
from authority.chaos import run_one
from authority.chaos.core import table
from authority.chaos.pgpair import PgPair
from tests.pkcs11_fixtures import requires_softhsm

requires_postgres = pytest.mark.skipif(devdb.unavailable() is not None,
                                       reason=str(devdb.unavailable()))


@requires_softhsm
@requires_postgres
def test_the_quick_scenario_holds() -> None:
    outcome = run_one("pg-failover", quick=True)
    print("\n" + table([outcome]), outcome.figures)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.wrong == 0 and outcome.lost == 0
    assert outcome.figures["sync_acknowledged_in_stall"] == 0
    assert "async_lost" in outcome.figures and outcome.recovery_s is not None


@requires_postgres
def test_a_synchronous_commit_waits_for_the_standby_and_survives_the_failover() -> None:
    """The pair as the scenario builds it: with the primary's WAL sender paused, a commit
    does not return (synchronous replication: it waits for the standby's flush; PostgreSQL's
    statement_timeout does not end that wait); resumed, it returns, and the row is on the
    standby promoted after the primary's SIGKILL; the old primary takes no write and the
    multi-host DSN reaches the new one."""
    with PgPair.started(synchronous=True) as pair:
        replication = pair.replication()
        assert replication is not None and replication[:2] == ("streaming", "sync")
        with psycopg.connect(pair.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            pair.pause_sender(replication[2])
            try:
                done = threading.Thread(target=conn.execute, args=("INSERT INTO t VALUES (1)",))
                done.start()
                done.join(0.5)
                assert done.is_alive()     # waiting for the standby
            finally:
                os.kill(replication[2], signal.SIGCONT)
            done.join(10)
            assert not done.is_alive()
        pair.fail_over()
        assert not pair.writable(pair.primary) and pair.writable(pair.standby)
        with psycopg.connect(pair.dsn, autocommit=True) as conn:
            assert conn.info.host == str(pair.standby.directory)
            assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)


@requires_postgres
def test_the_pair_leaves_nothing_behind_when_the_standby_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure making the standby stops and removes the primary too."""
    made: list[Path] = []
    real_launch = devdb.DevPostgres.launch

    def launch(*args: object, **kwargs: object) -> devdb.DevPostgres:
        server = real_launch(*args, **kwargs)  # type: ignore[arg-type]
        made.append(server.directory)
        return server

    def refuse(self: devdb.DevPostgres, name: str, prefix: str = "") -> devdb.DevPostgres:
        raise devdb.StartupError("pg_basebackup refused")

    monkeypatch.setattr(devdb.DevPostgres, "launch", launch)
    monkeypatch.setattr(devdb.DevPostgres, "standby", refuse)
    with pytest.raises(devdb.StartupError), PgPair.started(synchronous=True):
        pass
    assert made and not any(d.exists() for d in made)
