"""Scenario 2 of ``ticket-authority chaos`` (issue 16): the swtpm a server uses is killed
mid-load and started again on its state; the quick run holds (0 wrong answers, 0 acknowledged
consumes lost, back within 2 s, no lockout, nothing left loaded in the TPM)."""

from __future__ import annotations

from authority.chaos import run_one
from authority.chaos.core import table
from tests.tpm_fixtures import requires_tpm


@requires_tpm
def test_the_quick_device_tpm_scenario_holds() -> None:
    outcome = run_one("device-tpm", quick=True)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.figures["failing_calls"] > 0
    checked = {what for what, _ in outcome.checks}
    assert "no transient object left in the TPM" in checked
    assert "the TPM's lockout counter did not grow" in checked
