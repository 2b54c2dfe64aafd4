"""AES-based MACs and PRFs used by IKEv2, on top of ``cryptography``'s AES block function.

- AES-XCBC-MAC (RFC 3566 §4): implemented here over single-block AES (ECB on one block at a
  time is only the raw block cipher; it never encrypts data in ECB mode).
- AES-XCBC-PRF-128 (RFC 4434 §2): a 16-octet key is used as is, a shorter key is padded on the
  right with zero octets, a longer key is first replaced by AES-XCBC-MAC(0^128, key).
- AES-CMAC-PRF-128 (RFC 4615 §3): a 16-octet key is used as is, any other length (shorter or
  longer, no zero padding) is replaced by AES-CMAC(0^128, key).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

BLOCK = 16
_ZERO_KEY = bytes(BLOCK)


def _block_encryptor(key: bytes) -> Cipher[modes.ECB]:
    """The raw AES block function under ``key`` (used one block at a time).

    Raises ValueError if ``key`` is not a valid AES key length."""
    return Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305 - raw block function for XCBC


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(BLOCK, "big")


def aes_xcbc_mac(key: bytes, message: bytes) -> bytes:
    """AES-XCBC-MAC (RFC 3566 §4) of ``message`` under the 16-octet ``key``; full 16 octets
    (truncate to 12 for AES-XCBC-MAC-96).

    Raises ValueError if ``key`` is not exactly 16 octets."""
    if len(key) != BLOCK:
        raise ValueError(f"AES-XCBC-MAC key must be {BLOCK} octets, got {len(key)}")
    derive = _block_encryptor(key).encryptor()
    k1 = derive.update(b"\x01" * BLOCK)
    k2 = derive.update(b"\x02" * BLOCK)
    k3 = derive.update(b"\x03" * BLOCK)
    blocks, last = _split_last_block(message)
    last = _xor(last, k2) if len(last) == BLOCK else _xor(_pad(last), k3)
    enc = _block_encryptor(k1).encryptor()
    state = bytes(BLOCK)
    for block in blocks:
        state = enc.update(_xor(state, block))
    return enc.update(_xor(state, last))


def _split_last_block(message: bytes) -> tuple[list[bytes], bytes]:
    """All blocks but the last (each 16 octets) and the last block (1..16 octets, or empty for an
    empty message)."""
    if not message:
        return [], b""
    cut = ((len(message) - 1) // BLOCK) * BLOCK
    head = [message[i : i + BLOCK] for i in range(0, cut, BLOCK)]
    return head, message[cut:]


def _pad(block: bytes) -> bytes:
    """RFC 3566 padding: a single 1 bit then 0 bits up to the block size."""
    return block + b"\x80" + bytes(BLOCK - len(block) - 1)


def aes_xcbc_prf_128(key: bytes, message: bytes) -> bytes:
    """AES-XCBC-PRF-128 (RFC 4434) with its key-length rule; 16 octets out. Never raises for
    bytes input."""
    if len(key) < BLOCK:
        key = key + bytes(BLOCK - len(key))
    elif len(key) > BLOCK:
        key = aes_xcbc_mac(_ZERO_KEY, key)
    return aes_xcbc_mac(key, message)


def aes_cmac(key: bytes, message: bytes) -> bytes:
    """AES-CMAC (RFC 4493) of ``message`` under ``key`` (16, 24 or 32 octets).

    Raises ValueError if ``key`` is not a valid AES key length."""
    mac = CMAC(algorithms.AES(key))
    mac.update(message)
    return mac.finalize()


def aes_cmac_prf_128(key: bytes, message: bytes) -> bytes:
    """AES-CMAC-PRF-128 (RFC 4615 §3) with its key-length rule; 16 octets out. Never raises for
    bytes input."""
    if len(key) != BLOCK:
        key = aes_cmac(_ZERO_KEY, key)
    return aes_cmac(key, message)
