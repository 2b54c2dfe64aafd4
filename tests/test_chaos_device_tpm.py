"""Scenario 2 of ``ticket-authority chaos`` (issue 16): the swtpm a server uses is killed
mid-load and started again on its state; the quick run holds (0 wrong answers, 0 acknowledged
consumes lost, back within 2 s, no lockout, nothing left loaded in the TPM)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from authority.chaos import run_one
from authority.chaos.core import table
from authority.errors import DeviceUnavailable
from authority.metrics import InstrumentedBackend, Metrics
from authority.serving import DEVICE_DOWN_AFTER, DeviceHealth
from tests.tpm_fixtures import (  # noqa: F401
    HAVE_PYTSS,
    HAVE_SWTPM,
    requires_tpm,
    swtpm_fixture,
)

if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.tpm import SwtpmProcess, TpmBackend, open_tpm_backend
    from authority.config import TpmSettings


@requires_tpm
def test_the_quick_device_tpm_scenario_holds() -> None:
    outcome = run_one("device-tpm", quick=True)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.figures["failing_calls"] > 0
    checked = {what for what, _ in outcome.checks}
    assert "no transient object left in the TPM" in checked
    assert "the TPM's lockout counter did not grow" in checked


@requires_tpm
def test_the_quick_embedded_swtpm_scenario_holds() -> None:
    """Scenario 2b: the server's own swtpm killed -9 under load, twice, with the TPM backend in
    the server and in a device process. Before: never served again (no round trip within the
    10 s the scenario waits: the server did not start its swtpm again)."""
    outcome = run_one("device-tpm-embedded", quick=True)
    assert outcome.held, table([outcome])
    checked = {what for what, _ in outcome.checks}
    for name in ("in-server", "device-process"):
        assert f"{name}: each restart logged once" in checked
        assert outcome.figures[f"{name}_failing_calls"] > 0


# -- defects the scenario found ------------------------------------------------------------------

KEY = bytes.fromhex("0102030405060708")


def _dead_backend(swtpm: SwtpmProcess, tmp_path: Path) -> TpmBackend:
    """A TPM backend with a key, on ``swtpm``, which is then killed (no TPM2_Shutdown)."""
    backend = open_tpm_backend(TpmSettings(tcti=swtpm.tcti, key_dir=tmp_path / "keys"),
                               tmp_path / "tpm")
    backend.create_key(KEY)
    swtpm.kill()
    return backend


@requires_tpm
def test_a_key_listing_or_refresh_does_not_bring_a_dead_tpm_back_to_serving(
        swtpm: SwtpmProcess, tmp_path: Path) -> None:
    """The TPM backend lists its keys from the blob directory without asking the TPM, and its
    refresh does nothing, so either working says nothing of the device. Before: the
    heartbeat's key ring sync (a listing) and the device probe's refresh counted as device
    successes and health went SERVING about every other second while the swtpm was dead
    (``down`` was False after the listing here, and after the refresh once that was fixed)."""
    backend = _dead_backend(swtpm, tmp_path)
    reports: list[bool] = []
    instrumented = InstrumentedBackend(backend, Metrics(), DeviceHealth(reports.append))
    try:
        deadline = time.monotonic() + DEVICE_DOWN_AFTER + 0.3
        while time.monotonic() < deadline:
            with pytest.raises(DeviceUnavailable):
                instrumented.seal(KEY, b"aad", b"x")
            time.sleep(0.05)
        assert instrumented.health.down and reports == [False]
        assert instrumented.list_keys() == {KEY}
        assert instrumented.health.down and reports == [False]
        instrumented.refresh()
        assert instrumented.health.down and reports == [False]
    finally:
        backend.close()


@requires_tpm
def test_a_dead_tpm_is_not_logged_once_per_call(swtpm: SwtpmProcess, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Calls while the TPM is unreachable are UNAVAILABLE; the reconnection is announced once
    per outage, not once per call (before: one WARNING per call, 3,600 lines in a 2 s outage
    of the scenario, each with five lines of the TSS library's own). Once the swtpm is back
    on its state, the next call after the retry interval reconnects and the key opens."""
    backend = _dead_backend(swtpm, tmp_path)
    restarted: SwtpmProcess | None = None
    try:
        with caplog.at_level(logging.INFO, logger="authority.backends.tpm.connection"):
            started = time.monotonic()
            while time.monotonic() - started < 1.0:
                with pytest.raises(DeviceUnavailable):
                    backend.seal(KEY, b"aad", b"x")
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) <= 2, [r.getMessage() for r in warnings]
            attempts = backend.counters()["reconnects"]
            assert 1 <= attempts <= 20, attempts
            restarted = SwtpmProcess.start(swtpm.state_dir)
            back = time.monotonic()
            while True:
                try:
                    sealed = backend.seal(KEY, b"aad", b"x")
                    break
                except DeviceUnavailable:
                    assert time.monotonic() - back < 1.0, "not back within 1 s"
                    time.sleep(0.01)
            assert backend.unseal(KEY, b"aad", sealed) == b"x"
            assert any("reconnected" in r.getMessage() for r in caplog.records)
    finally:
        backend.close()
        if restarted is not None:
            restarted.stop()


@requires_tpm
def test_the_quick_device_tpm_scenario_holds_with_a_device_process(tmp_path: Path) -> None:
    """The same with ``server.device_processes = 1``: the TPM backend in a process of its own
    (its health reaches the server's through the same instrumented calls)."""
    from authority.chaos import device_tpm

    outcome = device_tpm.run(tmp_path, True, "device_processes = 1\n").conclude()
    assert outcome.held, table([outcome])
