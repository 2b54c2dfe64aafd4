"""The store out of reach (issue 13): a real PostgreSQL of the test's own stopped (pg_ctl stop)
under load and started again, a real server over gRPC on a real SoftHSM2 token, on both server
modes.

While the database is away: redeems without consume answer from the cached key ring and
revocations, without asking the store, for ``store.max_staleness`` seconds after the last
confirmation; consumes, issues that need a seal reservation and admin actions fail
UNAVAILABLE at once; GetStatus says the store is unreachable; health turns NOT_SERVING past the
bound (and redeems UNAVAILABLE). Within 2 s of the database's return everything works again by
itself. What only the store could settle is UNAVAILABLE, not an answer: a ticket under a key id
the replica does not know (a key another replica may have made); the /metrics scrape and
GetStatus still answer with what they know. Then the pool's check: a pooled connection the
server ended is not handed out."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.config import ClusterSettings, Config, PostgresSettings, Secret, StoreSettings
from authority.errors import ConfigError
from authority.keyring import UNKNOWN_KEY_REREAD_GAP
from authority.outage import UNCHECKED
from authority.service.server import RunningServer, build_server
from authority.ticket_format import assemble_ticket, encode_header, parse_ticket
from tests.conftest import issue, load_toml, make_config, redeem, sample_state, wait_until
from tests.pkcs11_fixtures import requires_softhsm
from tests.postgres_fixtures import PostgresServer, private_server
from tests.test_metrics import scrape

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

TIMING = ClusterSettings(heartbeat_interval=0.25, replica_timeout=1.0, lease_duration=1.0)
STALENESS = 3.0     # store.max_staleness of these tests
RECOVERY = 2.0      # the issue's bound: everything works again this long after the return
SLACK = 5.0         # allowed over a bound that is not the object of the test


@pytest.fixture
def database() -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL server of this test's own (it is stopped and started) and the DSN of a
    database on it."""
    for server in private_server():
        yield server, server.dsn(server.create_database())


def outage_config(tmp_path: Path, dsn: str, mode: str) -> Config:
    """One seal per reservation (every issue needs the store), short heartbeats."""
    config = make_config(tmp_path / "state", "pkcs11", mode, seal_reservation=1)
    return replace(config, cluster=TIMING, store=StoreSettings(max_staleness=STALENESS),
                   postgresql=PostgresSettings(dsn=Secret(dsn), pool_size=4,
                                               connect_timeout=2.0))


class HealthLog:
    """Health/Watch of the server ("") in a thread: every status with when it arrived."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.updates: list[tuple[float, int]] = []
        self._stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=300)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for update in self._stream:
                self.updates.append((time.monotonic(), update.status))
        except grpc.RpcError:
            pass

    @property
    def status(self) -> int | None:
        return self.updates[-1][1] if self.updates else None

    def wait_for(self, status: int, timeout: float) -> float:
        """When the server reported ``status`` (waiting up to ``timeout`` seconds)."""
        wait_until(lambda: self.status == status, timeout=timeout, poll=0.01)
        return self.updates[-1][0]

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(10)


class Load:
    """Redeems without consume of one ticket in a loop, each outcome recorded with its time:
    a result name, or the status code of a refused call."""

    def __init__(self, stub: Any, ticket: bytes) -> None:
        self.outcomes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stub, ticket), daemon=True)
        self._thread.start()

    def _run(self, stub: Any, ticket: bytes) -> None:
        while not self._stop.wait(0.02):
            try:
                name = authority_pb2.RedeemResult.Name(redeem(stub, ticket).result)
            except grpc.RpcError as err:
                name = err.code().name
            self.outcomes.append((time.monotonic(), name))

    def between(self, start: float, end: float) -> set[str]:
        return {name for at, name in self.outcomes if start <= at < end}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def refused(call: Callable[[], object]) -> grpc.StatusCode | None:
    """The status code a call fails with (None: it succeeded)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()   # type: ignore[no-any-return]
    return None


class Server:
    """A real server on the database, its maintenance running, with stubs and health."""

    def __init__(self, config: Config) -> None:
        self.running: RunningServer = build_server(config)
        self.running.authority.start_maintenance()
        self.channel = grpc.insecure_channel(self.running.address)
        self.tickets = authority_pb2_grpc.TicketAuthorityStub(self.channel)
        self.admin = admin_pb2_grpc.TicketAdminStub(self.channel)
        self.health = HealthLog(self.channel)

    def close(self) -> None:
        self.health.close()
        self.channel.close()
        self.running.stop(grace=1.0)


@requires_softhsm
@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_the_database_stopped_and_started_again_under_load(
        tmp_path: Path, database: tuple[PostgresServer, str], mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    postgres, dsn = database
    server = Server(outage_config(tmp_path, dsn, mode))
    try:
        _outage_and_recovery(server, postgres, monkeypatch)
    finally:
        server.close()


def _outage_and_recovery(server: Server, postgres: PostgresServer,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    tickets, admin = server.tickets, server.admin
    server.health.wait_for(SERVING, timeout=SLACK)
    kept, used, revoked = (issue(tickets, n).ticket for n in (1, 2, 3))
    assert redeem(tickets, used, consume=True).result == OK
    admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(id_i=sample_state(3).id_i))
    handle = redeem(tickets, kept).ticket_id
    store = server.running.authority.store
    lookups: list[int] = []
    real_lookup = store.consumed_among

    def counted(ids: Any, now: float) -> set[bytes]:
        lookups.append(len(ids))
        return real_lookup(ids, now)   # type: ignore[no-any-return]

    monkeypatch.setattr(store, "consumed_among", counted)   # a spy on the real store
    load = Load(tickets, kept)
    try:
        _outage(server, postgres, load, (kept, used, revoked), handle, lookups)
    finally:
        load.stop()


def _outage(server: Server, postgres: PostgresServer, load: Load,
            made: tuple[bytes, bytes, bytes], handle: bytes, lookups: list[int]) -> None:
    tickets, admin = server.tickets, server.admin
    kept, used, revoked = made
    store = server.running.authority.store
    down = time.monotonic()   # the last confirmation was at most one heartbeat before
    postgres.halt()
    wait_until(lambda: store.down_since is not None, timeout=SLACK)   # the feed noticed
    # -- within store.max_staleness: redeems without consume answer from the cache ---------------
    assert redeem(tickets, kept).result == OK
    assert redeem(tickets, used).result == OK       # its consumed entry is not looked up
    assert redeem(tickets, revoked).result == REVOKED
    asked = len(lookups)
    assert [redeem(tickets, kept).result for _ in range(5)] == [OK] * 5
    assert len(lookups) == asked                    # the store is not asked again
    assert refused(lambda: redeem(tickets, kept, consume=True)) == UNAVAILABLE
    assert refused(lambda: tickets.ConsumeTicket(authority_pb2.ConsumeTicketRequest(
        ticket_id=handle))) == UNAVAILABLE
    assert refused(lambda: issue(tickets, 4)) == UNAVAILABLE   # a seal reservation needed
    for call in (lambda: admin.RotateKey(admin_pb2.RotateKeyRequest()),
                 lambda: admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(
                     id_i=sample_state(5).id_i)),
                 lambda: admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest())):
        assert refused(call) == UNAVAILABLE
    status = admin.GetStatus(admin_pb2.GetStatusRequest())
    assert not status.store_reachable
    assert status.store_error.startswith("state store unreachable: ")
    assert postgres.password not in status.store_error
    assert status.counters[UNCHECKED] >= 7
    assert server.health.status == SERVING
    # -- past it: NOT_SERVING, and redeems refused -------------------------------------------------
    stale = server.health.wait_for(NOT_SERVING, timeout=STALENESS + SLACK)
    assert stale - down >= STALENESS - TIMING.heartbeat_interval - 0.1   # not before the bound
    assert refused(lambda: redeem(tickets, kept)) == UNAVAILABLE
    # the load has answers from the stale window before the database returns (its pace is 20 ms
    # plus a call; without this wait, a quick refusal and restart left the window empty)
    wait_until(lambda: bool(load.between(stale + 0.1, math.inf)), timeout=SLACK, poll=0.01)
    # -- the database returns: everything works again within 2 s ---------------------------------
    resuming = time.monotonic()   # redeems may answer again before pg_ctl start -w returns
    postgres.resume()
    back = time.monotonic()
    serial = iter(range(100, 10_000))

    def recovered() -> bool:
        if server.health.status != SERVING:
            return False
        try:   # a new seal reservation, then a consume
            fresh = issue(tickets, next(serial)).ticket
            return bool(redeem(tickets, fresh, consume=True).result == OK)
        except grpc.RpcError as err:
            assert err.code() == UNAVAILABLE
            return False

    wait_until(recovered, timeout=max(RECOVERY - (time.monotonic() - back), 0.01), poll=0.02)
    assert time.monotonic() - back <= RECOVERY
    assert redeem(tickets, used).result == REPLAYED            # looked up again
    admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(id_i=sample_state(6).id_i))
    assert admin.GetStatus(admin_pb2.GetStatusRequest()).store_reachable
    time.sleep(0.2)
    # -- under load: only answers or UNAVAILABLE, never an internal error ------------------------
    assert {name for _, name in load.outcomes} <= {"REDEEM_RESULT_OK", "UNAVAILABLE"}
    assert load.between(down, stale) >= {"REDEEM_RESULT_OK"}
    assert load.between(stale + 0.1, resuming) == {"UNAVAILABLE"}
    assert "REDEEM_RESULT_OK" in load.between(time.monotonic() - 0.2, time.monotonic())


# -- what only the store could settle -----------------------------------------------------------

CONSUMED = ("ticket_authority_consumed_tickets", ())
STORE_UP = ("ticket_authority_store_up", ())


def under_unknown_key(ticket: bytes) -> bytes:
    """``ticket`` with its key id replaced by one no replica made: to this replica, a ticket
    of a key another replica may have just made (it cannot tell them apart without the
    store)."""
    parsed = parse_ticket(ticket)
    return assemble_ticket(encode_header(bytes(8), parsed.version), parsed.sealed)


@requires_softhsm
@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_what_only_the_store_could_settle_is_unavailable_during_an_outage(
        tmp_path: Path, database: tuple[PostgresServer, str], mode: str) -> None:
    postgres, dsn = database
    config = outage_config(tmp_path, dsn, mode)
    config = replace(config, store=StoreSettings(max_staleness=60.0),   # not the object here
                     server=replace(config.server, metrics_listen="127.0.0.1:0"))
    server = Server(config)
    try:
        _unsettled_during_an_outage(server, postgres)
    finally:
        server.close()


def _unsettled_during_an_outage(server: Server, postgres: PostgresServer) -> None:
    tickets, admin = server.tickets, server.admin
    port = server.running.metrics_port
    assert port is not None
    kept, used = (issue(tickets, n).ticket for n in (1, 2))
    assert redeem(tickets, used, consume=True).result == OK
    stranger = under_unknown_key(kept)
    assert redeem(tickets, stranger).result == INVALID     # the store up: it has no such key
    asked = time.monotonic()
    metrics = scrape(port)
    assert (metrics[CONSUMED], metrics[STORE_UP]) == (1, 1)
    postgres.halt()
    store = server.running.authority.store
    wait_until(lambda: store.down_since is not None, timeout=SLACK)
    time.sleep(max(asked + UNKNOWN_KEY_REREAD_GAP - time.monotonic(), 0))   # a re-read is due
    # -- unary and batch: UNAVAILABLE for that ticket alone ---------------------------------------
    assert refused(lambda: redeem(tickets, stranger)) == UNAVAILABLE
    assert redeem(tickets, kept).result == OK
    batch = tickets.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
        authority_pb2.RedeemTicketRequest(ticket=t)
        for t in (kept, stranger, b"\x01" * 150, b"")]))
    assert batch.items[0].redeemed.result == OK
    assert batch.items[1].WhichOneof("outcome") == "error"
    assert batch.items[1].error.code == UNAVAILABLE.value[0]
    assert batch.items[1].error.message.startswith("items[1].ticket: ")
    assert batch.items[2].redeemed.result == INVALID            # malformed: no store needed
    assert batch.items[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # -- /metrics and GetStatus answer with what they know ----------------------------------------
    metrics = scrape(port)
    assert CONSUMED not in metrics and metrics[STORE_UP] == 0
    assert metrics[("ticket_authority_tickets_issued_total", ())] == 2
    status = admin.GetStatus(admin_pb2.GetStatusRequest())
    assert not status.store_reachable and status.sealing_key_id
    assert status.store == "postgresql" and status.active_keys == 1
    # -- back: the same ticket is INVALID again, the gauge back -----------------------------------
    postgres.resume()
    wait_until(lambda: store.down_since is None, timeout=SLACK)

    def settled() -> bool:
        try:
            return bool(redeem(tickets, stranger).result == INVALID)
        except grpc.RpcError as err:
            assert err.code() == UNAVAILABLE
            return False

    wait_until(settled, timeout=UNKNOWN_KEY_REREAD_GAP + SLACK, poll=0.1)
    metrics = scrape(port)
    assert (metrics[CONSUMED], metrics[STORE_UP]) == (1, 1)


# -- the pool's check ---------------------------------------------------------------------------

def test_a_connection_the_server_ended_is_not_handed_out(
        database: tuple[PostgresServer, str]) -> None:
    """The server ends every session of the database (a restart, an operator's
    pg_terminate_backend): the next call does not fail on the dead pooled connection, it
    gets a new one."""
    from authority.store.postgres import PostgresStore

    postgres, dsn = database
    store = PostgresStore(PostgresSettings(dsn=Secret(dsn), pool_size=1))
    try:
        assert store.consumed_count(0.0) == 0
        end_sessions(postgres, dsn)
        assert store.consume_many([(bytes(16), 10**10)], 0.0) == [True]
        end_sessions(postgres, dsn)
        assert store.consumed_among([bytes(16)], 0.0) == {bytes(16)}
    finally:
        store.close()


def end_sessions(postgres: PostgresServer, dsn: str) -> None:
    """End every session of the database and wait until they are gone (pg_terminate_backend
    only signals them)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    postgres.terminate_connections(dsn)
    name = conninfo_to_dict(dsn)["dbname"]

    def gone() -> bool:
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                               (name,)).fetchone()
        return row is not None and row[0] == 0

    wait_until(gone, timeout=SLACK, poll=0.01)


# -- the setting --------------------------------------------------------------------------------

def test_store_max_staleness_setting(tmp_path: Path) -> None:
    assert load_toml(tmp_path, "").store == StoreSettings(max_staleness=5.0)
    assert load_toml(tmp_path, "[store]\nmax_staleness = 2\n").store.max_staleness == 2.0
    for text in ("[store]\nmax_staleness = 1.5\n",
                 "[cluster]\nheartbeat_interval = 3\nreplica_timeout = 6\n"
                 "lease_duration = 6\n"):
        with pytest.raises(ConfigError, match=r"^store\.max_staleness: must be at least twice"):
            load_toml(tmp_path, text)
    with pytest.raises(ConfigError, match=r"^store\.nodes:"):
        load_toml(tmp_path, "[store]\nnodes = 3\n")
