"""``ticket-authority chaos --quick`` (issue 16): each scenario CI runs holds (0 wrong answers,
0 acknowledged consumes lost, recovery within its bound), and the command prints its table.
The full run's figures are in docs/reliability.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from authority.chaos import LONG, SCENARIOS, run_one, selected
from authority.chaos.core import Outcome, table
from tests.pkcs11_fixtures import requires_softhsm

IN_CI = ["device-pkcs11", "clock-step"]


@requires_softhsm
@pytest.mark.parametrize("name", IN_CI)
def test_the_quick_scenario_holds(name: str) -> None:
    outcome = run_one(name, quick=True)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.wrong == 0 and outcome.lost == 0


def test_a_scenario_that_breaks_is_reported_not_held() -> None:
    """A check that fails makes the row NO, with the check named under the table."""
    outcome = Outcome("x", "nothing")
    outcome.check("the impossible held", False)
    assert not outcome.conclude().held
    printed = table([outcome])
    assert "NO" in printed and "did not hold: the impossible held" in printed


def test_the_selection_and_its_refusals() -> None:
    assert "soak" not in selected(None) and set(selected(None)) == set(SCENARIOS) - LONG
    assert selected("device-pkcs11, soak") == ["device-pkcs11", "soak"]
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        selected("nope")
    done = subprocess.run([sys.executable, "-m", "authority.chaos", "--only", "nope"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown scenario" in done.stderr
