"""Encrypt-then-MAC with a ticket key's two loaded TPM objects.

Seal: AES-256-CFB by TPM2_EncryptDecrypt2 under the AES object, then TPM2_HMAC (SHA-256) under
the HMAC object over aad | iv | ciphertext; the sealed body is iv | ciphertext | mac. Unseal
recomputes the HMAC in the TPM, compares it in constant time and only then decrypts.
"""

from __future__ import annotations

import hmac as hmac_mod
from typing import Final

from tpm2_pytss.constants import TPM2_ALG  # type: ignore[import-untyped, unused-ignore]

from authority.backends.tpm.connection import Connection
from authority.backends.tpm.keycache import Pair
from authority.errors import UnsealFailed

__all__ = ["IV_LEN", "MAC_LEN", "seal", "split_sealed", "unseal"]

IV_LEN: Final = 16
MAC_LEN: Final = 32


def seal(conn: Connection, pair: Pair, aad: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """iv | AES-256-CFB(plaintext) | HMAC-SHA256(aad | iv | ciphertext), both in the TPM.

    Raises: TpmError.
    """
    if plaintext:
        out, _iv_out = conn.call("TPM2_EncryptDecrypt2 (encrypt)", conn.esapi.encrypt_decrypt_2,
                                 pair.aes, False, TPM2_ALG.CFB, iv, plaintext)
        ciphertext = bytes(out)
    else:
        ciphertext = b""
    return iv + ciphertext + _mac(conn, pair, aad + iv + ciphertext)


def split_sealed(sealed: bytes) -> tuple[bytes, bytes, bytes]:
    """A sealed body's iv, ciphertext and tag. Raises: UnsealFailed (too short)."""
    if len(sealed) < IV_LEN + MAC_LEN:
        raise UnsealFailed()
    return sealed[:IV_LEN], sealed[IV_LEN:-MAC_LEN], sealed[-MAC_LEN:]


def unseal(conn: Connection, pair: Pair, aad: bytes, parts: tuple[bytes, bytes, bytes]) -> bytes:
    """Check the HMAC of ``parts`` (iv, ciphertext, tag) in the TPM (constant-time compare),
    then decrypt in the TPM.

    Raises: UnsealFailed (MAC mismatch); TpmError.
    """
    iv, ciphertext, tag = parts
    if not hmac_mod.compare_digest(_mac(conn, pair, aad + iv + ciphertext), tag):
        raise UnsealFailed()
    if not ciphertext:
        return b""
    out, _iv_out = conn.call("TPM2_EncryptDecrypt2 (decrypt)", conn.esapi.encrypt_decrypt_2,
                             pair.aes, True, TPM2_ALG.CFB, iv, ciphertext)
    return bytes(out)


def _mac(conn: Connection, pair: Pair, data: bytes) -> bytes:
    """TPM2_HMAC (SHA-256) of ``data`` under the pair's HMAC object. Raises: TpmError."""
    return bytes(conn.call("TPM2_HMAC", conn.esapi.hmac, pair.hmac, data, TPM2_ALG.SHA256))
