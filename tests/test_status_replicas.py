"""GetStatus and ``ticket-authority status`` show the replicas, their last heartbeat, which one
holds the maintenance lease, the store and its schema version (issue 13): two real servers on
one PostgreSQL database and one SoftHSM2 token, over real gRPC, on one manual clock; one server
on SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, admin_pb2_grpc
from authority.admin_cli import run as run_admin
from authority.app import Authority
from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.softhsm import provision_embedded_token
from authority.cli import build_parser
from authority.clock import ManualClock
from authority.config import ClusterSettings, Config, PostgresSettings, Secret
from authority.service.server import RunningServer, build_server
from authority.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from tests.conftest import START, Harness, make_config
from tests.pkcs11_fixtures import requires_softhsm
from tests.postgres_fixtures import (  # noqa: F401
    PostgresServer,
    postgres_dsn_fixture,
    postgres_server_fixture,
)

pytestmark = requires_softhsm

TIMING = ClusterSettings(heartbeat_interval=1.0, replica_timeout=5.0, lease_duration=5.0)


class Pair:
    """Replicas A and B (servers on one database, one token, one manual clock)."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.clock = ManualClock(START)
        token = provision_embedded_token(tmp_path / "hsm")
        self.servers: list[RunningServer] = []
        self.channels: list[grpc.Channel] = []
        for n in range(2):
            self.clock.advance(n)   # B starts 1 s after A: listed after it
            config = replace(make_config(tmp_path / f"replica{n}", "pkcs11", "threads"),
                             pkcs11=replace(token, sessions=2), cluster=TIMING,
                             postgresql=PostgresSettings(dsn=Secret(dsn), pool_size=4))
            config.state_dir.mkdir(mode=0o700)
            self.servers.append(build_server(config, authority=self._replica(config)))
            self.channels.append(grpc.insecure_channel(self.servers[-1].address))

    def _replica(self, config: Config) -> Authority:
        from authority.store.postgres import PostgresStore

        assert config.pkcs11 is not None and config.postgresql is not None
        authority = Authority(config, Pkcs11Backend.open(config.pkcs11),
                              PostgresStore(config.postgresql), self.clock)
        authority.ring.load()
        authority.policy.load()
        return authority

    @property
    def a(self) -> Authority:
        return self.servers[0].authority

    @property
    def b(self) -> Authority:
        return self.servers[1].authority

    def status(self, n: int = 0) -> admin_pb2.GetStatusResponse:
        stub = admin_pb2_grpc.TicketAdminStub(self.channels[n])
        return stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for server in self.servers:
            server.stop(grace=1.0)


@pytest.fixture
def pair(tmp_path: Path, postgres_dsn: str) -> Iterator[Pair]:
    made = Pair(tmp_path, postgres_dsn)
    yield made
    made.close()


def test_status_shows_the_replicas_the_lease_and_the_store(pair: Pair,
                                                          postgres_server: PostgresServer
                                                          ) -> None:
    from authority.store.postgres import SCHEMA_VERSION

    assert pair.a.heartbeat()                 # A takes the maintenance lease
    assert not pair.b.heartbeat()
    status = pair.status()
    assert (status.store, status.store_schema_version) == ("postgresql", SCHEMA_VERSION)
    assert status.store_location.startswith(f"host={postgres_server.directory} port=")
    assert "dbname=t_" in status.store_location
    assert postgres_server.password not in str(status)
    assert status.store_reachable and not status.store_error
    assert status.replica_id == pair.a.replica.replica_id
    now = int(START) + 1
    assert status.server_time.seconds == now
    rows = [(r.replica_id, r.host, r.pid, r.started_at.seconds, r.last_heartbeat.seconds,
             r.live, r.holds_lease, r.this_replica) for r in status.replicas]
    me = pair.a.replica
    assert rows == [(me.replica_id, me.host, me.pid, now - 1, now, True, True, True),
                    (pair.b.replica.replica_id, me.host, me.pid, now, now, True, False, False)]
    lease = status.maintenance_lease
    assert (lease.holder, lease.epoch, lease.expires_at.seconds, lease.expired) == (
        me.replica_id, 1, now + TIMING.lease_duration, False)
    assert [r.this_replica for r in pair.status(1).replicas] == [False, True]

    pair.clock.advance(TIMING.replica_timeout + 1)   # B falls silent; A's lease ran out
    status = pair.status(1)
    assert [(r.live, r.holds_lease) for r in status.replicas] == [(False, False),
                                                                  (False, False)]
    assert status.maintenance_lease.expired
    assert pair.b.heartbeat()                  # B takes the lease over: epoch 2
    status = pair.status()
    assert [(r.live, r.holds_lease) for r in status.replicas] == [(False, False), (True, True)]
    assert (status.maintenance_lease.holder, status.maintenance_lease.epoch) == (
        pair.b.replica.replica_id, 2)


def admin_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``ticket-authority ARGS`` in this process; its standard output."""
    assert run_admin(build_parser().parse_args(list(args))) == 0
    return capsys.readouterr().out


def test_status_command_prints_them(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    from authority.store.postgres import SCHEMA_VERSION

    pair.a.heartbeat()
    pair.clock.advance(0.5)
    pair.b.heartbeat()
    text = admin_cli(capsys, "status", "--listen", pair.servers[0].address)
    a, b = pair.a.replica.replica_id, pair.b.replica.replica_id
    assert f"(schema {SCHEMA_VERSION})" in text and "\nstore              postgresql host=" in text
    assert "\nstore reachable    yes\n" in text
    assert f"\nmaintenance lease  {a} (epoch 1, until " in text
    assert f"\nreplica            {a}\n" in text
    table = text[text.index("\nREPLICA "):].splitlines()[1:]
    assert table[0].startswith("REPLICA") and table[1].startswith("-------")
    assert table[2].split()[0] == f"{a}*" and table[3].split()[0] == b
    assert table[2].split()[-2:] == ["yes", "holder"] and table[3].split()[-2:] == ["yes", "-"]
    assert " 0.5 s ago " in table[2] and " 0.0 s ago " in table[3]
    reply = json.loads(admin_cli(capsys, "status", "--json", "--listen",
                                 pair.servers[0].address))
    assert reply["store_schema_version"] == SCHEMA_VERSION and reply["store_reachable"]
    assert [r["replica_id"] for r in reply["replicas"]] == [a, b]
    assert reply["maintenance_lease"]["holder"] == a


def test_status_on_sqlite_shows_the_file_and_one_replica(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", "pkcs11", "threads")
    h.start()
    try:
        h.authority.maintain()   # the lease, taken by the only replica
        status = h.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert (status.store, status.store_location, status.store_schema_version) == (
            "sqlite", str(tmp_path / "state" / "authority.db"), SQLITE_SCHEMA)
        assert status.store_reachable
        assert [(r.replica_id, r.this_replica, r.holds_lease) for r in status.replicas] == [
            (status.replica_id, True, True)]
        assert status.max_staleness_seconds == 0.0    # maintenance is not running here
    finally:
        h.stop()
