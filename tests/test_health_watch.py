"""``grpc.health.v1.Health/Watch`` (client-side health checking, what load balancers use) over
real gRPC on both server modes: SERVING while up, NOT_SERVING on a graceful stop (issue 12,
point 5)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority.service.registry import TICKET_SERVICE
from tests.conftest import Harness

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(params=["aio", "threads"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "state", "pkcs11", request.param)
    h.start()
    yield h
    h.stop()


@pytest.mark.parametrize("service", ["", TICKET_SERVICE])
def test_watch_reports_serving_then_not_serving_on_a_graceful_stop(server: Harness,
                                                                   service: str) -> None:
    assert server.running is not None
    channel = grpc.insecure_channel(server.running.address)
    try:
        updates = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert next(updates).status == SERVING
        running = server.running
        stopping = threading.Thread(target=running.stop, kwargs={"grace": 0.5})
        stopping.start()
        try:
            assert next(updates).status == NOT_SERVING
        finally:
            stopping.join(30)
            server.running = None
    finally:
        channel.close()


def test_watch_of_an_unknown_service_says_service_unknown(server: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel())
    updates = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert next(updates).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    updates.cancel()


def test_watches_ending_during_a_graceful_stop_do_not_hang_it(tmp_path: Path) -> None:
    """Watch answers without holding a worker on the thread-pool server; Watches that end
    while the stop reports NOT_SERVING must not deadlock the server (the health servicer
    sends while holding the lock its end-of-call callback takes)."""
    for attempt in range(3):
        h = Harness(tmp_path / f"state{attempt}", "pkcs11", "threads")
        running = h.start()
        channel = grpc.insecure_channel(running.address)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
                       for _ in range(40)]   # more than the 16 workers
            assert {next(w).status for w in watches} == {SERVING}
            cancelling = threading.Thread(target=_cancel_all, args=(watches,))
            stopping = threading.Thread(target=running.stop, kwargs={"grace": 1.0})
            cancelling.start()
            stopping.start()
            stopping.join(20)
            assert not stopping.is_alive(), "the server's stop hung"
            cancelling.join(20)
        finally:
            channel.close()


def _cancel_all(calls: list[Any]) -> None:
    for call in calls:
        call.cancel()
