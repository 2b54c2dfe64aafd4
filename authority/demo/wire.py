"""Wire helpers of the demo that ``authority.ikev2`` does not provide: the Encrypted payload
(SK{...}) with AES-GCM as RFC 5282 defines it for IKEv2, the IDi/IDr and AUTH payload bodies,
random SPIs, and short hex for printing.

SK payload with an AEAD cipher (RFC 7296 §3.14, RFC 5282 §3 and §5.1)::

    IKE header | generic header (Next Payload = first inner payload) | IV (8) |
        ciphertext of (inner payloads | padding | Pad Length) | ICV (16 for AES-GCM-16)

The AES key is SK_e without its last 4 octets, the nonce is those 4 octets (salt) then the IV,
and the associated data is the IKE header and the SK payload's generic header (32 octets).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authority.ikev2.errors import PayloadError
from authority.ikev2.wire import (
    IKE_HEADER_LEN,
    PAYLOAD_AUTH,
    PAYLOAD_HEADER_LEN,
    PAYLOAD_SK,
    ZERO_SPI,
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
AUTH_SHARED_KEY_MIC = 2  # RFC 7296 §3.8: Shared Key Message Integrity Code
ID_FQDN = 2
ID_RFC822_ADDR = 3
_ID_NAMES = {1: "IPv4", ID_FQDN: "FQDN", ID_RFC822_ADDR: "RFC822", 5: "IPv6", 9: "DN",
             11: "KEY_ID", 13: "NULL"}


def random_spi() -> bytes:
    """Eight random octets, never all zero. Never raises."""
    while True:
        spi = os.urandom(8)
        if spi != ZERO_SPI:
            return spi


def id_body(id_type: int, data: bytes) -> bytes:
    """An ID payload body: ID Type, three RESERVED octets, identification data. Never raises
    for a type in 0..255."""
    return bytes([id_type, 0, 0, 0]) + data


def describe_id(body: bytes) -> str:
    """``alice@example.net (RFC822)`` for an ID payload body. Never raises."""
    if len(body) < 4:
        return f"<{len(body)} octets>"
    kind = _ID_NAMES.get(body[0], f"type {body[0]}")
    data = body[4:]
    text = data.decode("ascii", "replace") if body[0] in (ID_FQDN, ID_RFC822_ADDR) \
        else data.hex()
    return f"{text} ({kind})"


def auth_body(data: bytes, method: int = AUTH_SHARED_KEY_MIC) -> bytes:
    """An AUTH payload body: Auth Method, three RESERVED octets, authentication data."""
    return bytes([method, 0, 0, 0]) + data


def auth_data(body: bytes) -> bytes:
    """The authentication data of an AUTH payload body.

    Raises PayloadError for a body under 4 octets."""
    if len(body) < 4:
        raise PayloadError(f"AUTH: body of {len(body)} octets, the fixed part needs 4")
    return body[4:]


def short(data: bytes, head: int = 6, tail: int = 2, size: bool = False) -> str:
    """``001122334455...eeff``, with `` (180 octets)`` if ``size``; short values in full.
    Never raises."""
    text = data.hex() if len(data) <= head + tail else \
        f"{data[:head].hex()}...{data[-tail:].hex()}"
    return f"{text} ({len(data)} octets)" if size else text


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


def find(payloads: Sequence[RawPayload], payload_type: int) -> bytes:
    """The body of the one payload of ``payload_type``.

    Raises PayloadError if there is not exactly one."""
    found = [p.body for p in payloads if p.payload_type == payload_type]
    if len(found) != 1:
        raise PayloadError(f"expected one payload of type {payload_type}, got {len(found)}")
    return found[0]


__all__ = ["AUTH_SHARED_KEY_MIC", "ID_FQDN", "ID_RFC822_ADDR", "PAYLOAD_AUTH", "auth_body",
           "auth_data", "decrypt_message", "describe_id", "encrypt_message", "find", "id_body",
           "random_spi", "short"]
