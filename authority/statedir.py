"""Who may use a state directory: one authority process at a time (the lock), with the one
backend and device it was first used with (its owner).

The lock is ``fcntl.flock`` on ``STATE_DIR/lock``, held from start-up until the authority is
closed (or its process dies: the kernel releases it). The file holds the holder's process id,
for the message that refuses a second authority.

With ``server.processes`` > 1 the holder is the supervisor (authority/service/supervisor.py):
it takes the lock, and hands the locked file to each replica process it starts (an inherited
file descriptor: the same open file, so the same lock). A replica calls :func:`adopt` with it
before opening its authority, whose :meth:`StateLock.acquire` then takes that lock instead of
a new one (once). Any other process opens the file anew and is refused as before, naming the
supervisor, whose pid the file holds. The lock lasts while the supervisor or any of its
replicas keeps the file open: a replica left behind by a supervisor killed with SIGKILL still
holds it until it has stopped (it stops when it sees its supervisor gone).

The owner is recorded in the store at the first start: the backend ("pkcs11", "tpm") and the
device. A PKCS#11 device is its token as the token names itself (label, serial, manufacturer,
model); a TPM is its key directory and where the TPM is (the embedded swtpm, or the TCTI).
A start with another backend is refused before any device is opened, one with another device
before the key ring is read: the keys recorded there are in another device, and reading them
against this one would make them all look missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

from authority.backends.base import KeyBackend
from authority.config import Config
from authority.errors import StartupError
from authority.keys import KeyState
from authority.store.base import Store

LOCK_NAME: Final = "lock"
#: (st_dev, st_ino) of a lock file -> the descriptor of it a supervisor gave this process,
#: locked (``adopt``); taken by the next ``StateLock.acquire`` of that file
_given: dict[tuple[int, int], int] = {}


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
        given = _given.pop(_file_id(fd), None)
        if given is not None:   # our supervisor's lock: already held, its pid in the file
            os.close(fd)
            return cls(directory, given)
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

    def fileno(self) -> int:
        """The locked file's descriptor (a supervisor passes it to its replicas).
        Raises: ValueError once released."""
        if self._fd is None:
            raise ValueError("the state-dir lock was released")
        return self._fd

    def release(self) -> None:
        """Unlock (closing the file; a lock adopted from a supervisor stays held by it and
        its other replicas). Idempotent; never raises."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def adopt(fd: int) -> None:
    """Take ``fd``, a descriptor of a state directory's lock file that this process inherited
    from its supervisor, which holds the lock on it: the next ``StateLock.acquire`` of that
    directory in this process uses it (once) instead of locking anew.

    Raises: StartupError if ``fd`` is not an open file this process may lock (the lock is
    held elsewhere: the descriptor is not the supervisor's open file).
    """
    try:
        key = _file_id(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: the same open file
    except OSError as exc:
        raise StartupError(f"state_dir: the lock descriptor {fd} given by the supervisor is "
                           f"not usable: {exc.strerror}") from exc
    _given[key] = fd


def _file_id(fd: int) -> tuple[int, int]:
    """(device, inode) of an open file. Raises: OSError."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _read_pid(fd: int) -> str:
    """The process id written in the lock file ("unknown" if it cannot be read)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def check_backend(store: Store, config: Config) -> None:
    """Refuse a state directory that belongs to another backend (before opening any device).

    Raises: StartupError naming the directory, both backends and the recorded device.
    """
    owner = store.state_owner()
    if owner is not None and owner[0] != config.backend:
        raise StartupError(
            f"state_dir: {config.state_dir} belongs to backend {owner[0]} ({owner[1]}); "
            f"refusing to start with backend {config.backend}: use another state_dir "
            f"(--state-dir), or backend \"{owner[0]}\" (--backend {owner[0]})")


def claim(store: Store, config: Config, backend: KeyBackend) -> None:
    """Check that this start's device is the one the state directory belongs to; record it
    at the first start.

    A directory that records keys but no owner (made before owners were recorded) is claimed
    only if the device holds at least one of its live keys.
    Raises: StartupError naming the directory and both devices; DeviceUnavailable.
    """
    if config.cluster.per_node_tokens:
        return   # a device per replica: the membership names each (ClusterMembers.check_member)
    device = device_identity(config, backend)
    owner = store.state_owner()
    if owner == (config.backend, device):
        return
    if owner is not None:
        raise StartupError(
            f"state_dir: {config.state_dir} belongs to backend {owner[0]} ({owner[1]}); "
            f"refusing to start with backend {config.backend} ({device}): use another "
            "state_dir (--state-dir), or the device it belongs to")
    live = {r.key_id for r in store.load_keys()
            if r.state in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY)}
    if live and not live & backend.list_keys():
        ids = ", ".join(sorted(k.hex() for k in live))
        raise StartupError(
            f"state_dir: {config.state_dir} records keys {ids}, none of which "
            f"{config.backend} ({device}) holds, and not which device it belongs to: start it "
            "with the backend and device it was used with, or use another state_dir")
    store.set_state_owner(config.backend, device)


def device_identity(config: Config, backend: KeyBackend) -> str:
    """What names this start's device: the backend's own identity (a PKCS#11 token's label,
    serial, manufacturer and model); for the TPM, its key directory (relative to the state
    directory when inside it) and where the TPM is. Raises: DeviceUnavailable."""
    if config.backend == "tpm":
        tpm = config.tpm
        key_dir = tpm.key_dir if tpm.key_dir is not None else config.state_dir / "tpm" / "keys"
        where = "the embedded swtpm" if tpm.tcti is None else f"the TPM at {tpm.tcti}"
        return f"key dir {_shown(key_dir, config.state_dir)}, {where}"
    info = backend.describe()
    return info.identity or f"token {info.token}"


def _shown(path: Path, state_dir: Path) -> str:
    """``path`` as STATE_DIR/... when inside the state directory (which may move), else
    absolute."""
    path, state_dir = path.absolute(), state_dir.absolute()
    if path.is_relative_to(state_dir):
        return str(Path("STATE_DIR") / path.relative_to(state_dir))
    return str(path)
