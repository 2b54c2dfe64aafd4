"""Scenario 1, device loss (PKCS#11): the embedded SoftHSM2 token's directory is moved away
mid-load (the token becomes unreadable), then moved back.

Expected: calls UNAVAILABLE, never INVALID for a valid ticket; health NOT_SERVING while it is
gone; service back by itself within 2 s of the device's return (the time is printed); tickets
issued before redeem afterwards; no acknowledged consume lost."""

from __future__ import annotations

import time
from pathlib import Path

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.chaos.core import Outcome
from authority.chaos.load import Load
from authority.chaos.servers import (
    SERVING,
    health,
    round_trip,
    settle_outage,
    single,
    time_until,
)

NAME = "device-pkcs11"


def run(work: Path, quick: bool) -> Outcome:
    """Raises: AssertionError (the server did not start), grpc.RpcError (it never came back)."""
    out = Outcome(NAME, "token directory moved away, then back")
    server = single(work)
    tokens = server.state / "hsm" / "tokens"
    away = tokens.with_name("tokens.away")
    try:
        before = [server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=_state(n)), timeout=5).ticket for n in range(20)]
        outage = 2.0 if quick else 10.0
        with Load([lambda: server.tickets], max_seconds=4 * outage + 20) as load:
            time.sleep(1.0)
            tokens.rename(away)
            down = time_until(lambda: health(server) not in (SERVING, None), 10.0)
            out.check("health NOT_SERVING within 10 s of the device's loss", down is not None)
            time.sleep(outage)
            away.rename(tokens)
            back = time_until(lambda: round_trip(server) and health(server) == SERVING,
                              30.0)
            time.sleep(1.0)
        tally = load.tally
        settle_outage(out, tally, server, before, back, outage)
    finally:
        if away.exists() and not tokens.exists():
            away.rename(tokens)
        server.stop()
    return out


def _state(n: int) -> authority_pb2.ResumptionState:
    from authority.bench.workload import proto_state

    return proto_state(10_000 + n)
