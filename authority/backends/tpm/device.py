"""The TPM itself, through one tpm2-pytss ESAPI connection: confined to the backend's worker thread.

Nothing here is thread-safe and nothing needs to be: :class:`Device` is created, used and closed
by the one worker thread of :class:`authority.backends.tpm.backend.TpmBackend`.

:class:`Device` is the facade the backend uses; the work is done by

* ``connection`` -- the ESAPI context and the one way TPM calls are made (busy retries);
* ``probe``      -- start-up properties, capabilities and :class:`DeviceInfo`;
* ``templates``  -- the objects: storage primary and ticket key templates, creation, attributes;
* ``parent``     -- the parent of the ticket keys (our storage primary or a persistent key);
* ``keycache``   -- slots: the LRU of loaded keys, their saved contexts and parsed blobs;
* ``sealing``    -- encrypt-then-MAC seal/unseal with a key's two loaded objects;
* ``recovery``   -- rerunning an operation after a TPM restart, full memory or lost connection.
"""

from __future__ import annotations

from collections.abc import Sequence

from authority.backends.tpm._errors import KeyRefused, Phase
from authority.backends.tpm.blobs import KEY_ID_LEN, BlobStore
from authority.backends.tpm.capabilities import check_capabilities
from authority.backends.tpm.connection import Connection
from authority.backends.tpm.keycache import KeyCache
from authority.backends.tpm.parent import Parent
from authority.backends.tpm.probe import (
    PT_FIXED,
    PT_VAR,
    DeviceInfo,
    describe,
    read_capabilities,
    read_properties,
    transient_slots,
    warn_if_locked_out,
)
from authority.backends.tpm.recovery import recovering
from authority.backends.tpm.sealing import IV_LEN, MAC_LEN, seal, split_sealed, unseal
from authority.backends.tpm.templates import create_key_blobs, read_attributes
from authority.config import Secret
from authority.errors import FailedPrecondition, KeyNotFound, UnsealFailed

__all__ = ["IV_LEN", "MAC_LEN", "Device", "DeviceInfo"]


class Device:
    """One ESAPI connection to the TPM and the objects loaded through it. Worker thread only."""

    def __init__(self, tcti: str, owner_auth: Secret, blobs: BlobStore, retries: int,
                 parent: int | None = None) -> None:
        self._conn = Connection(tcti, owner_auth, retries)
        self._parent = Parent(self._conn, parent)
        self._keys = KeyCache(self._conn, self._parent, blobs)
        self._store = blobs
        self.info: DeviceInfo | None = None
        self.counters: dict[str, int] = self._conn.counters

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> DeviceInfo:
        """Connect, check capabilities, flush stale objects, make the storage primary.

        Raises: StartupError (TpmStartupError) naming tpm.tcti, tpm.owner_auth or tpm.parent.
        """
        conn = self._conn
        conn.connect(Phase.CONNECT)
        fixed = read_properties(conn, PT_FIXED, Phase.CONNECT)
        variable = read_properties(conn, PT_VAR, Phase.STARTUP)
        self._keys.slots = transient_slots(fixed)
        check_capabilities(read_capabilities(conn, self._keys.slots), conn.tcti)
        flushed = conn.flush_stale(Phase.STARTUP)
        warn_if_locked_out(conn.tcti, variable)
        self._parent.prepare()
        self.info = describe(conn.tcti, fixed, variable, self.lru_capacity, flushed)
        return self.info

    @property
    def lru_capacity(self) -> int:
        """Ticket keys kept loaded: two slots each, one slot kept for the primary."""
        return self._keys.capacity

    def close(self) -> None:
        """Flush every object we loaded and close the connection; never raises."""
        if self._conn.esapi is None:
            return
        self._keys.drop_loaded(flush=True)
        self._conn.close()

    def hot_key(self) -> bytes | None:
        """The most recently used loaded ticket key (the worker schedules its jobs first)."""
        return self._keys.hot_key()

    # -- key management ------------------------------------------------------------------------

    def create_key(self, key_id: bytes) -> None:
        """Create the key's AES and HMAC objects under the primary and store their blobs.

        Raises: FailedPrecondition (id taken); KeyProtectionError (the TPM made them otherwise
        than the templates: nothing stored); TpmError; DeviceUnavailable (key dir).
        """
        if self._store.exists(key_id):
            raise FailedPrecondition(f"key {key_id.hex()} already exists in the TPM key dir")

        def op() -> dict[str, bytes]:
            self._keys.make_room(2)  # the primary, and a scratch slot TPM2_Create may need
            parent = self._parent.open()
            try:
                return create_key_blobs(self._conn, parent, key_id)
            finally:
                self._parent.release(parent)

        self._store.write(key_id, recovering(self._conn, self._keys, op))

    def destroy_key(self, key_id: bytes) -> None:
        """Flush the key's objects, drop its saved contexts and delete its blobs.

        Raises: KeyNotFound; DeviceUnavailable (key dir).
        """
        self._keys.forget(key_id)
        if len(key_id) != KEY_ID_LEN or not self._store.delete(key_id):
            raise KeyNotFound(key_id)

    def list_keys(self) -> set[bytes]:
        """Ids of the keys whose blobs are present, less those refused (not the templates'
        keys: checked from their public blobs, no TPM call). Raises: DeviceUnavailable."""
        return self._keys.usable(self._store.list())

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """Both objects' TPMA_OBJECT bits as the TPM reports them (TPM2_ReadPublic).

        Raises: KeyNotFound; TpmError.
        """
        def op() -> dict[str, bool]:
            pair = self._keys.pair(key_id)
            return read_attributes(self._conn, pair.aes, pair.hmac)

        return recovering(self._conn, self._keys, op)

    # -- seal / unseal -------------------------------------------------------------------------

    def seal(self, key_id: bytes, aad: bytes, iv: bytes, plaintext: bytes) -> bytes:
        """iv | AES-256-CFB(plaintext) | HMAC-SHA256(aad | iv | ciphertext), both in the TPM.

        Raises: KeyNotFound; TpmError.
        """
        return recovering(self._conn, self._keys,
                          lambda: seal(self._conn, self._keys.pair(key_id), aad, iv, plaintext))

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Check the HMAC in the TPM (constant-time compare), then decrypt in the TPM.

        Raises: UnsealFailed (MAC mismatch, or a refused key: its tickets are INVALID);
        KeyNotFound; TpmError.
        """
        parts = split_sealed(sealed)

        def op() -> bytes:
            try:
                pair = self._keys.pair(key_id)
            except KeyRefused as exc:
                raise UnsealFailed() from exc
            return unseal(self._conn, pair, aad, parts)

        return recovering(self._conn, self._keys, op)

    def grouped(self, key_ids: Sequence[bytes]) -> list[int]:
        """Indices of ``key_ids`` ordered to load each key once: the loaded key first, then by
        key, in arrival order within a key."""
        hot = self.hot_key()
        return sorted(range(len(key_ids)), key=lambda i: (key_ids[i] != hot, key_ids[i]))
