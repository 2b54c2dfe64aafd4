"""Encryption and integrity transforms of an IKE SA and the key lengths they take from prf+
(RFC 7296 §2.14, §3.3.2; RFC 5282 for AES-GCM/CCM, RFC 5930 for AES-CTR, RFC 7634 for
ChaCha20-Poly1305).

Encryption (Transform Type 1), key material per direction (SK_ei / SK_er):

- ENCR_AES_CBC (12): the AES key (128/192/256 bits).
- ENCR_AES_CTR (13): the AES key then a 4-octet nonce (RFC 5930 §2).
- ENCR_AES_CCM_8/12/16 (14/15/16): the AES key then a 3-octet salt (RFC 5282 §7).
- ENCR_AES_GCM_8/12/16 (18/19/20): the AES key then a 4-octet salt (RFC 5282 §7).
- ENCR_CHACHA20_POLY1305 (28): 32-octet key then a 4-octet salt (RFC 7634 §3); its key length is
  fixed, so ``encr_key_bits`` must be 256 (or 0, meaning "no Key Length attribute").

Integrity (Transform Type 3), key per direction (SK_ai / SK_ar): AUTH_HMAC_SHA1_96 (2) 20,
AUTH_AES_XCBC_96 (5) 16, AUTH_AES_CMAC_96 (8) 16, AUTH_HMAC_SHA2_256_128 (12) 32,
AUTH_HMAC_SHA2_384_192 (13) 48, AUTH_HMAC_SHA2_512_256 (14) 64. AEAD ciphers take no integrity
transform (NONE, 0) and have no SK_a; non-AEAD ciphers need one (RFC 7296 §3.3.3, RFC 5282 §8).
"""

from __future__ import annotations

from dataclasses import dataclass

from authority.ikev2.errors import UnknownTransformError

ENCR_AES_CBC = 12
ENCR_AES_CTR = 13
ENCR_AES_CCM_8 = 14
ENCR_AES_CCM_12 = 15
ENCR_AES_CCM_16 = 16
ENCR_AES_GCM_8 = 18
ENCR_AES_GCM_12 = 19
ENCR_AES_GCM_16 = 20
ENCR_CHACHA20_POLY1305 = 28

AUTH_NONE = 0
AUTH_HMAC_SHA1_96 = 2
AUTH_AES_XCBC_96 = 5
AUTH_AES_CMAC_96 = 8
AUTH_HMAC_SHA2_256_128 = 12
AUTH_HMAC_SHA2_384_192 = 13
AUTH_HMAC_SHA2_512_256 = 14

_AES_KEY_BITS = frozenset({128, 192, 256})


@dataclass(frozen=True)
class _Cipher:
    extra: int          # salt / nonce octets appended to the key
    aead: bool
    key_bits: frozenset[int]


_CIPHERS: dict[int, _Cipher] = {
    ENCR_AES_CBC: _Cipher(0, False, _AES_KEY_BITS),
    ENCR_AES_CTR: _Cipher(4, False, _AES_KEY_BITS),
    ENCR_AES_CCM_8: _Cipher(3, True, _AES_KEY_BITS),
    ENCR_AES_CCM_12: _Cipher(3, True, _AES_KEY_BITS),
    ENCR_AES_CCM_16: _Cipher(3, True, _AES_KEY_BITS),
    ENCR_AES_GCM_8: _Cipher(4, True, _AES_KEY_BITS),
    ENCR_AES_GCM_12: _Cipher(4, True, _AES_KEY_BITS),
    ENCR_AES_GCM_16: _Cipher(4, True, _AES_KEY_BITS),
    ENCR_CHACHA20_POLY1305: _Cipher(4, True, frozenset({256})),
}

_INTEG_KEY_LENGTHS: dict[int, int] = {
    AUTH_HMAC_SHA1_96: 20,
    AUTH_AES_XCBC_96: 16,
    AUTH_AES_CMAC_96: 16,
    AUTH_HMAC_SHA2_256_128: 32,
    AUTH_HMAC_SHA2_384_192: 48,
    AUTH_HMAC_SHA2_512_256: 64,
}

SUPPORTED_ENCRYPTION = frozenset(_CIPHERS)
SUPPORTED_INTEGRITY = frozenset(_INTEG_KEY_LENGTHS)


def _cipher(encr_id: int) -> _Cipher:
    try:
        return _CIPHERS[encr_id]
    except (KeyError, TypeError):
        raise UnknownTransformError("encryption", encr_id) from None


def is_aead(encr_id: int) -> bool:
    """True for the combined-mode ciphers (GCM, CCM, ChaCha20-Poly1305).

    Raises UnknownTransformError (a ValueError) for an unsupported id."""
    return _cipher(encr_id).aead


def encryption_key_length(encr_id: int, encr_key_bits: int) -> int:
    """Octets of SK_ei (and of SK_er): the cipher key plus any salt/nonce octets.

    Raises UnknownTransformError for an unsupported id; ValueError if ``encr_key_bits`` is not a
    key size of that cipher."""
    cipher = _cipher(encr_id)
    if encr_id == ENCR_CHACHA20_POLY1305 and encr_key_bits == 0:
        encr_key_bits = 256
    if encr_key_bits not in cipher.key_bits:
        allowed = ", ".join(str(b) for b in sorted(cipher.key_bits))
        raise ValueError(
            f"encryption transform {encr_id} takes a key of {allowed} bits, not {encr_key_bits}")
    return encr_key_bits // 8 + cipher.extra


def integrity_key_length(integ_id: int) -> int:
    """Octets of SK_ai (and of SK_ar); 0 for NONE.

    Raises UnknownTransformError (a ValueError) for an unsupported id."""
    if integ_id == AUTH_NONE:
        return 0
    try:
        return _INTEG_KEY_LENGTHS[integ_id]
    except (KeyError, TypeError):
        raise UnknownTransformError("integrity", integ_id) from None


def check_suite(encr_id: int, integ_id: int) -> None:
    """Check that the integrity transform fits the cipher: NONE with an AEAD cipher, a real
    integrity algorithm with any other cipher.

    Raises UnknownTransformError for unsupported ids; ValueError for a bad combination."""
    aead = is_aead(encr_id)
    integrity_key_length(integ_id)
    if aead and integ_id != AUTH_NONE:
        raise ValueError(
            f"AEAD encryption transform {encr_id} must not have an integrity transform "
            f"(got {integ_id})")
    if not aead and integ_id == AUTH_NONE:
        raise ValueError(f"encryption transform {encr_id} needs an integrity transform")
