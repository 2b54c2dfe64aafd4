"""Who may use a state directory: one authority process at a time (the lock).

The lock is ``fcntl.flock`` on ``STATE_DIR/lock``, held from start-up until the authority is
closed (or its process dies: the kernel releases it). The file holds the holder's process id,
for the message that refuses a second authority.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

from authority.errors import StartupError

LOCK_NAME: Final = "lock"


class StateLock:
    """The exclusive lock on one state directory, held until :meth:`release`."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path) -> StateLock:
        """Take the lock of ``directory`` (an existing directory) and write our pid in it.

        Raises: StartupError naming state_dir, the directory and the process holding it.
        """
        path = directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"state_dir: cannot open {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StartupError(
                f"state_dir: {directory} is in use by process {holder} (it holds {path}); "
                "stop that authority or use another state_dir") from None
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"state_dir: cannot lock {path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        """Unlock (closing the file). Idempotent; never raises."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_pid(fd: int) -> str:
    """The process id written in the lock file ("unknown" if it cannot be read)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
