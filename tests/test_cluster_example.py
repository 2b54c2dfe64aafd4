"""examples/cluster/run as a reader of the README runs it: a PostgreSQL, one SoftHSM2 token,
three replicas on loopback, a ticket issued on A, redeemed and consumed on B, REPLAYED on C;
everything stopped and removed when it exits. Real processes, nothing mocked."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from authority.devdb import unavailable
from tests.conftest import process_gone
from tests.pkcs11_fixtures import requires_softhsm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "cluster" / "run"

pytestmark = [requires_softhsm,
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def test_the_cluster_example_shows_a_ticket_replayed_on_a_third_replica() -> None:
    assert os.access(SCRIPT, os.X_OK)
    done = subprocess.run([str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=False,
                          env={**os.environ, "CLUSTER_PORTS": "0 0 0"})   # any free ports
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    replicas = re.findall(r"replica ([abc]) serving on (127\.0\.0\.1:\d+) \(pid (\d+)", out)
    assert [name for name, _, _ in replicas] == ["a", "b", "c"]
    a, b, c = (address for _, address, _ in replicas)
    assert len({a, b, c}) == 3
    assert f"issued on A ({a}): a ticket of" in out
    assert f"redeemed on B ({b}): OK" in out
    assert f"consumed on B ({b}): OK" in out
    assert f"presented again on C ({c}): REPLAYED" in out
    assert re.search(r"^store +postgresql host=\S+ port=\d+ dbname=authority", out, re.M)
    assert len(re.findall(r"^[0-9a-f]{16}\*? .* yes +(holder|-)$", out, re.M)) == 3
    # everything stopped and removed
    assert all(process_gone(int(pid)) for _, _, pid in replicas)
    work = re.search(r"cluster: stopped; (\S+) removed", out)
    assert work is not None and not Path(work.group(1)).exists()
    database = re.search(r"PostgreSQL (\S+) \(socket only\)", out)
    assert database is not None and not Path(database.group(1)).exists()
    assert "password" not in out + done.stderr   # the DSN's password is never shown
