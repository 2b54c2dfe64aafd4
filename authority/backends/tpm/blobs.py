"""TPM-wrapped key blobs on disk: the only place a ticket key exists outside the TPM.

Each ticket key is two TPM objects, an AES-256-CFB key and an HMAC-SHA256 key. TPM2_Create returns
each as a public area (TPM2B_PUBLIC) and a private area (TPM2B_PRIVATE) that the TPM has encrypted
and integrity-protected under the storage primary key; only that TPM, with the same owner seed,
can load it again. The four marshalled structures are kept as files named by the key id::

    <key_dir>/<16 hex digits>.aes.pub   TPM2B_PUBLIC    (tpm2_print -t TPM2B_PUBLIC reads it)
    <key_dir>/<16 hex digits>.aes.priv  TPM2B_PRIVATE   (tpm2_load -u/-r takes the pair)
    <key_dir>/<16 hex digits>.hmac.pub
    <key_dir>/<16 hex digits>.hmac.priv

The directory is 0700 and the files 0600. A key is present when all four files are; a partial set
(a crash while creating or destroying) is ignored and cleaned up by the next create or destroy of
that id. This module does no TPM calls and imports no TPM library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from authority.errors import DeviceUnavailable, FailedPrecondition, KeyNotFound, StartupError

__all__ = ["PARTS", "BlobStore"]

log = logging.getLogger(__name__)

KEY_ID_LEN: Final = 8
#: file suffixes of one key, in the order they are written (and deleted in reverse)
PARTS: Final = ("aes.pub", "aes.priv", "hmac.pub", "hmac.priv")
_NAME: Final = re.compile(r"^([0-9a-f]{16})\.(aes|hmac)\.(pub|priv)$")
_TMP_SUFFIX: Final = ".tmp"


class BlobStore:
    """The key directory. Not thread-safe: the TPM worker thread is its only user."""

    def __init__(self, directory: Path) -> None:
        """Open (creating with mode 0700) the key directory; remove leftover temporary files.

        Raises: StartupError naming tpm.key_dir if it cannot be created or used.
        """
        self.directory = directory.absolute()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = stat.S_IMODE(self.directory.stat().st_mode)
            if mode != 0o700:
                log.warning("key dir %s had mode %o; setting 0700", self.directory, mode)
                os.chmod(self.directory, 0o700)
            for leftover in self.directory.glob("*" + _TMP_SUFFIX):
                leftover.unlink()
        except OSError as exc:
            raise StartupError(
                f"tpm.key_dir: cannot use {self.directory}: {exc.strerror or exc}"
            ) from exc
        if not os.access(self.directory, os.W_OK):
            raise StartupError(f"tpm.key_dir: {self.directory} is not writable")

    def path(self, key_id: bytes, part: str) -> Path:
        """The file of one part ("aes.pub", ...) of a key."""
        return self.directory / f"{key_id.hex()}.{part}"

    def exists(self, key_id: bytes) -> bool:
        """True if all four files of the key are present."""
        return all(self.path(key_id, part).is_file() for part in PARTS)

    def list(self) -> set[bytes]:
        """Ids of the keys whose four files are present. Raises: DeviceUnavailable."""
        seen: dict[bytes, set[str]] = {}
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise self._error("list", self.directory, exc) from exc
        for name in names:
            match = _NAME.match(name)
            if match:
                seen.setdefault(bytes.fromhex(match.group(1)), set()).add(
                    f"{match.group(2)}.{match.group(3)}"
                )
        complete = {key_id for key_id, parts in seen.items() if parts == set(PARTS)}
        for key_id in seen.keys() - complete:
            log.warning("key dir %s: incomplete blob set for key %s ignored",
                        self.directory, key_id.hex())
        return complete

    def read(self, key_id: bytes) -> dict[str, bytes]:
        """The four marshalled structures of a key. Raises: KeyNotFound; DeviceUnavailable."""
        if len(key_id) != KEY_ID_LEN:
            raise KeyNotFound(key_id)
        out: dict[str, bytes] = {}
        for part in PARTS:
            path = self.path(key_id, part)
            try:
                out[part] = path.read_bytes()
            except FileNotFoundError as exc:
                raise KeyNotFound(key_id) from exc
            except OSError as exc:
                raise self._error("read", path, exc) from exc
        return out

    def write(self, key_id: bytes, parts: Mapping[str, bytes]) -> None:
        """Store a new key's four structures (each file 0600, written then renamed into place).

        A partial set left by a crash is replaced.
        Raises: FailedPrecondition if the key exists; DeviceUnavailable on a file error.
        """
        if self.exists(key_id):
            raise FailedPrecondition(f"key {key_id.hex()} already exists in the TPM key dir")
        self.delete(key_id)  # a partial set, if any
        written: list[Path] = []
        try:
            for part in PARTS:
                tmp = self.path(key_id, part + _TMP_SUFFIX)
                _write_private(tmp, parts[part])
                written.append(tmp)
            for part, tmp in zip(PARTS, written, strict=True):
                os.replace(tmp, self.path(key_id, part))
            _fsync_dir(self.directory)
        except OSError as exc:
            for tmp in written:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self.delete(key_id)
            raise self._error("write", self.directory, exc) from exc

    def delete(self, key_id: bytes) -> bool:
        """Remove every file of the key (private AES part first); True if the key was complete.

        Raises: DeviceUnavailable if a file exists but cannot be removed.
        """
        was_complete = self.exists(key_id)
        for part in ("aes.priv", "hmac.priv", "aes.pub", "hmac.pub"):
            path = self.path(key_id, part)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._error("delete", path, exc) from exc
        with contextlib.suppress(OSError):
            _fsync_dir(self.directory)
        return was_complete

    @staticmethod
    def _error(verb: str, path: Path, exc: OSError) -> DeviceUnavailable:
        return DeviceUnavailable(f"tpm key dir: cannot {verb} {path}: {exc.strerror or exc}")


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively with mode 0600, write and fsync ``data``. Raises: OSError."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable. Raises: OSError."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
