"""The one interface every key backend (PKCS#11 token, TPM) implements: bytes in, bytes out.

A backend holds ticket protection keys inside its device and runs every seal and unseal there.
No method ever returns key material. Key ids are the 8-octet ids carried in ticket headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from authority.errors import InvalidTicket


@dataclass(frozen=True)
class BackendInfo:
    """What ``GetStatus`` reports about the device."""

    backend: str      # "pkcs11" or "tpm"
    library: str      # module path and description, or TCTI
    token: str        # token label and serial, or TPM manufacturer
    sessions: int     # device sessions (or workers) in use
    processes: int = 0  # device processes running batches (server.device_processes)
    process_restarts: int = 0  # device processes replaced since start
    #: what names the device across restarts (PKCS#11: token label, serial, manufacturer and
    #: model read from the token); empty when the backend cannot tell (the authority then
    #: names it from its settings: authority/statedir.py)
    identity: str = ""


class KeyBackend(Protocol):
    """Seal and unseal inside a device, under keys created and destroyed in it.

    Implementations are thread-safe: the service calls them from many threads at once.
    """

    name: str
    #: ticket format version of this backend's construction (1 = AES-256-GCM in the device)
    format_version: int

    def create_key(self, key_id: bytes) -> None:
        """Generate a new protection key with ``key_id`` in the device.

        Raises: DeviceUnavailable if the device fails; FailedPrecondition if the id is taken.
        """
        ...

    def destroy_key(self, key_id: bytes) -> None:
        """Destroy the key in the device; afterwards nothing it sealed can be opened.

        Raises: KeyNotFound if the device has no such key; DeviceUnavailable if it fails.
        """
        ...

    def list_keys(self) -> set[bytes]:
        """Return the ids of every ticket protection key present in the device.

        Raises: DeviceUnavailable.
        """
        ...

    def refresh(self) -> None:
        """Drop any view of the device's keys this process keeps, so that the next calls see
        keys other processes created or destroyed meanwhile. The key ring calls it before it
        concludes that a key it expects is absent (a few times in a key's life, never per
        ticket); a backend whose device has no such view does nothing.

        Raises: DeviceUnavailable.
        """
        ...

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` (binding ``aad``) under the key.

        Returns the sealed body of the backend's format: for format 1, nonce (12) | ciphertext |
        tag (16), with a fresh random nonce.
        Raises: KeyNotFound, DeviceUnavailable.
        """
        ...

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Verify and decrypt a body made by ``seal`` with the same ``aad``; one device operation.

        Raises: UnsealFailed for any authentication failure (tag, tampering, wrong key);
        KeyNotFound; DeviceUnavailable when the device itself fails.
        """
        ...

    def seal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        """``seal`` for many (key_id, aad, plaintext) items, in order, with one device session.

        Raises: KeyNotFound, DeviceUnavailable (for the whole batch).
        """
        ...

    def unseal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]
                    ) -> list[bytes | InvalidTicket]:
        """``unseal`` for many (key_id, aad, sealed) items, in order, with one device session.

        An item that fails authentication or names a missing key yields its ``UnsealFailed`` /
        ``KeyNotFound`` in place of the plaintext; the other items are unaffected.
        Raises: DeviceUnavailable (for the whole batch).
        """
        ...

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """Read the device's own protection attributes of a key (never its value).

        PKCS#11: sensitive, extractable, always_sensitive, never_extractable, token, private,
        encrypt, decrypt, wrap, unwrap, sign, derive, modifiable.
        TPM: fixed_tpm, fixed_parent, sensitive_data_origin, user_with_auth, no_da, decrypt,
        sign_encrypt (for each of the key's TPM objects, prefixed "aes." / "hmac.").
        Raises: KeyNotFound, DeviceUnavailable.
        """
        ...

    def describe(self) -> BackendInfo:
        """Return what status reports about the device."""
        ...

    def close(self) -> None:
        """Release sessions and the device; the backend is unusable afterwards."""
        ...
