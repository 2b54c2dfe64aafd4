"""TpmBackend: the KeyBackend of ticket format 2, with every key inside a TPM 2.0.

Seal (format 2, authority/ticket_format.py): a fresh random 16-octet IV, AES-256-CFB encryption by
TPM2_EncryptDecrypt2 under the key's AES object, then TPM2_HMAC under its HMAC object over
aad | iv | ciphertext; the sealed body is iv | ciphertext | mac (32). Unseal recomputes the HMAC
in the TPM, compares it in constant time and only then decrypts; a mismatch is UnsealFailed. A TPM
takes at most TPM_PT_INPUT_BUFFER octets (1024 on swtpm) per command, so aad + iv + plaintext
must fit in that (a ticket plaintext is at most about 970 octets).

All device work runs on one worker thread (authority/backends/tpm/worker.py); the methods here
check their arguments on the caller's thread, submit one job and wait for its result.

A key whose public area is not the templates' (a blob swapped into the key dir: a value known
outside the TPM, or duplicable) is refused before any crypto (keycache.py): it is not listed,
seal and key_attributes raise KeyNotFound for it, unseal UnsealFailed (its tickets are INVALID).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Final

from authority.backends.base import BackendInfo
from authority.backends.tpm.blobs import BlobStore
from authority.backends.tpm.device import IV_LEN, MAC_LEN, Device, DeviceInfo
from authority.backends.tpm.swtpm import SwtpmProcess
from authority.backends.tpm.worker import Worker
from authority.config import TpmSettings
from authority.errors import (
    DeviceUnavailable,
    InvalidArgument,
    InvalidTicket,
    KeyNotFound,
    StartupError,
    UnsealFailed,
)

__all__ = ["TpmBackend", "open_tpm_backend", "prepare_tpm_dir"]

log = logging.getLogger(__name__)

KEY_ID_LEN: Final = 8
QUEUE_SIZE: Final = 1024          # jobs waiting for the TPM before callers get UNAVAILABLE
CALL_TIMEOUT: Final = 30.0        # seconds a caller waits for its job
START_TIMEOUT: Final = 120.0      # seconds for start-up (real chips are slow)


def open_tpm_backend(settings: TpmSettings, tpm_dir: Path, *, queue_size: int = QUEUE_SIZE,
                     call_timeout: float = CALL_TIMEOUT) -> TpmBackend:
    """Open the TPM backend: the TPM at ``settings.tcti``, or an embedded swtpm in ``tpm_dir``.

    ``tpm_dir`` (created 0700) holds the embedded swtpm's state (``swtpm/``) and, unless
    ``settings.key_dir`` is set, the key blobs (``keys/``).
    Raises: StartupError naming the setting at fault (state_dir, tpm.tcti, tpm.key_dir,
    tpm.owner_auth, tpm.retries).
    """
    tpm_dir = prepare_tpm_dir(settings, tpm_dir)
    blobs = BlobStore(settings.key_dir if settings.key_dir is not None else tpm_dir / "keys")
    swtpm: SwtpmProcess | None = None
    tcti = settings.tcti
    if tcti is None:
        swtpm = SwtpmProcess.start(tpm_dir / "swtpm", supervised=True)
        tcti = swtpm.tcti
    try:
        backend = TpmBackend(settings, tcti, blobs, swtpm, queue_size, call_timeout)
    except BaseException:
        if swtpm is not None:
            swtpm.stop()
        raise
    log.info("tpm backend open: %s", backend.describe())
    return backend


def prepare_tpm_dir(settings: TpmSettings, tpm_dir: Path) -> Path:
    """``tpm_dir`` made absolute, created with mode 0700 (tightened if it exists).
    Raises: StartupError (state_dir, or tpm.retries negative)."""
    if settings.retries < 0:
        raise StartupError("tpm.retries: must not be negative")
    tpm_dir = tpm_dir.absolute()
    try:
        tpm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if tpm_dir.stat().st_mode & 0o077:
            os.chmod(tpm_dir, 0o700)
    except OSError as exc:
        raise StartupError(f"state_dir: cannot create {tpm_dir}: {exc.strerror or exc}") from exc
    return tpm_dir


class TpmBackend:
    """Ticket keys as TPM objects; seal/unseal with EncryptDecrypt2 + HMAC inside the TPM.

    Thread-safe: every call is a job for the one TPM worker thread.
    """

    name = "tpm"
    format_version = 2

    def __init__(self, settings: TpmSettings, tcti: str, blobs: BlobStore,
                 swtpm: SwtpmProcess | None, queue_size: int = QUEUE_SIZE,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        """Start the worker and the device on it. Use :func:`open_tpm_backend`.

        Raises: StartupError (the worker is stopped again).
        """
        self._tcti = tcti
        self._blobs = blobs
        self._swtpm = swtpm
        self._closed = False
        self._device = Device(tcti, settings.owner_auth, blobs, settings.retries,
                              settings.parent)
        self._worker = Worker(f"tpm-worker[{tcti}]", queue_size, call_timeout,
                              affinity=self._device.hot_key)
        try:
            self._info: DeviceInfo = self._worker.call(self._device.start, timeout=START_TIMEOUT)
        except DeviceUnavailable as exc:
            self._worker.stop(self._device.close)
            raise StartupError(f"tpm.tcti: the TPM at '{tcti}' did not start: "
                               f"{exc.message}") from exc
        except BaseException:
            self._worker.stop(self._device.close)
            raise
        self._max_buffer = self._info.max_buffer

    def __repr__(self) -> str:
        return f"<TpmBackend tcti={self._tcti!r} keys={str(self._blobs.directory)!r}>"

    @property
    def tcti(self) -> str:
        return self._tcti

    @property
    def info(self) -> DeviceInfo:
        """What start-up learnt about the TPM (slots, buffer size, stale objects flushed)."""
        return self._info

    @property
    def key_dir(self) -> Path:
        return self._blobs.directory

    @property
    def swtpm(self) -> SwtpmProcess | None:
        """The embedded swtpm, if this backend started one."""
        return self._swtpm

    @property
    def max_plaintext(self) -> int:
        """Largest plaintext ``seal`` takes with a 12-octet aad (a ticket header)."""
        return self._max_buffer - IV_LEN - 12

    def counters(self) -> dict[str, int]:
        """Device counters (blob loads, context loads, evictions, resyncs, retries)."""
        return self._worker.call(lambda: dict(self._device.counters))

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued jobs, flush our objects, close the connection; for the embedded swtpm
        also TPM2_Shutdown and stop the process. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._worker.stop(self._device.close)
        if self._swtpm is not None:
            self._swtpm.stop()

    # -- keys ----------------------------------------------------------------------------------

    def create_key(self, key_id: bytes) -> None:
        """Create the key's AES-256 and HMAC-SHA256 objects in the TPM; store their wrapped blobs.

        Raises: InvalidArgument (id not 8 bytes); FailedPrecondition (id taken);
        KeyProtectionError (the TPM made them otherwise than the templates: nothing stored);
        DeviceUnavailable.
        """
        _check_key_id(key_id)
        self._worker.call(lambda: self._device.create_key(key_id))
        log.info("created key %s", key_id.hex())

    def destroy_key(self, key_id: bytes) -> None:
        """Flush the key's objects and delete its blobs: nothing it sealed opens again.

        Raises: KeyNotFound; DeviceUnavailable.
        """
        self._worker.call(lambda: self._device.destroy_key(key_id), affinity=key_id)
        log.info("destroyed key %s", key_id.hex())

    def list_keys(self) -> set[bytes]:
        """Ids of the keys whose blobs are in the key dir, less the refused ones (not the
        templates' keys). Raises: DeviceUnavailable."""
        return self._worker.call(self._device.list_keys)

    def refresh(self) -> None:
        """Nothing to re-read: this process alone uses the TPM and its key directory (the
        TPM backend is refused with a shared store)."""

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """TPMA_OBJECT bits of the key's two objects read back with TPM2_ReadPublic:
        "aes.fixed_tpm", "aes.fixed_parent", ..., "hmac.no_da", ...

        Raises: KeyNotFound (also a refused key); DeviceUnavailable.
        """
        return self._worker.call(lambda: self._device.key_attributes(key_id), affinity=key_id)

    # -- seal / unseal -------------------------------------------------------------------------

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """iv (16, random) | AES-256-CFB ciphertext | HMAC-SHA256 (32) over aad | iv | ct.

        Raises: InvalidArgument (aad + plaintext too long for one TPM command); KeyNotFound
        (also a refused key); DeviceUnavailable.
        """
        self._check_seal_size(aad, plaintext, "plaintext")
        iv = os.urandom(IV_LEN)
        return self._worker.call(lambda: self._device.seal(key_id, aad, iv, plaintext),
                                 affinity=key_id)

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Verify the HMAC (in the TPM, constant-time compare), then decrypt in the TPM.

        Raises: UnsealFailed (any authentication failure, a body no seal could have made, or
        a refused key); KeyNotFound; DeviceUnavailable.
        """
        if not self._unseal_size_ok(aad, sealed):
            raise UnsealFailed()
        return self._worker.call(lambda: self._device.unseal(key_id, aad, sealed),
                                 affinity=key_id)

    def seal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        """``seal`` for many (key_id, aad, plaintext) items, in order, as one TPM job.

        Raises: InvalidArgument (an item too long); KeyNotFound; DeviceUnavailable (for the
        whole batch).
        """
        for index, (_, aad, plaintext) in enumerate(items):
            self._check_seal_size(aad, plaintext, f"items[{index}].plaintext")
        jobs = [(key_id, aad, os.urandom(IV_LEN), plaintext) for key_id, aad, plaintext in items]
        if not jobs:
            return []

        def run() -> list[bytes]:
            out: list[bytes] = [b""] * len(jobs)
            for i in self._device.grouped([key_id for key_id, _, _, _ in jobs]):
                out[i] = self._device.seal(*jobs[i])
            return out

        return self._worker.call(run, affinity=jobs[0][0])

    def unseal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]
                    ) -> list[bytes | InvalidTicket]:
        """``unseal`` for many (key_id, aad, sealed) items, in order, as one TPM job.

        An item that fails authentication or names a missing key yields its UnsealFailed /
        KeyNotFound in place of the plaintext.
        Raises: DeviceUnavailable (for the whole batch).
        """
        out: list[bytes | InvalidTicket] = [UnsealFailed() for _ in items]
        todo = [i for i, (_, aad, sealed) in enumerate(items) if self._unseal_size_ok(aad, sealed)]
        if not todo:
            return out

        def run() -> list[bytes | InvalidTicket]:
            order = self._device.grouped([items[i][0] for i in todo])
            for position in order:
                index = todo[position]
                key_id, aad, sealed = items[index]
                try:
                    out[index] = self._device.unseal(key_id, aad, sealed)
                except (UnsealFailed, KeyNotFound) as exc:
                    out[index] = exc
            return out

        return self._worker.call(run, affinity=items[todo[0]][0])

    # -- status --------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        """TCTI and tpm2-pytss version; TPM manufacturer, vendor string and firmware."""
        library = f"{self._tcti} (tpm2-pytss {_pytss_version()}"
        if self._swtpm is not None:
            library += f", embedded swtpm, state {self._swtpm.state_dir}"
        return BackendInfo(backend=self.name, library=library + ")", token=self._info.token,
                           sessions=1)

    # -- helpers -------------------------------------------------------------------------------

    def _check_seal_size(self, aad: bytes, plaintext: bytes, field: str) -> None:
        """Raises: InvalidArgument unless aad | iv | ciphertext fits one TPM command."""
        limit = self._max_buffer - IV_LEN - len(aad)
        if len(plaintext) > limit:
            raise InvalidArgument(
                field,
                f"{len(plaintext)} octets is too long for the TPM: it takes at most "
                f"{self._max_buffer} octets per command, which leaves {max(limit, 0)} for the "
                f"plaintext next to {len(aad)} octets of aad and the {IV_LEN}-octet IV",
            )

    def _unseal_size_ok(self, aad: bytes, sealed: bytes) -> bool:
        """False for a body shorter than iv + mac, or too long for any seal to have made."""
        return (len(sealed) >= IV_LEN + MAC_LEN
                and len(aad) + len(sealed) - MAC_LEN <= self._max_buffer)


def _check_key_id(key_id: bytes) -> None:
    """Raises: InvalidArgument unless ``key_id`` is 8 bytes."""
    if not isinstance(key_id, bytes) or len(key_id) != KEY_ID_LEN:
        raise InvalidArgument("key_id", f"must be {KEY_ID_LEN} bytes")


def _pytss_version() -> str:
    try:
        return metadata.version("tpm2-pytss")
    except metadata.PackageNotFoundError:
        return "unknown version"
