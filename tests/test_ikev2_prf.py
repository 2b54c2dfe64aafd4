"""IKEv2 PRFs and prf+ (RFC 7296 §2.13): RFC 3566 / 4434 / 4615 / 4231 / 2202 vectors, an
independent AES-XCBC reference built on AES-CBC, the fixed-key PRF rules of RFC 7296 §2.14 and
RFC 5723 §5.1, and the resumed IKE_AUTH's AUTH value (RFC 5723 §4.3.3)."""

from __future__ import annotations

import hmac
import importlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC
from hypothesis import given, settings
from hypothesis import strategies as st

from authority.ikev2 import (
    PayloadError,
    ResumeRequest,
    ResumeResponse,
    UnknownTransformError,
    auth_initiator,
    auth_matches,
    auth_responder,
    encode_resume_request,
    encode_resume_response,
    prf,
    prf_info,
    prf_key_length,
    prf_output_length,
    prf_plus,
    resumption_skeyseed,
    signed_octets,
    skeyseed,
)
from authority.ikev2.aes_prf import aes_xcbc_mac

KEY16 = bytes(range(16))
MSG20 = bytes(range(20))

# RFC 3566 §4.6: AES-XCBC-MAC (full 128 bits) with key 000102..0f over 000102.. of n octets.
RFC3566 = [
    (0, "75f0251d528ac01c4573dfd584d79f29"),
    (3, "5b376580ae2f19afe7219ceef172756f"),
    (16, "d2a246fa349b68a79998a4394ff7a263"),
    (20, "47f51b4564966215b8985c63055ed308"),
    (32, "f54f0ec8d2b9f3d36807734bd5283fd4"),
    (34, "becbb3bccdb518a30677d5481fb6b4d8"),
]
# RFC 4434 §2.1: AES-XCBC-PRF-128, message 000102..13.
RFC4434 = [
    ("000102030405060708090a0b0c0d0e0f", "47f51b4564966215b8985c63055ed308"),
    ("00010203040506070809", "0fa087af7d866e7653434e602fdde835"),
    ("000102030405060708090a0b0c0d0e0fedcb", "8cd3c93ae598a9803006ffb67c40e9e4"),
]
# RFC 4615 §4: AES-CMAC-PRF-128, message 000102..13.
RFC4615 = [
    ("000102030405060708090a0b0c0d0e0fedcb", "84a348a4a45d235babfffc0d2b4da09a"),
    ("000102030405060708090a0b0c0d0e0f", "980ae87b5f4c9c5214f5b6a8455e4c2d"),
    ("00010203040506070809", "290d9e112edb09ee141fcf64c0b72f3d"),
]
# HMAC test case 2 (key "Jefe"): RFC 2202 for SHA-1, RFC 4231 for SHA-2.
JEFE = [
    (2, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    (5, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (6, "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
        "8e2240ca5e69e2c78b3239ecfab21649"),
    (7, "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
        "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"),
]
ALL_PRFS = [2, 4, 5, 6, 7, 8]
SIZES = {2: 20, 4: 16, 5: 32, 6: 48, 7: 64, 8: 16}


def ref_xcbc(key: bytes, message: bytes) -> bytes:
    """AES-XCBC-MAC the long way: derive K1..K3 with AES-CBC on single blocks, then CBC-MAC
    with AES-CBC (zero IV) over the message whose last block is mixed with K2 or padded and
    mixed with K3 (RFC 3566 §4)."""
    def block(k: bytes, data: bytes) -> bytes:
        return Cipher(algorithms.AES(k), modes.CBC(bytes(16))).encryptor().update(data)

    k1, k2, k3 = (block(key, bytes([i]) * 16) for i in (1, 2, 3))
    if message and len(message) % 16 == 0:
        head, last, mix = message[:-16], message[-16:], k2
    else:
        cut = len(message) // 16 * 16
        tail = message[cut:] + b"\x80"
        head, last, mix = message[:cut], tail + bytes(16 - len(tail)), k3
    last = bytes(a ^ b for a, b in zip(last, mix, strict=True))
    return block(k1, head + last)[-16:]


@pytest.mark.parametrize(("size", "expected"), RFC3566)
def test_rfc3566_xcbc_mac(size: int, expected: str) -> None:
    assert aes_xcbc_mac(KEY16, bytes(range(size))).hex() == expected
    assert ref_xcbc(KEY16, bytes(range(size))).hex() == expected


def test_rfc3566_xcbc_mac_1000_zero_octets() -> None:
    assert aes_xcbc_mac(KEY16, bytes(1000)).hex() == "f0dafee895db30253761103b5d84528f"


@pytest.mark.parametrize(("key", "expected"), RFC4434)
def test_rfc4434_aes_xcbc_prf_128(key: str, expected: str) -> None:
    assert prf(4, bytes.fromhex(key), MSG20).hex() == expected


@pytest.mark.parametrize(("key", "expected"), RFC4615)
def test_rfc4615_aes_cmac_prf_128(key: str, expected: str) -> None:
    assert prf(8, bytes.fromhex(key), MSG20).hex() == expected


@pytest.mark.parametrize(("prf_id", "expected"), JEFE)
def test_hmac_prfs(prf_id: int, expected: str) -> None:
    assert prf(prf_id, b"Jefe", b"what do ya want for nothing?").hex() == expected


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), message=st.binary(max_size=80))
def test_xcbc_matches_cbc_reference(key: bytes, message: bytes) -> None:
    assert aes_xcbc_mac(key, message) == ref_xcbc(key, message)


@settings(max_examples=40, deadline=None)
@given(key=st.binary(max_size=40), message=st.binary(max_size=40))
def test_aes_prf_key_rules(key: bytes, message: bytes) -> None:
    """RFC 4434: short keys zero-padded, long keys hashed with XCBC under a zero key.
    RFC 4615: any key that is not 16 octets is replaced by AES-CMAC(0^128, key)."""
    xcbc_key = key + bytes(16 - len(key)) if len(key) <= 16 else ref_xcbc(bytes(16), key)
    assert prf(4, key, message) == ref_xcbc(xcbc_key, message)
    cmac_key = key if len(key) == 16 else _cmac(bytes(16), key)
    assert prf(8, key, message) == _cmac(cmac_key, message)


def _cmac(key: bytes, message: bytes) -> bytes:
    mac = CMAC(algorithms.AES(key))
    mac.update(message)
    return mac.finalize()


@pytest.mark.parametrize("prf_id", ALL_PRFS)
def test_prf_lengths(prf_id: int) -> None:
    assert prf_key_length(prf_id) == prf_output_length(prf_id) == SIZES[prf_id]
    assert len(prf(prf_id, b"k", b"d")) == SIZES[prf_id]
    assert prf_info(prf_id).fixed_key == (prf_id in (4, 8))


@pytest.mark.parametrize("prf_id", [0, 1, 3, 9, 1024, -1])
def test_unknown_prf(prf_id: int) -> None:
    for call in (lambda: prf(prf_id, b"k", b"d"), lambda: prf_plus(prf_id, b"k", b"s", 8),
                 lambda: prf_key_length(prf_id), lambda: prf_output_length(prf_id)):
        with pytest.raises(UnknownTransformError, match=f"unknown PRF transform id {prf_id}"):
            call()
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("prf_id", ALL_PRFS)
def test_prf_plus_definition(prf_id: int) -> None:
    key, seed = b"K" * 7, b"seed octets"
    t1 = prf(prf_id, key, seed + b"\x01")
    t2 = prf(prf_id, key, t1 + seed + b"\x02")
    t3 = prf(prf_id, key, t2 + seed + b"\x03")
    size = SIZES[prf_id]
    assert prf_plus(prf_id, key, seed, 3 * size) == t1 + t2 + t3
    assert prf_plus(prf_id, key, seed, 2 * size + 1) == t1 + t2 + t3[:1]
    assert prf_plus(prf_id, key, seed, 0) == b""


def test_prf_plus_matches_stdlib_hmac() -> None:
    key, seed = bytes(range(32)), b"S" * 50
    out, block = b"", b""
    for counter in range(1, 8):
        block = hmac.new(key, block + seed + bytes([counter]), "sha384").digest()
        out += block
    assert prf_plus(6, key, seed, 300) == out[:300]


@pytest.mark.parametrize("prf_id", [2, 5, 6, 7])
@pytest.mark.parametrize("key", [b"", b"k", bytes(range(200))], ids=["empty", "short", "long"])
def test_prf_plus_keyed_hmac_either_way(prf_id: int, key: bytes,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """prf+ keys its HMAC once per call (OpenSSL's HMAC object, or ``hmac.new``'s where that
    is missing): both give what one ``hmac.digest`` per block gives, for keys shorter and
    longer than the hash's block."""
    seed, size = b"seed" * 9, SIZES[prf_id]
    expected, block = b"", b""
    for counter in range(1, 5):
        block = hmac.digest(key, block + seed + bytes([counter]), prf_info(prf_id).name[9:]
                            .lower().replace("sha2_", "sha"))
        expected += block
    assert prf_plus(prf_id, key, seed, 4 * size) == expected
    monkeypatch.setattr(importlib.import_module("authority.ikev2.prf"), "_openssl_hmac", None)
    assert prf_plus(prf_id, key, seed, 4 * size) == expected


@pytest.mark.parametrize("prf_id", ALL_PRFS)
def test_prf_plus_block_limit(prf_id: int) -> None:
    size = SIZES[prf_id]
    full = prf_plus(prf_id, b"k", b"s", 255 * size)
    assert len(full) == 255 * size
    assert full[-size:] == prf(prf_id, b"k", full[-2 * size : -size] + b"s" + b"\xff")
    with pytest.raises(ValueError, match="at most"):
        prf_plus(prf_id, b"k", b"s", 255 * size + 1)
    with pytest.raises(ValueError, match="negative"):
        prf_plus(prf_id, b"k", b"s", -1)


# --- fixed-key PRFs in SKEYSEED (RFC 7296 §2.14) and resumption (RFC 5723 §5.1) -------------

NI = bytes(range(0x40, 0x60))
NR = bytes(range(0x80, 0xA0))


def test_skeyseed_xcbc_takes_half_the_key_from_each_nonce() -> None:
    g_ir = b"\x5a" * 64
    assert skeyseed(4, NI, NR, g_ir) == ref_xcbc(NI[:8] + NR[:8], g_ir)
    assert skeyseed(8, NI, NR, g_ir) == _cmac(NI[:8] + NR[:8], g_ir)
    # nonces that already add up to 16 octets are the key as they are
    assert skeyseed(4, NI[:8], NR[:8], g_ir) == ref_xcbc(NI[:8] + NR[:8], g_ir)
    assert skeyseed(4, NI[:4], NR[:12], g_ir) == ref_xcbc(NI[:4] + NR[:12], g_ir)
    with pytest.raises(ValueError, match="at least 8 octets"):
        skeyseed(4, NI[:4], NR, g_ir)


def test_skeyseed_hmac_uses_whole_nonces() -> None:
    assert skeyseed(5, NI, NR, b"g") == hmac.new(NI + NR, b"g", "sha256").digest()


@pytest.mark.parametrize("prf_id", [4, 8])
def test_resumption_with_fixed_key_prf_keys_with_sk_d_old(prf_id: int) -> None:
    sk_d_old = bytes(range(0xA0, 0xB0))
    data = b"Resumption" + NI + NR
    expected = ref_xcbc(sk_d_old, data) if prf_id == 4 else _cmac(sk_d_old, data)
    assert resumption_skeyseed(prf_id, sk_d_old, NI, NR) == expected
    with pytest.raises(ValueError, match="16 octets"):
        resumption_skeyseed(prf_id, bytes(32), NI, NR)


# --- AUTH of the resumed IKE_AUTH (RFC 5723 §4.3.3) -----------------------------------------

SPI_I = bytes.fromhex("a1a2a3a4a5a6a7a8")
SPI_R = bytes.fromhex("b1b2b3b4b5b6b7b8")
ID_I = bytes([2, 0, 0, 0]) + b"client.example"   # ID_FQDN, RESERVED, data
ID_R = bytes([2, 0, 0, 0]) + b"gw.example"
SK_PI = bytes(range(0x10, 0x30))
SK_PR = bytes(range(0x30, 0x50))
REQUEST = encode_resume_request(ResumeRequest(SPI_I, NI, b"opaque-ticket"))
RESPONSE = encode_resume_response(ResumeResponse(SPI_I, SPI_R, NR))


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, "sha256").digest()


def test_auth_initiator_independent() -> None:
    expected = _mac(SK_PI, REQUEST + NR + _mac(SK_PI, ID_I))
    assert auth_initiator(5, SK_PI, REQUEST, NR, ID_I) == expected
    assert signed_octets(5, SK_PI, REQUEST, NR, ID_I) == REQUEST + NR + _mac(SK_PI, ID_I)


def test_auth_responder_independent() -> None:
    expected = _mac(SK_PR, RESPONSE + NI + _mac(SK_PR, ID_R))
    assert auth_responder(5, SK_PR, RESPONSE, NI, ID_R) == expected


def test_auth_has_no_key_pad_step() -> None:
    padded = _mac(_mac(SK_PI, b"Key Pad for IKEv2"), REQUEST + NR + _mac(SK_PI, ID_I))
    assert auth_initiator(5, SK_PI, REQUEST, NR, ID_I) != padded


def test_auth_depends_on_every_input() -> None:
    base = auth_initiator(5, SK_PI, REQUEST, NR, ID_I)
    assert auth_initiator(5, SK_PR, REQUEST, NR, ID_I) != base
    assert auth_initiator(5, SK_PI, RESPONSE, NR, ID_I) != base
    assert auth_initiator(5, SK_PI, REQUEST, NI, ID_I) != base
    assert auth_initiator(5, SK_PI, REQUEST, NR, ID_R) != base


def test_auth_matches() -> None:
    value = auth_initiator(5, SK_PI, REQUEST, NR, ID_I)
    assert auth_matches(value, bytes(value))
    assert not auth_matches(value, value[:-1] + bytes([value[-1] ^ 1]))
    assert not auth_matches(value, b"")


@pytest.mark.parametrize(("args", "match"), [
    ((SK_PI[:-1], REQUEST, NR, ID_I), "SK_px must be 32"),
    ((SK_PI, REQUEST[:27], NR, ID_I), "IKE header"),
    ((SK_PI, REQUEST, b"", ID_I), "nonce"),
    ((SK_PI, REQUEST, NR, ID_I[:3]), "ID payload body"),
])
def test_auth_input_checks(args: tuple[bytes, bytes, bytes, bytes], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auth_initiator(5, *args)


def test_auth_with_xcbc_prf() -> None:
    sk_pi = bytes(16)
    expected = ref_xcbc(sk_pi, REQUEST + NR + ref_xcbc(sk_pi, ID_I))
    assert auth_initiator(4, sk_pi, REQUEST, NR, ID_I) == expected


def test_payload_error_is_not_raised_by_prf() -> None:
    assert not issubclass(UnknownTransformError, PayloadError)
