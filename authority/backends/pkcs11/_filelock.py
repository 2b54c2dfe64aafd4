"""A lock shared by the processes of one host around the PKCS#11 calls that read or rewrite a
file-based token's own record: initialising the module, reading token information, logging in.

Why: SoftHSM2 (2.6.1) rewrites ``token.object`` at every successful C_Login and releases its
fcntl lock before the buffered write reaches the file; a process initialising the module or
reading the token's information at that moment reads a cut file, and the token is missing ("no
token labelled ...") or a call fails CKR_GENERAL_ERROR (tests/test_cluster_e2e.py, three
processes opening one token at once). Replicas sharing one SoftHSM2 token therefore take this
lock, a file in the token directory (``directories.tokendir`` of the softhsm2.conf in force),
around those calls. A module configured otherwise (a network HSM, another vendor) has no such
file: no lock is taken and nothing changes for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Final

from authority.errors import DeviceUnavailable
from authority.flock import flocked

log = logging.getLogger("authority.backends.pkcs11")

LOCK_NAME: Final = ".ticket-authority.lock"
#: SoftHSM2's configuration file when SOFTHSM2_CONF is not set (Debian's build)
DEFAULT_CONF: Final = Path("/etc/softhsm/softhsm2.conf")
#: seconds to wait for another process's open or login before giving up
WAIT: Final = 30.0


def lock_path(conf: str | None) -> Path | None:
    """The lock file for the SoftHSM2 configuration ``conf`` (None: SoftHSM2's default), or
    None when there is no readable configuration naming an existing token directory. Never
    raises."""
    path = Path(conf) if conf else DEFAULT_CONF
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip() == "directories.tokendir" and not line.lstrip().startswith("#"):
            tokendir = Path(value.strip())
            return tokendir / LOCK_NAME if tokendir.is_dir() else None
    return None


@contextmanager
def token_files_locked(conf: str | None, wait: float = WAIT) -> Iterator[None]:
    """Hold the lock of ``conf``'s token directory (see the module docstring) for the block;
    no lock when there is none to take (another kind of module, an unwritable directory).

    Raises: DeviceUnavailable when another process holds it longer than ``wait`` seconds.
    """
    path = lock_path(conf)
    fd = _open(path) if path is not None else None
    if path is None or fd is None:
        yield
        return
    with ExitStack() as held:
        held.callback(os.close, fd)
        try:
            held.enter_context(flocked(fd, wait))
        except OSError as exc:
            raise DeviceUnavailable(f"token lock {path}: {exc.strerror} (another process "
                                    "opening or logging in to the token)") from None
        yield


def _open(path: Path) -> int | None:
    """Open (creating, mode 0600) the lock file; None if it cannot be (logged). Never raises."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        log.debug("no token file lock %s: %s", path, exc)
        return None
