"""Scenario 6 (issue 16), a replica killed under load, as CI runs it: three replicas on one
SoftHSM2 token and a PostgreSQL database; the lease holder SIGKILLed (the lease moves, the new
holder rotates), then the next holder SIGSTOPped right before its fenced commit for longer
than the lease: resumed, its commit is refused (StaleFence), its key is in neither the ring
nor the token, the lease epoch moved; 0 wrong answers, no acknowledged consume lost."""

from __future__ import annotations

import pytest

from authority import devdb
from authority.chaos import run_one
from authority.chaos.core import table
from tests.pkcs11_fixtures import requires_softhsm


@requires_softhsm
@pytest.mark.skipif(devdb.unavailable() is not None, reason=str(devdb.unavailable()))
def test_the_quick_scenario_holds() -> None:
    outcome = run_one("replica-kill", quick=True)
    print("\n" + table([outcome]), outcome.figures)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.wrong == 0 and outcome.lost == 0
    assert outcome.figures["stale_keys"] >= 1 and outcome.figures["stopped_s"] > 1.0
    assert len(outcome.checks) >= 10
