"""IKEv2 pseudo-random functions (RFC 7296 §2.13, §3.3.2 Transform Type 2) and prf+.

Supported PRF transform ids (IANA "Transform Type 2"):

====  =====================  ==================  ============
id    name                   preferred key (o)   output (o)
====  =====================  ==================  ============
2     PRF_HMAC_SHA1          20                  20
4     PRF_AES128_XCBC        16                  16
5     PRF_HMAC_SHA2_256      32                  32
6     PRF_HMAC_SHA2_384      48                  48
7     PRF_HMAC_SHA2_512      64                  64
8     PRF_AES128_CMAC        16                  16
====  =====================  ==================  ============

For HMAC the preferred key size is the hash output size (RFC 7296 §2.13); AES-XCBC-PRF-128
(RFC 4434) and AES-CMAC-PRF-128 (RFC 4615) take 128-bit keys and apply their own rule to keys
of any other length (see ``aes_prf``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from authority.ikev2.aes_prf import aes_cmac_prf_128, aes_xcbc_prf_128
from authority.ikev2.errors import UnknownTransformError

_openssl_hmac: Callable[..., Any] | None
try:   # CPython's OpenSSL binding (hmac.new uses it when it can)
    from _hashlib import hmac_new as _hmac_new
    _openssl_hmac = _hmac_new
except ImportError:   # pragma: no cover - a Python without it: hmac.new
    _openssl_hmac = None

PRF_HMAC_SHA1 = 2
PRF_AES128_XCBC = 4
PRF_HMAC_SHA2_256 = 5
PRF_HMAC_SHA2_384 = 6
PRF_HMAC_SHA2_512 = 7
PRF_AES128_CMAC = 8

PRF_PLUS_MAX_BLOCKS = 255


@dataclass(frozen=True)
class PrfInfo:
    """What the rest of IKEv2 needs to know about one PRF."""

    prf_id: int
    name: str
    key_length: int      # preferred key length in octets (length of SK_d, SK_pi, SK_pr)
    output_length: int   # octets per prf() call
    fixed_key: bool      # True for the AES-based PRFs, which take a 128-bit key


Keyed = Callable[[bytes], Callable[[bytes], bytes]]


def _keyed_hmac(key: bytes, digest: str) -> Any:
    """An HMAC object keyed with ``key``, without data: OpenSSL's own (the C object that
    ``hmac.new`` wraps; no Python layer on each copy, update and digest) when this Python has
    it and it takes ``digest``, else ``hmac.new``'s. Raises ValueError for an unknown digest."""
    if _openssl_hmac is not None:
        try:
            return _openssl_hmac(key, digestmod=digest)
        except ValueError:   # e.g. a digest this OpenSSL refuses (FIPS): hmac.new falls back
            pass
    return hmac.new(key, digestmod=digest)


def _hmac(digest: str) -> tuple[Callable[[bytes, bytes], bytes], Keyed]:
    """HMAC with ``digest``: one call (``hmac.digest``, C-level) and a keyed form for prf+'s
    many blocks under one key (the key's inner and outer pads computed once, then copied per
    block: about half the cost of a one-call HMAC, which looks the digest up and pads the key
    every time)."""
    def compute(key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, digest)

    def keyed(key: bytes) -> Callable[[bytes], bytes]:
        base = _keyed_hmac(key, digest)

        def under(data: bytes) -> bytes:
            mac = base.copy()
            mac.update(data)
            out: bytes = mac.digest()
            return out

        return under

    return compute, keyed


def _plain(compute: Callable[[bytes, bytes], bytes]) -> Keyed:
    """The keyed form of a PRF that gains nothing from keying once."""
    return lambda key: partial(compute, key)


_PRFS: dict[int, tuple[PrfInfo, Callable[[bytes, bytes], bytes], Keyed]] = {
    PRF_HMAC_SHA1: (PrfInfo(PRF_HMAC_SHA1, "PRF_HMAC_SHA1", 20, 20, False), *_hmac("sha1")),
    PRF_AES128_XCBC: (PrfInfo(PRF_AES128_XCBC, "PRF_AES128_XCBC", 16, 16, True),
                      aes_xcbc_prf_128, _plain(aes_xcbc_prf_128)),
    PRF_HMAC_SHA2_256: (
        PrfInfo(PRF_HMAC_SHA2_256, "PRF_HMAC_SHA2_256", 32, 32, False), *_hmac("sha256")),
    PRF_HMAC_SHA2_384: (
        PrfInfo(PRF_HMAC_SHA2_384, "PRF_HMAC_SHA2_384", 48, 48, False), *_hmac("sha384")),
    PRF_HMAC_SHA2_512: (
        PrfInfo(PRF_HMAC_SHA2_512, "PRF_HMAC_SHA2_512", 64, 64, False), *_hmac("sha512")),
    PRF_AES128_CMAC: (PrfInfo(PRF_AES128_CMAC, "PRF_AES128_CMAC", 16, 16, True),
                      aes_cmac_prf_128, _plain(aes_cmac_prf_128)),
}
#: prf+'s counter octets
_COUNTERS = tuple(bytes([n]) for n in range(PRF_PLUS_MAX_BLOCKS + 1))

SUPPORTED_PRFS = frozenset(_PRFS)


def _lookup(prf_id: int) -> tuple[PrfInfo, Callable[[bytes, bytes], bytes], Keyed]:
    try:
        return _PRFS[prf_id]
    except (KeyError, TypeError):
        raise UnknownTransformError("PRF", prf_id) from None


def prf_info(prf_id: int) -> PrfInfo:
    """Name, preferred key length and output length of ``prf_id``.

    Raises UnknownTransformError (a ValueError) for an unsupported id."""
    return _lookup(prf_id)[0]


def prf_key_length(prf_id: int) -> int:
    """Preferred key length in octets (RFC 7296 §2.13): the length of SK_d, SK_pi and SK_pr.

    Raises UnknownTransformError (a ValueError) for an unsupported id."""
    return prf_info(prf_id).key_length


def prf_output_length(prf_id: int) -> int:
    """Octets produced by one ``prf`` call.

    Raises UnknownTransformError (a ValueError) for an unsupported id."""
    return prf_info(prf_id).output_length


def prf(prf_id: int, key: bytes, data: bytes) -> bytes:
    """prf(key, data) for the PRF ``prf_id``; keys of any length are accepted (HMAC as usual,
    AES-XCBC/CMAC with their RFC 4434/4615 key rule).

    Raises UnknownTransformError (a ValueError) for an unsupported id."""
    return _lookup(prf_id)[1](bytes(key), bytes(data))


def prf_plus(prf_id: int, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+(key, seed) truncated to ``length`` octets (RFC 7296 §2.13)::

        T1 = prf(K, S | 0x01), Tn = prf(K, T(n-1) | S | n), prf+ = T1 | T2 | ...

    The counter is one octet, so at most 255 blocks can be produced.

    Raises UnknownTransformError for an unsupported id; ValueError if ``length`` is negative or
    needs more than 255 blocks."""
    info, _, keyed = _lookup(prf_id)
    if length < 0:
        raise ValueError(f"prf+ length must not be negative, got {length}")
    blocks = -(-length // info.output_length)
    if blocks > PRF_PLUS_MAX_BLOCKS:
        raise ValueError(
            f"prf+ can produce at most {PRF_PLUS_MAX_BLOCKS * info.output_length} octets with "
            f"{info.name}, {length} requested")
    under = keyed(bytes(key))
    seed = bytes(seed)
    out: list[bytes] = []
    block = b""
    for counter in range(1, blocks + 1):
        block = under(block + seed + _COUNTERS[counter])
        out.append(block)
    return b"".join(out)[:length]
