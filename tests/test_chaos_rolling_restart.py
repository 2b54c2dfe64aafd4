"""Chaos scenario rolling-restart (issue 16, brief 16E), as CI runs it: three replicas on one
SoftHSM2 token and a PostgreSQL database, SIGTERMed and started again one after another under
load from several threads, each twice: every call OK or UNAVAILABLE (before the drain of
authority/service/interceptors.py: 6 CANCELLED in 6 SIGTERMs), 0 acknowledged consumes lost,
each replica drained, exited 0 and served again."""

from __future__ import annotations

import socket

import pytest

from authority import devdb
from authority._proto.ticketauthority.v1 import authority_pb2_grpc
from authority.chaos import run_one
from authority.chaos.core import table
from authority.chaos.load import Load
from authority.chaos.rolling_restart import LOADS
from authority.chaos.servers import time_until
from tests.pkcs11_fixtures import requires_softhsm


@requires_softhsm
@pytest.mark.skipif(devdb.unavailable() is not None, reason=str(devdb.unavailable()))
def test_the_quick_scenario_holds() -> None:
    outcome = run_one("rolling-restart", quick=True)
    print("\n" + table([outcome]), outcome.figures)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.wrong == 0 and outcome.lost == 0
    assert outcome.figures["restarts"] == 6 and outcome.figures["loads"] == LOADS
    # the path under test was taken: calls refused by drains, consumes acknowledged
    assert outcome.figures["refused_in_drains"] > 0
    assert outcome.figures["acknowledged_consumes"] > 0


def test_the_load_counts_failing_calls_by_status() -> None:
    """What the scenario's 'every failing call answered UNAVAILABLE' reads: a load against a
    port nobody listens on counts each call UNAVAILABLE."""
    import grpc

    with socket.socket() as probe:   # a free port, then closed: connections are refused
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    channel = grpc.insecure_channel(address)
    try:
        load = Load([lambda: authority_pb2_grpc.TicketAuthorityStub(channel)], max_calls=20,
                    max_seconds=10.0).start()
        time_until(lambda: load.tally.failing + len(load.tally.wrong) >= 20, 10.0)
        tally = load.stop()
    finally:
        channel.close()
    assert tally.calls == 20 and tally.failing == 20 and not tally.wrong
    assert tally.failing_codes == {"UNAVAILABLE": 20}
