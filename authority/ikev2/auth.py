"""The AUTH payload of the IKE_AUTH exchange that follows IKE_SESSION_RESUME (RFC 5723 §4.3.3).

RFC 5723 §4.3.3 defines ``AUTH = prf(SK_px, <message octets>)`` with SK_pi (initiator) or SK_pr
(responder) of the *resumed* SA and the message octets of RFC 4306 §2.15 (RFC 7296 §2.15), i.e.
the shared-key computation with SK_px in place of ``prf(Shared Secret, "Key Pad for IKEv2")``:

- **No "Key Pad for IKEv2" step.** SK_px is already a PRF-sized key derived for this SA, so it
  is used directly as the PRF key.
- **The signed octets are RFC 7296 §2.15's**, with the IKE_SESSION_RESUME exchange playing the
  part of IKE_SA_INIT::

      InitiatorSignedOctets = RealMessage1 | NonceRData | MACedIDForI
      MACedIDForI           = prf(SK_pi, RestOfInitIDPayload)
      ResponderSignedOctets = RealMessage2 | NonceIData | MACedIDForR
      MACedIDForR           = prf(SK_pr, RestOfRespIDPayload)

  RealMessage1/2 are the IKE_SESSION_RESUME request/response exactly as sent, from the first
  octet of the IKE header's SPIi to the last octet of the last payload (without the four-octet
  non-ESP marker used on port 4500). NonceRData/NonceIData are the bare nonce values of that
  exchange. RestOfInitIDPayload / RestOfRespIDPayload is the IDi / IDr payload without its
  four-octet generic payload header (ID Type, three RESERVED octets, identification data).

The MAC over the ID uses the same SK_px as the outer PRF, as in RFC 7296.

**Another reading, deployed.** libreswan 5.2 computes the resumed AUTH over the message alone,
``prf(SK_px, RealMessage)``, without the peer's nonce and the MACed ID
(lib/libswan/ike_alg_prf_ikev2_mac_ops.c, ``psk_resume``). ``reading=MESSAGE_ONLY`` selects it
so that a gateway can resume sessions of such initiators; ``RFC5723`` is the default (why:
docs/interop.md). Only the resumed AUTH has two readings; the shared-key AUTH of a full
IKE_AUTH (``psk_auth``) is RFC 7296 §2.15's, which every implementation computes alike.
"""

from __future__ import annotations

import hmac

from authority.ikev2.prf import prf, prf_info

IKE_HEADER_LEN = 28
ID_FIXED_LEN = 4  # ID Type + 3 RESERVED octets
KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 §2.15, 17 ASCII octets, no NUL
RFC5723 = "rfc5723"
MESSAGE_ONLY = "message-only"
READINGS = (RFC5723, MESSAGE_ONLY)


def _check(prf_id: int, sk_px: bytes, real_message: bytes, nonce: bytes,
           id_body: bytes) -> None:
    """Raises UnknownTransformError / ValueError for the inputs ``signed_octets`` refuses."""
    key_length = prf_info(prf_id).key_length
    if len(sk_px) != key_length:
        raise ValueError(f"SK_px must be {key_length} octets for PRF {prf_id}, got {len(sk_px)}")
    if len(real_message) < IKE_HEADER_LEN:
        raise ValueError("the real message must include the 28-octet IKE header")
    if not nonce:
        raise ValueError("the peer's nonce must not be empty")
    if len(id_body) < ID_FIXED_LEN:
        raise ValueError("the ID payload body must hold at least ID Type and RESERVED")


def signed_octets(prf_id: int, sk_px: bytes, real_message: bytes, peer_nonce: bytes,
                  id_body: bytes) -> bytes:
    """RealMessage | peer's nonce | prf(SK_px, ID body): the octets AUTH is computed over.

    Raises UnknownTransformError for an unsupported PRF; ValueError for an SK_px of the wrong
    length, a message shorter than an IKE header, an empty nonce or an ID body under 4 octets."""
    _check(prf_id, sk_px, real_message, peer_nonce, id_body)
    return real_message + peer_nonce + prf(prf_id, sk_px, id_body)


def _resumed(prf_id: int, sk_px: bytes, real_message: bytes, nonce: bytes, id_body: bytes,
             reading: str) -> bytes:
    """prf(SK_px, signed octets) in one of the READINGS.

    Raises ValueError for an unknown reading; as ``signed_octets`` does otherwise."""
    if reading == RFC5723:
        return prf(prf_id, sk_px, signed_octets(prf_id, sk_px, real_message, nonce, id_body))
    if reading != MESSAGE_ONLY:
        raise ValueError(f"unknown resumed AUTH reading {reading!r} (known: {READINGS})")
    _check(prf_id, sk_px, real_message, nonce, id_body)   # the same inputs refused
    return prf(prf_id, sk_px, real_message)


def auth_initiator(prf_id: int, sk_pi: bytes, real_message_1: bytes, nonce_r: bytes,
                   id_i_body: bytes, reading: str = RFC5723) -> bytes:
    """The initiator's AUTH data: prf(SK_pi, RealMessage1 | Nr | prf(SK_pi, IDi')), where
    RealMessage1 is the IKE_SESSION_RESUME request and Nr the responder's nonce; with
    ``reading=MESSAGE_ONLY`` prf(SK_pi, RealMessage1).

    Raises UnknownTransformError / ValueError as ``signed_octets`` does; ValueError for an
    unknown reading."""
    return _resumed(prf_id, sk_pi, real_message_1, nonce_r, id_i_body, reading)


def auth_responder(prf_id: int, sk_pr: bytes, real_message_2: bytes, nonce_i: bytes,
                   id_r_body: bytes, reading: str = RFC5723) -> bytes:
    """The responder's AUTH data: prf(SK_pr, RealMessage2 | Ni | prf(SK_pr, IDr')), where
    RealMessage2 is the IKE_SESSION_RESUME response and Ni the initiator's nonce; with
    ``reading=MESSAGE_ONLY`` prf(SK_pr, RealMessage2).

    Raises UnknownTransformError / ValueError as ``signed_octets`` does; ValueError for an
    unknown reading."""
    return _resumed(prf_id, sk_pr, real_message_2, nonce_i, id_r_body, reading)


def psk_auth(prf_id: int, psk: bytes, sk_px: bytes, real_message: bytes, peer_nonce: bytes,
             id_body: bytes) -> bytes:
    """The shared-key AUTH of a full IKE_AUTH (RFC 7296 §2.15):
    prf(prf(PSK, "Key Pad for IKEv2"), RealMessage | peer's nonce | prf(SK_px, ID')), with the
    IKE_SA_INIT request (initiator: SK_pi, Nr, IDi) or response (responder: SK_pr, Ni, IDr).

    Raises ValueError for an empty PSK; as ``signed_octets`` does otherwise."""
    if not psk:
        raise ValueError("the pre-shared key must not be empty")
    return prf(prf_id, prf(prf_id, psk, KEY_PAD),
               signed_octets(prf_id, sk_px, real_message, peer_nonce, id_body))


def auth_matches(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of a computed and a received AUTH value. Never raises."""
    return hmac.compare_digest(expected, received)
