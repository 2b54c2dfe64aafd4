"""The Encrypted payload (SK{...}) with AES-GCM as RFC 5282 defines it for IKEv2.

SK payload with an AEAD cipher (RFC 7296 §3.14, RFC 5282 §3 and §5.1)::

    IKE header | generic header (Next Payload = first inner payload) | IV (8) |
        ciphertext of (inner payloads | padding | Pad Length) | ICV (16 for AES-GCM-16)

The AES key is SK_e without its last 4 octets, the nonce is those 4 octets (salt) then the IV,
and the associated data is the IKE header and the SK payload's generic header (32 octets).
Only ENCR_AES_GCM_16 (20) is implemented: the suite the gateway kit negotiates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authority.ikev2.errors import PayloadError
from authority.ikev2.wire import (
    IKE_HEADER_LEN,
    PAYLOAD_HEADER_LEN,
    PAYLOAD_SK,
    IkeHeader,
    PayloadHeader,
    RawPayload,
    decode_ike_header,
    decode_payload_chain,
    decode_payload_header,
    encode_ike_header,
    encode_payload_chain,
    encode_payload_header,
)

GCM_SALT_LEN = 4
GCM_IV_LEN = 8
GCM_ICV_LEN = 16


def encrypt_message(spi_i: bytes, spi_r: bytes, exchange: int, flags: int, message_id: int,
                    inner: Sequence[RawPayload], sk_e: bytes) -> bytes:
    """An IKE message whose only payload is SK{inner}, sealed with AES-GCM-16 under ``sk_e``
    (key then 4-octet salt, as prf+ cut it).

    Raises PayloadError for a bad header field or payload, ValueError for a bad key size."""
    key, salt = sk_e[:-GCM_SALT_LEN], sk_e[-GCM_SALT_LEN:]
    first, chain = encode_payload_chain(list(inner))
    plaintext = chain + b"\x00"  # no padding (GCM has a 1-octet block), Pad Length 0
    iv = os.urandom(GCM_IV_LEN)
    sk_length = PAYLOAD_HEADER_LEN + GCM_IV_LEN + len(plaintext) + GCM_ICV_LEN
    header = encode_ike_header(IkeHeader(spi_i, spi_r, PAYLOAD_SK, exchange, flags, message_id,
                                         IKE_HEADER_LEN + sk_length))
    sk_header = encode_payload_header(PayloadHeader(first, False, sk_length))
    sealed = AESGCM(key).encrypt(salt + iv, plaintext, header + sk_header)
    return header + sk_header + iv + sealed


def decrypt_message(data: bytes, sk_e: bytes) -> tuple[IkeHeader, list[RawPayload]]:
    """Open a message made of one SK payload: its header and the inner payloads.

    Raises PayloadError for malformed octets or a failed integrity check (wrong keys)."""
    if len(data) < IKE_HEADER_LEN + PAYLOAD_HEADER_LEN + GCM_IV_LEN + GCM_ICV_LEN + 1:
        raise PayloadError(f"encrypted message too short: {len(data)} octets")
    header = decode_ike_header(data[:IKE_HEADER_LEN])
    if header.length != len(data) or header.next_payload != PAYLOAD_SK:
        raise PayloadError("expected one SK payload filling the message")
    sk_header = decode_payload_header(data[IKE_HEADER_LEN:IKE_HEADER_LEN + PAYLOAD_HEADER_LEN])
    if sk_header.length != len(data) - IKE_HEADER_LEN:
        raise PayloadError("SK payload length does not match the message")
    start = IKE_HEADER_LEN + PAYLOAD_HEADER_LEN
    iv, sealed = data[start:start + GCM_IV_LEN], data[start + GCM_IV_LEN:]
    key, salt = sk_e[:-GCM_SALT_LEN], sk_e[-GCM_SALT_LEN:]
    try:
        plaintext = AESGCM(key).decrypt(salt + iv, sealed, data[:start])
    except InvalidTag as exc:
        raise PayloadError("SK payload: integrity check failed (wrong SK_e?)") from exc
    pad = plaintext[-1]
    if pad + 1 > len(plaintext):
        raise PayloadError("SK payload: padding longer than the plaintext")
    return header, decode_payload_chain(sk_header.next_payload, plaintext[:-1 - pad])



__all__ = ["GCM_ICV_LEN", "GCM_IV_LEN", "GCM_SALT_LEN", "decrypt_message", "encrypt_message"]
