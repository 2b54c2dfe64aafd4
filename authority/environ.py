"""Take a secret out of the process environment, everywhere it is readable.

``os.environ.pop`` removes a variable from Python's mapping and from the C ``environ`` array,
so no child inherits it; but ``/proc/<pid>/environ`` shows the block the kernel copied onto the
stack at ``exec``, which still holds ``NAME=value``. ``take_variable`` also overwrites the value
in that block (Linux: its bounds are fields 50 and 51 of ``/proc/self/stat``, since 3.5).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_ENV_START = 47   # index of env_start among the fields after the command name in /proc/self/stat


def take_variable(name: str) -> str | None:
    """Remove ``name`` from the environment and return its value (None if unset).

    Its value is also zeroed in the process's initial environment block, so that
    ``/proc/<pid>/environ`` no longer shows it. Never raises: where that block cannot be
    found (not Linux), the variable is still removed from the environment.
    """
    value = os.environ.pop(name, None)
    if value is not None:
        try:
            _scrub_initial_block(name.encode())
        except (OSError, ValueError, IndexError):
            log.debug("could not scrub %s from the initial environment block", name)
    return value


def _scrub_initial_block(name: bytes) -> None:
    """Zero the value of every ``name=`` entry in the block /proc/self/environ shows.

    Raises: OSError (no /proc), ValueError / IndexError (an unexpected stat line).
    """
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    start, end = int(fields[_ENV_START]), int(fields[_ENV_START + 1])
    block = Path("/proc/self/environ").read_bytes()
    if start <= 0 or len(block) > end - start:
        raise ValueError("the environment block is not where /proc/self/stat says")
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(name + b"="):
            value_at = offset + len(name) + 1
            ctypes.memset(start + value_at, 0, len(entry) - len(name) - 1)
        offset += len(entry) + 1
