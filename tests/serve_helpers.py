"""Reading what a ``serve`` process started by a test prints (tests/test_server_processes.py,
tests/test_state_lock.py)."""

from __future__ import annotations

import re
import subprocess


def read_banner(proc: subprocess.Popen[str]) -> tuple[str, str | None]:
    """The banner ``proc`` (``serve`` with stdout a text pipe) printed, up to its "Stop with"
    line or the end of its output, and the address it says it listens on (None: it did not
    say, e.g. it exited first). Raises: AssertionError if ``proc`` has no stdout pipe."""
    assert proc.stdout is not None
    banner = ""
    for line in proc.stdout:
        banner += line
        if line.startswith("Stop with"):
            break
    match = re.search(r"listening on (\S+)", banner)
    return banner, match.group(1) if match else None
