"""Shared PKCS#11 test material: key ids, the SoftHSM2 module check and a fresh token fixture.

Import the fixture explicitly (it is registered as ``hsm``)::

    from tests.pkcs11_fixtures import hsm_fixture  # noqa: F401
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.softhsm import find_softhsm_module, provision_embedded_token
from authority.config import Pkcs11Settings
from authority.errors import StartupError

KID = bytes.fromhex("0102030405060708")
OTHER = bytes.fromhex("1112131415161718")

try:
    MODULE_PATH: Path | None = find_softhsm_module()
except StartupError:
    MODULE_PATH = None

requires_softhsm = pytest.mark.skipif(MODULE_PATH is None, reason="SoftHSM2 not installed")


@pytest.fixture(name="hsm")
def hsm_fixture(tmp_path: Path) -> Pkcs11Settings:
    """A freshly provisioned embedded token."""
    return provision_embedded_token(tmp_path / "hsm")


def churn_key(keyed: Pkcs11Backend, worker: Callable[[threading.Event], None],
              threads: int) -> None:
    """Run ``worker(stop)`` on ``threads`` threads while ``KID`` is destroyed and re-created
    five times; stop them and check that every one ended."""
    stop = threading.Event()
    running = [threading.Thread(target=worker, args=(stop,)) for _ in range(threads)]
    for t in running:
        t.start()
    try:
        for _ in range(5):
            time.sleep(0.05)
            keyed.destroy_key(KID)
            time.sleep(0.05)
            keyed.create_key(KID)
    finally:
        stop.set()
    for t in running:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in running)
