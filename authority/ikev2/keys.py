"""IKEv2 key derivation: IKE_SA_INIT (RFC 7296 §2.14), rekeying (§2.18), Child SA keying
material (§2.17) and session resumption (RFC 5723 §5.1).

Decisions worth knowing:

- **SKEYSEED's key for AES-XCBC/CMAC (RFC 7296 §2.14).** ``prf(Ni | Nr, g^ir)`` uses the nonces as
  the key. For a PRF with a fixed key size, when Ni and Nr do not add up to that size, half the
  key comes from the start of Ni and half from the start of Nr; for a 128-bit key that is the
  first 8 octets of each. ``skeyseed`` applies this rule (so the RFC 4434/4615 pad-or-hash rule
  is never reached there).
- **Resumption (RFC 5723 §5.1).** ``SKEYSEED = prf(SK_d_old, "Resumption" | Ni | Nr)``: the key
  is SK_d of the old SA, which RFC 7296 §2.13 already sizes to the PRF's preferred key length
  (16 octets for XCBC/CMAC), and Ni and Nr are *data*, whose length is free. The §2.14 nonce
  rule is therefore not applied: it only concerns keys built from Ni | Nr. This is the same
  shape as the rekey SKEYSEED ``prf(SK_d_old, g^ir (new) | Ni | Nr)``, which RFC 7296 also
  feeds whole nonces. "Resumption" is the 10 ASCII octets, no NUL.
- **Length of SK_d.** Every function that takes an SK_d (old or current) requires exactly the
  PRF's preferred key length; any other length means the PRF id and the key disagree (for
  example a ticket recording the wrong PRF), so it is refused rather than silently re-keyed.
- **Nonce lengths are not enforced here** (the NIST CAVS vectors use 8-octet nonces); the payload
  codec enforces RFC 7296's 16..256 octets on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from authority.ikev2.prf import prf, prf_info, prf_plus
from authority.ikev2.transforms import (
    check_suite,
    encryption_key_length,
    integrity_key_length,
)

RESUMPTION_LABEL = b"Resumption"
IKE_SPI_LEN = 8


@dataclass(frozen=True)
class KeyLengths:
    """Octets of each key taken from prf+ (RFC 7296 §2.14), per direction."""

    sk_d: int
    sk_a: int
    sk_e: int
    sk_p: int

    @property
    def total(self) -> int:
        """Octets of prf+ output needed for the whole set."""
        return self.sk_d + 2 * (self.sk_a + self.sk_e + self.sk_p)


@dataclass(frozen=True)
class SaKeys:
    """The seven IKE SA keys, in prf+ order. ``repr`` shows lengths only, never key octets."""

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def __repr__(self) -> str:
        sizes = ", ".join(f"{f.name}=<{len(getattr(self, f.name))} octets>" for f in fields(self))
        return f"SaKeys({sizes})"

    __str__ = __repr__


def key_lengths(prf_id: int, encr_id: int, encr_key_bits: int, integ_id: int) -> KeyLengths:
    """Key lengths of an IKE SA with these transforms.

    Raises UnknownTransformError (a ValueError) for an unsupported id; ValueError for a key size
    the cipher does not have or an integrity transform that does not fit the cipher."""
    check_suite(encr_id, integ_id)
    sk_p = prf_info(prf_id).key_length
    return KeyLengths(
        sk_d=sk_p,
        sk_a=integrity_key_length(integ_id),
        sk_e=encryption_key_length(encr_id, encr_key_bits),
        sk_p=sk_p,
    )


def split_keys(keymat: bytes, lengths: KeyLengths) -> SaKeys:
    """Cut prf+ output into {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}.

    Raises ValueError unless ``keymat`` is exactly ``lengths.total`` octets."""
    if len(keymat) != lengths.total:
        raise ValueError(f"need {lengths.total} octets of keying material, got {len(keymat)}")
    a = lengths.sk_d
    b = a + lengths.sk_a
    c = b + lengths.sk_a
    d = c + lengths.sk_e
    e = d + lengths.sk_e
    f = e + lengths.sk_p
    return SaKeys(keymat[:a], keymat[a:b], keymat[b:c], keymat[c:d], keymat[d:e], keymat[e:f],
                  keymat[f:])


def _check_sk_d(prf_id: int, sk_d: bytes, name: str) -> None:
    """Raises UnknownTransformError for an unknown PRF, ValueError for a wrong-size SK_d."""
    expected = prf_info(prf_id).key_length
    if len(sk_d) != expected:
        raise ValueError(
            f"{name} must be {expected} octets for PRF {prf_id} (its preferred key length), "
            f"got {len(sk_d)}")


def _check_spi(spi: bytes, name: str) -> None:
    """Raises ValueError unless ``spi`` is 8 octets, not all zero."""
    if len(spi) != IKE_SPI_LEN:
        raise ValueError(f"{name} must be {IKE_SPI_LEN} octets, got {len(spi)}")
    if not any(spi):
        raise ValueError(f"{name} must not be zero")


def _check_nonces(ni: bytes, nr: bytes) -> None:
    """Raises ValueError if either nonce is empty."""
    if not ni or not nr:
        raise ValueError("Ni and Nr must not be empty")


def skeyseed(prf_id: int, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) of IKE_SA_INIT (RFC 7296 §2.14), with the §2.14 rule for
    fixed-key PRFs (first half of the key from Ni, second half from Nr).

    Raises UnknownTransformError for an unsupported PRF; ValueError for an empty nonce or, with a
    fixed-key PRF, a nonce shorter than half the key."""
    _check_nonces(ni, nr)
    info = prf_info(prf_id)
    key = ni + nr
    if info.fixed_key and len(key) != info.key_length:
        half = info.key_length // 2
        if len(ni) < half or len(nr) < half:
            raise ValueError(f"{info.name} needs Ni and Nr of at least {half} octets each")
        key = ni[:half] + nr[:half]
    return prf(prf_id, key, g_ir)


def ike_keymat(prf_id: int, skeyseed_: bytes, ni: bytes, nr: bytes, spi_i: bytes,
               spi_r: bytes, length: int) -> bytes:
    """prf+(SKEYSEED, Ni | Nr | SPIi | SPIr), ``length`` octets (RFC 7296 §2.14).

    Raises UnknownTransformError for an unsupported PRF; ValueError for empty nonces, SPIs that
    are not 8 non-zero octets, or a length prf+ cannot produce."""
    _check_nonces(ni, nr)
    _check_spi(spi_i, "SPIi")
    _check_spi(spi_r, "SPIr")
    return prf_plus(prf_id, skeyseed_, ni + nr + spi_i + spi_r, length)


def child_keymat(prf_id: int, sk_d: bytes, ni: bytes, nr: bytes, g_ir_new: bytes = b"",
                 length: int | None = None) -> bytes:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) for a Child SA (RFC 7296 §2.17); pass the new
    shared secret for a CREATE_CHILD_SA with a KE payload, b"" otherwise. ``length`` (octets) is
    required; it only has a default so that it can follow ``g_ir_new``.

    Raises UnknownTransformError for an unsupported PRF; ValueError for a missing length, an
    SK_d of the wrong length, empty nonces or a length prf+ cannot produce."""
    if length is None:
        raise ValueError("child_keymat: length is required")
    _check_sk_d(prf_id, sk_d, "SK_d")
    _check_nonces(ni, nr)
    return prf_plus(prf_id, sk_d, g_ir_new + ni + nr, length)


def rekey_skeyseed(prf_id: int, sk_d: bytes, g_ir_new: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) when rekeying an IKE SA (RFC 7296 §2.18).

    Raises UnknownTransformError for an unsupported PRF; ValueError for an SK_d of the wrong
    length or empty nonces."""
    _check_sk_d(prf_id, sk_d, "SK_d (old)")
    _check_nonces(ni, nr)
    return prf(prf_id, sk_d, g_ir_new + ni + nr)


def resumption_skeyseed(prf_id: int, sk_d_old: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), "Resumption" | Ni | Nr) (RFC 5723 §5.1). ``prf_id`` is the old
    SA's PRF, Ni and Nr are the IKE_SESSION_RESUME nonces. The key is SK_d_old as is (see the
    module docstring for why RFC 7296 §2.14's nonce-key rule does not apply).

    Raises UnknownTransformError for an unsupported PRF; ValueError if SK_d_old is not the PRF's
    preferred key length or a nonce is empty."""
    _check_sk_d(prf_id, sk_d_old, "SK_d_old")
    _check_nonces(ni, nr)
    return prf(prf_id, sk_d_old, RESUMPTION_LABEL + ni + nr)


def derive_ike_keys(prf_id: int, skeyseed_: bytes, ni: bytes, nr: bytes, spi_i: bytes,
                    spi_r: bytes, encr_id: int, encr_key_bits: int, integ_id: int) -> SaKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi |
    SPIr), cut to the lengths of the negotiated transforms (RFC 7296 §2.14).

    Raises UnknownTransformError for unsupported ids; ValueError for a bad key size or
    transform combination, empty nonces or SPIs that are not 8 non-zero octets."""
    lengths = key_lengths(prf_id, encr_id, encr_key_bits, integ_id)
    keymat = ike_keymat(prf_id, skeyseed_, ni, nr, spi_i, spi_r, lengths.total)
    return split_keys(keymat, lengths)


def derive_resumed_keys(prf_id: int, sk_d_old: bytes, ni: bytes, nr: bytes, spi_i: bytes,
                        spi_r: bytes, encr_id: int, encr_key_bits: int,
                        integ_id: int) -> SaKeys:
    """All keys of a resumed IKE SA (RFC 5723 §5.1): ``resumption_skeyseed`` then
    ``derive_ike_keys`` with the new SPIs of the IKE_SESSION_RESUME exchange and the old SA's
    transforms (from the ticket).

    Raises UnknownTransformError for unsupported ids; ValueError as ``resumption_skeyseed`` and
    ``derive_ike_keys`` do."""
    seed = resumption_skeyseed(prf_id, sk_d_old, ni, nr)
    return derive_ike_keys(prf_id, seed, ni, nr, spi_i, spi_r, encr_id, encr_key_bits, integ_id)
