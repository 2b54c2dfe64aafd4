"""The process-wide PKCS#11 module: loaded once, initialised with OS locking, counted users.

python-pkcs11 caches a loaded library by its path string, and dlopen gives one handle per file,
so a module is identified by its real path (Debian's /usr/lib/softhsm/libsofthsm2.so is a
symlink).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pkcs11

from authority.backends.pkcs11._cryptoki import Cryptoki
from authority.backends.pkcs11._errors import Ctx, Phase, device_errors
from authority.errors import DeviceUnavailable, StartupError

log = logging.getLogger("authority.backends.pkcs11")

#: seconds between two attempts to initialise a module whose re-initialisation failed
REVIVE_INTERVAL: Final = 0.2


@dataclass
class Module:
    """The loaded module: python-pkcs11's handle and our ctypes view of the same library."""

    path: str
    lib: Any  # pkcs11._pkcs11.lib (a Cython class)
    ck: Cryptoki


class ModuleRegistry:
    """One PKCS#11 module per process, the SOFTHSM2_CONF it was initialised with, open users.

    SoftHSM2 reads SOFTHSM2_CONF at C_Initialize, so one token directory is in force at a time;
    another can be switched to only while nobody uses the module. The first user after an idle
    spell re-initialises the module (a few ms), which also recovers one finalised behind our back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: Module | None = None
        self._conf: str | None = None
        self._users = 0
        self._logins: dict[int, int] = {}
        self._down = False          # a re-initialisation failed: the module is finalised
        self._tried_at = 0.0        # when ``revive`` last tried (monotonic)

    def acquire(self, module: Path, conf: Path | None) -> Module:
        """Load/initialise ``module`` with ``conf`` in force and count one more user.

        The module is identified by its real path (Debian's /usr/lib/softhsm/libsofthsm2.so is a
        symlink, and dlopen gives one handle per file).
        Raises: StartupError naming pkcs11.module (missing, unloadable, another module busy) or
        pkcs11.softhsm2_conf (another conf in force for a user still open).
        """
        if not module.is_file():
            raise StartupError(f"pkcs11.module: {module} does not exist or is not a file")
        path = os.path.realpath(module)
        want = str(conf.resolve()) if conf is not None else None
        with self._lock:
            current = self._module
            if self._users:
                current = self._check_compatible(current, path, want)
            elif current is None or current.path != path:
                self._unload()
                current = self._module = self._load(path, want)
            else:
                self._reinitialize(current, want)
            self._users += 1
            return current

    def release(self) -> None:
        """Count one user fewer (the module stays initialised)."""
        with self._lock:
            self._users = max(0, self._users - 1)

    def refresh(self, module: Module) -> bool:
        """Finalize and initialise ``module`` again so that it reads its tokens afresh, if one
        backend alone uses it in this process (False, nothing done, otherwise: the other
        backends' sessions would be cut). The caller has closed its sessions.

        Raises: DeviceUnavailable (the module stays registered: a later refresh retries).
        """
        with self._lock:
            if self._users != 1 or self._module is not module:
                return False
            if self._conf is not None:
                os.environ["SOFTHSM2_CONF"] = self._conf
            self._logins.clear()
            self._down = True       # until C_Initialize succeeds
            with device_errors(Ctx(Phase.OPERATION, "re-initialise", subject=module.path)):
                module.ck.reinitialize_with_os_locking()
            self._down = False
        log.info("pkcs11 module %s re-initialised to read the token afresh", module.path)
        return True

    def revive(self, module: Module) -> bool:
        """After a re-initialisation that failed (the token was unreadable: SoftHSM2's
        C_Initialize fails while its token directory is gone), try C_Initialize again, at most
        every ``REVIVE_INTERVAL`` seconds. Returns True when it just succeeded (the caller's
        token handle and login are stale: find the token and log in again), False when the
        module was not down.

        Raises: DeviceUnavailable (still down, or tried too recently)."""
        with self._lock:
            if not self._down or self._module is not module:
                return False
            now = time.monotonic()
            if now - self._tried_at < REVIVE_INTERVAL:
                raise DeviceUnavailable(f"pkcs11 module {module.path} is not initialised (the "
                                        "token could not be read); retrying")
            self._tried_at = now
            if self._conf is not None:
                os.environ["SOFTHSM2_CONF"] = self._conf
            with device_errors(Ctx(Phase.OPERATION, "re-initialise", subject=module.path)):
                module.ck.reinitialize_with_os_locking()
            self._down = False
        log.warning("pkcs11 module %s initialised again: the token can be read again",
                    module.path)
        return True

    def note_login(self, slot_id: int) -> None:
        """Record that one more backend relies on the user login of ``slot_id``."""
        with self._lock:
            self._logins[slot_id] = self._logins.get(slot_id, 0) + 1

    def drop_login(self, slot_id: int) -> bool:
        """Record one backend fewer on ``slot_id``; True when it was the last (log out now)."""
        with self._lock:
            left = self._logins.get(slot_id, 0) - 1
            if left > 0:
                self._logins[slot_id] = left
                return False
            self._logins.pop(slot_id, None)
            return True

    def _describe(self) -> str:
        module = self._module.path if self._module else "no module"
        return f"{module} (SOFTHSM2_CONF={self._conf})"

    def _unload(self) -> None:
        """Finalize the current module (no user left); the next acquire loads afresh."""
        if self._module is not None:
            self._module.ck.finalize_quietly()
        self._module = None
        self._conf = None
        self._logins.clear()

    def _load(self, path: str, want: str | None) -> Module:
        """Load ``path`` and initialise it with OS locking. Raises: StartupError."""
        if want is not None:
            os.environ["SOFTHSM2_CONF"] = want
        ctx = Ctx(Phase.MODULE, "load", subject=path)
        try:
            with device_errors(ctx):
                lib = pkcs11.lib(path)
                ck = Cryptoki(path)
                ck.reinitialize_with_os_locking()
        except OSError as exc:
            raise StartupError(f"pkcs11.module: cannot load {path}: {exc}") from exc
        self._conf = os.environ.get("SOFTHSM2_CONF")
        log.info("pkcs11 module %s initialised (SOFTHSM2_CONF=%s)", path, self._conf)
        return Module(path=path, lib=lib, ck=ck)

    def _check_compatible(self, current: Module | None, path: str, want: str | None) -> Module:
        """With users open, only the same module and conf can be shared; return the module.

        Raises: StartupError.
        """
        if current is None or current.path != path:
            raise StartupError(
                f"pkcs11.module: {path} requested but {self._describe()} is still in use in "
                "this process"
            )
        if want is not None and want != self._conf:
            raise StartupError(
                f"pkcs11.softhsm2_conf: {want} requested but {self._conf} is in force for a "
                "backend still open in this process; close it first"
            )
        return current

    def _reinitialize(self, module: Module, want: str | None) -> None:
        """Nobody uses the module: finalize and initialise it again (with ``want`` exported).

        This also recovers a module finalised behind our back. Raises: StartupError.
        """
        if want is not None:
            os.environ["SOFTHSM2_CONF"] = want
        self._logins.clear()
        try:
            with device_errors(Ctx(Phase.MODULE, "re-initialise", subject=module.path)):
                module.ck.reinitialize_with_os_locking()
        except BaseException:
            self._unload()
            raise
        self._conf = os.environ.get("SOFTHSM2_CONF")
        log.debug("pkcs11 module %s re-initialised (SOFTHSM2_CONF=%s)", module.path, self._conf)


REGISTRY: Final = ModuleRegistry()
