"""An exclusive ``flock`` held for a block, waited for up to a deadline: how processes of one host
take turns (appending to the audit file, opening one SoftHSM2 token)."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator


@contextlib.contextmanager
def flocked(fd: int, wait: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``fd`` for the block, polling (1 ms doubling to 20 ms)
    while another process holds it.

    Raises: OSError (another process held it for ``wait`` seconds, or the lock call failed).
    """
    deadline = time.monotonic() + wait
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(0, f"locked by another process for {wait:g} s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
