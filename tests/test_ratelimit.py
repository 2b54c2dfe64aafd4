"""Hostile volume: per-client token buckets (RESOURCE_EXHAUSTED, batch items count, streams
charged per message, bounded client table) and the bounded call queue
(``server.max_concurrent_rpcs``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
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
from authority.certs import init_dev_pki
from authority.errors import ConfigError
from authority.service.ratelimit import TokenBuckets
from tests.conftest import Harness, issue, load_toml, make_config, sample_state
from tests.test_tls_roles import SERVER_NAME, Tls, tls_settings


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_then_rate() -> None:
    t = FakeTime()
    b = TokenBuckets(rate=2.0, burst=3, now=t)
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(0.5)   # empty: one token in half a second
    assert b.take("b") == 0.0                  # another client has its own bucket
    t.now += 0.5
    assert b.take("a") == 0.0
    assert b.take("a") > 0
    t.now += 100                               # refills up to the burst, no further
    assert [b.take("a") for _ in range(4)][-1] > 0


def test_a_batch_costs_its_items_and_may_exceed_the_burst_once() -> None:
    t = FakeTime()
    b = TokenBuckets(rate=10.0, burst=5, now=t)
    assert b.take("a", cost=4) == 0.0
    assert b.take("a", cost=4) > 0             # 1 token left, 4 needed
    t.now += 10
    assert b.take("a", cost=50) == 0.0         # a full bucket lets a big batch through ...
    t.now += 4.0
    assert b.take("a") > 0                     # ... and the debt (45 tokens) is paid first
    t.now += 0.7
    assert b.take("a") == 0.0


def test_the_client_table_is_bounded() -> None:
    b = TokenBuckets(rate=1.0, burst=1, max_clients=100, now=FakeTime())
    for n in range(10_000):
        b.take(f"ipv4:10.0.{n // 256}.{n % 256}")
    assert len(b) == 100


def limited(h: Harness, rate: float = 0.01, burst: int = 3, **server: Any) -> Harness:
    config = make_config(h.state_dir, mode=h.mode)
    h.start(replace(config, server=replace(config.server, rate_limit_per_s=rate,
                                           rate_burst=burst, **server)))
    return h


@pytest.fixture(params=["aio", "threads"])
def harness_off(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Not started yet (``limited`` starts it), on each server mode."""
    h = Harness(tmp_path / "state", mode=request.param)
    yield h
    h.stop()


def exhausted(call: Any) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return str(err.value.details())


def test_rate_limit_on_the_service(harness_off: Harness) -> None:
    h = limited(harness_off, burst=3)
    stub = h.tickets
    issued = [issue(stub) for _ in range(3)]
    details = exhausted(lambda: issue(stub))
    assert details.startswith("rate limit: 0.01 requests/s (burst 3) exceeded")
    assert "IssueTicket" in details
    exhausted(lambda: h.admin.GetStatus(admin_pb2.GetStatusRequest()))  # same client
    health = health_pb2_grpc.HealthStub(h.channel())   # health is never limited
    for _ in range(5):
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert all(i.ticket for i in issued)


def test_batch_items_and_stream_messages_count(harness_off: Harness) -> None:
    h = limited(harness_off, burst=4)
    stub = h.tickets
    batch = authority_pb2.IssueTicketsRequest(
        items=[authority_pb2.IssueTicketRequest(state=sample_state(n)) for n in range(3)])
    assert len(stub.IssueTickets(batch).items) == 3
    exhausted(lambda: stub.IssueTickets(batch))          # 1 token left, 3 items
    h.stop()
    h.running = None
    h = limited(h, burst=2)
    replies = h.tickets.IssueTicketStream(iter([
        authority_pb2.IssueTicketsRequest(items=[
            authority_pb2.IssueTicketRequest(state=sample_state())])] * 3))
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in replies:
            got.append(reply)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(got) == 2


def test_each_certificate_identity_has_its_own_bucket(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state")
    config = replace(make_config(h.state_dir), tls=tls_settings(pki))
    running = h.start(replace(config, server=replace(config.server, rate_limit_per_s=0.01,
                                                     rate_burst=2)))
    try:
        tls = Tls(h, pki, running.address)
        gateway = authority_pb2_grpc.TicketAuthorityStub(tls.gateway())
        issue(gateway)
        issue(gateway)
        exhausted(lambda: issue(gateway))
        admin = admin_pb2_grpc.TicketAdminStub(tls.admin())   # same host, other identity
        assert admin.GetStatus(admin_pb2.GetStatusRequest()).sealing_key_id
    finally:
        h.stop()


def test_calls_beyond_max_concurrent_rpcs_are_refused_not_queued(harness_off: Harness) -> None:
    config = make_config(harness_off.state_dir, mode=harness_off.mode)
    h = harness_off
    h.start(replace(config, server=replace(config.server, max_concurrent_rpcs=1)))
    stub = h.tickets
    release = threading.Event()

    def held() -> Iterator[Any]:   # one request, then the stream stays open until released
        yield authority_pb2.RedeemTicketsRequest(
            items=[authority_pb2.RedeemTicketRequest(ticket=b"x" * 64)])
        release.wait(30)

    open_call = stub.RedeemTicketStream(held())
    try:
        assert len(next(open_call).items) == 1   # the stream now holds the only slot
        for _ in range(3):
            assert "Concurrent RPC limit" in exhausted(lambda: issue(stub))
    finally:
        release.set()
        list(open_call)
    for attempt in range(50):   # the server frees the slot just after the client sees the end
        try:
            issue(stub)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 49
            time.sleep(0.05)


@pytest.mark.parametrize(("text", "setting"), [
    ("rate_limit_per_s = -1", "server.rate_limit_per_s"),
    ("rate_burst = 0", "server.rate_burst"),
    ("max_concurrent_rpcs = 0", "server.max_concurrent_rpcs"),
])
def test_limits_are_validated(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting}:"):
        load_toml(tmp_path, f"[server]\n{text}\n")
    server = load_toml(tmp_path, "[server]\nrate_limit_per_s = 50\nrate_burst = 10\n").server
    assert (server.rate_limit_per_s, server.rate_burst) == (50.0, 10)
