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
from authority.chaos.core import Outcome
from authority.chaos.load import Tally, lost_consumes

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


#: seconds within which a server must serve again once its device is back (the issue's bound)
RECOVERY_BOUND = 2.0


def settle_outage(out: Outcome, tally: Tally, server: ServeProcess, before: list[bytes],
                  back: float | None, outage: float) -> None:
    """Record a device outage's outcome in ``out``: the recovery against ``RECOVERY_BOUND``,
    calls failed meanwhile, the load's calls and wrong answers, lost consumes, and that the
    tickets issued ``before`` still redeem OK. Raises: grpc.RpcError (the server never came
    back: a consumed ticket could not be asked again)."""
    out.recovery_s = back
    out.check(f"service back within {RECOVERY_BOUND} s of the device's return",
              back is not None and back <= RECOVERY_BOUND)
    out.check("calls failed while the device was gone", tally.failing > 0)
    out.calls, out.wrong = tally.calls, len(tally.wrong)
    out.lost = lost_consumes(tally, server.tickets)
    still = [server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=t),
                                         timeout=5).result for t in before]
    out.check("tickets issued before the loss redeem OK after it", all(r == OK for r in still))
    out.detail = "; ".join(tally.wrong[:3])
    out.figures.update({"failing_calls": tally.failing, "outage_s": outage})
