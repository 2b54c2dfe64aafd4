"""The atheris harnesses in fuzz/ run briefly (libFuzzer, coverage-guided) in a subprocess: no
crash, no uncaught exception, and memory under libFuzzer's RSS limit. Skipped when atheris is
not installed (``pip install atheris``; the hypothesis fuzzing in tests/test_fuzz_rpc.py and
tests/test_ticket_format.py always runs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = {"fuzz_ticket.py": 200_000, "fuzz_rpc.py": 50_000}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install atheris)")


@pytest.mark.parametrize(("harness", "runs"), sorted(HARNESSES.items()))
def test_harness_runs_clean(harness: str, runs: int, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / harness), f"-runs={runs}", "-rss_limit_mb=1024",
         "-max_total_time=60", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Done {runs} runs" in done.stderr
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*"))
