"""The commands docs/benchmarks.md gives for issue 14's floors: tools/unary_profile.py (where a
unary call's CPU goes; the ticket calls' floors) and tools/gateway_floor.py (the blocking
client's floor). Each mode runs end to end against a real server and real SoftHSM2 token and
prints the figures it promises. Short runs: the figures themselves are the benchmark's, not the
test's (rule 4)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pkcs11_fixtures import requires_softhsm

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "unary_profile.py"
GATEWAY_FLOOR = ROOT / "tools" / "gateway_floor.py"


def _profile(*argv: str) -> str:
    done = subprocess.run([sys.executable, str(TOOL), "--runs", "1", "--seconds", "0.3", *argv],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rates(out: str) -> dict[str, float]:
    """calls/s of each method section of the tool's output."""
    rates, method = {}, ""
    for line in out.splitlines():
        if line.startswith("-- "):
            method = line[3:].strip()
        elif line.strip().startswith("calls/s"):
            rates[method] = float(line.split()[-1])
    return rates


@requires_softhsm
@pytest.mark.parametrize("floor", ["backend", "bare"])
def test_a_floor_run_prints_each_rate_and_the_ratios_to_the_ceiling(floor: str) -> None:
    out = _profile("--floor", floor)
    assert f"FLOOR ({floor})" in out and "cpus" in out.splitlines()[0]   # the machine
    rates = _rates(out)
    assert set(rates) == {"echo", "issue", "redeem", "device"}
    assert all(rate > 0 for rate in rates.values()), out
    ceiling = float(re.search(r"ceiling .* ([\d.]+) calls/s", out).group(1))  # type: ignore[union-attr]
    assert ceiling == pytest.approx(1 / (1 / rates["echo"] + 1 / rates["device"]), rel=1e-3)
    for method in ("issue", "redeem"):
        ratio = float(re.search(rf"{method} / ceiling\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        assert ratio == pytest.approx(rates[method] / ceiling, abs=0.006)


@requires_softhsm
def test_the_ticket_path_run_times_its_layers() -> None:
    out = _profile("--parts", "--methods", "redeem")
    assert "FLOOR" not in out
    parts = dict(re.findall(r"part (.+?)\s{2,}([\d.]+)$", out, re.M))
    assert {"servicer", "sealer", "pkcs11 backend",
            "device: C_*Init + C_Encrypt/Decrypt"} <= set(parts), out
    assert float(parts["device: C_*Init + C_Encrypt/Decrypt"]) > 0


@requires_softhsm
def test_the_gateway_floor_prints_the_floors_and_the_client_per_resumption() -> None:
    done = subprocess.run([sys.executable, str(GATEWAY_FLOOR), "--threads", "4",
                           "--resumptions", "200", "--runs", "1"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cpus" in done.stdout.splitlines()[0]
    found = dict(re.findall(r"^(.+?)\s{2,}([\d.]+) µs per resumption", done.stdout, re.M))
    assert set(found) == {"floor, chained wake-ups", "floor, all woken",
                          "TicketClient, coalesced"}, done.stdout
    assert all(float(v) > 0 for v in found.values())


@requires_softhsm
def test_the_gateway_floor_of_the_asyncio_client() -> None:
    done = subprocess.run([sys.executable, str(GATEWAY_FLOOR), "--aio", "--threads", "4",
                           "--resumptions", "200", "--runs", "1"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 tasks" in done.stdout.splitlines()[0], done.stdout
    found = dict(re.findall(r"^(.+?)\s{2,}([\d.]+) µs per resumption", done.stdout, re.M))
    assert set(found) == {"floor, one task", "AsyncTicketClient, coalesced"}, done.stdout
    assert all(float(v) > 0 for v in found.values())
