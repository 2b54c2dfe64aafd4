"""TPM fixtures: a real swtpm per test, in tmp_path, on Unix sockets in its state dir; no mocks.

Import the fixtures a test module uses explicitly (recent pytest allows ``pytest_plugins`` only in
the top-level conftest)::

    from tests.tpm_fixtures import (  # noqa: F401
        swtpm_fixture, tpm_backend_fixture, tpm_settings_fixture)

Each fixture function is named ``<name>_fixture`` and registered under ``<name>`` (pytest's
``name=``), so test parameters called ``swtpm`` do not shadow the imported functions (ruff F811).
Import the whole chain a test needs: tpm_backend uses tpm_settings, which uses swtpm.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Only authority.backends.tpm imports tpm2-pytss; here we just look whether it is installed.
HAVE_PYTSS = importlib.util.find_spec("tpm2_pytss") is not None

HAVE_SWTPM = shutil.which("swtpm") is not None
HAVE_TOOLS = all(shutil.which(t) for t in ("tpm2_createprimary", "tpm2_load", "tpm2_readpublic",
                                           "tpm2_print", "tpm2_flushcontext"))

requires_tpm = pytest.mark.skipif(not (HAVE_PYTSS and HAVE_SWTPM),
                                  reason="swtpm or tpm2-pytss not installed")
requires_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="tpm2-tools not installed")


def template_without(*flags: Any) -> Callable[[Any], None]:
    """A change to a TPM2B_PUBLIC template that clears ``flags`` (TPMA_OBJECT bits) from its
    objectAttributes: for making a key from another template than the backend's."""
    def change(template: Any) -> None:
        attributes = template.publicArea.objectAttributes
        bits = int(attributes)
        for flag in flags:
            bits &= ~int(flag)
        template.publicArea.objectAttributes = type(attributes)(bits)
    return change


# Imported after the checks so that collection works (and skips) without tpm2-pytss.
if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.tpm import SwtpmProcess, TpmBackend, open_tpm_backend
    from authority.config import TpmSettings


@pytest.fixture(name="swtpm")
def swtpm_fixture(tmp_path: Path) -> Iterator[SwtpmProcess]:
    """A swtpm with its state and sockets in tmp_path/swtpm; stopped after the test
    (TPM2_Shutdown first; stopping twice is harmless). A test that restarts it stops the new
    process itself."""
    if not (HAVE_PYTSS and HAVE_SWTPM):
        pytest.skip("swtpm or tpm2-pytss not installed")
    process = SwtpmProcess.start(tmp_path / "swtpm")
    yield process
    process.stop()


@pytest.fixture(name="tpm_settings")
def tpm_settings_fixture(swtpm: SwtpmProcess, tmp_path: Path) -> TpmSettings:
    """Settings pointing at the fixture's swtpm, key blobs in tmp_path/keys."""
    return TpmSettings(tcti=swtpm.tcti, key_dir=tmp_path / "keys", retries=10)


@pytest.fixture(name="tpm_backend")
def tpm_backend_fixture(tpm_settings: TpmSettings, tmp_path: Path) -> Iterator[TpmBackend]:
    """An open TPM backend on the fixture's swtpm, closed after the test."""
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    yield backend
    backend.close()


def tools_env(tcti: str) -> dict[str, str]:
    """Environment for tpm2-tools talking to the swtpm at ``tcti``."""
    return {**os.environ, "TPM2TOOLS_TCTI": tcti}


def run_tool(tcti: str, *argv: str) -> str:
    """Run one tpm2-tools command against ``tcti``; return its stdout (fail the test on error)."""
    done = subprocess.run(list(argv), env=tools_env(tcti), capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr}"
    return done.stdout
