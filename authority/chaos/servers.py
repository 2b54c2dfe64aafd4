"""Servers for the scenarios: one ``ticket-authority serve`` on loopback with its own state
directory (the embedded SoftHSM2 token or swtpm), or replicas on a PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.bench.serveproc import ServeProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
OK = authority_pb2.REDEEM_RESULT_OK


def single_settings(state: Path, backend: str = "pkcs11", extra: str = "") -> str:
    """The TOML of one server on loopback port 0, no metrics listener."""
    return (f'state_dir = "{state}"\nbackend = "{backend}"\n'
            '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\n' + extra)


def single(work: Path, name: str = "a", backend: str = "pkcs11",
           extra: str = "") -> ServeProcess:
    """A started single server in ``work``/``name``. Raises: AssertionError (did not start)."""
    server = ServeProcess(work, name, single_settings(work / name, backend, extra))
    server.serve()
    return server


def health(server: ServeProcess) -> int | None:
    """The server's overall health status, None when it does not answer."""
    try:
        reply = health_pb2_grpc.HealthStub(server.channel()).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return None
    return int(reply.status)


def round_trip(server: ServeProcess, n: int = 0) -> bool:
    """Whether an issue then a redeem of its ticket both answer OK now."""
    from authority.bench.workload import proto_state

    try:
        issued = server.tickets.IssueTicket(
            authority_pb2.IssueTicketRequest(state=proto_state(n)), timeout=2.0)
        reply = server.tickets.RedeemTicket(
            authority_pb2.RedeemTicketRequest(ticket=issued.ticket), timeout=2.0)
    except grpc.RpcError:
        return False
    return bool(reply.result == OK)


def time_until(check: Callable[[], bool], timeout: float, poll: float = 0.05) -> float | None:
    """Seconds until ``check`` is true, None if not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(poll)
    return None
