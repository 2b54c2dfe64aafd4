"""Small payload bodies and helpers an IKEv2 responder needs beside the resumption codecs: ID
and AUTH bodies (RFC 7296 §3.5, §3.8), random SPIs, and finding one payload in a chain."""

from __future__ import annotations

import os
from collections.abc import Sequence

from authority.ikev2.errors import PayloadError
from authority.ikev2.wire import ZERO_SPI, RawPayload

AUTH_SHARED_KEY_MIC = 2  # RFC 7296 §3.8: Shared Key Message Integrity Code
ID_IPV4_ADDR = 1
ID_FQDN = 2
ID_RFC822_ADDR = 3
ID_FIXED_LEN = 4  # ID Type + 3 RESERVED octets
_ID_NAMES = {ID_IPV4_ADDR: "IPv4", ID_FQDN: "FQDN", ID_RFC822_ADDR: "RFC822", 5: "IPv6",
             9: "DN", 11: "KEY_ID", 13: "NULL"}


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
    if len(body) < ID_FIXED_LEN:
        return f"<{len(body)} octets>"
    kind = _ID_NAMES.get(body[0], f"type {body[0]}")
    data = body[ID_FIXED_LEN:]
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


def find(payloads: Sequence[RawPayload], payload_type: int) -> bytes:
    """The body of the one payload of ``payload_type``.

    Raises PayloadError if there is not exactly one."""
    found = [p.body for p in payloads if p.payload_type == payload_type]
    if len(found) != 1:
        raise PayloadError(f"expected one payload of type {payload_type}, got {len(found)}")
    return found[0]


def find_optional(payloads: Sequence[RawPayload], payload_type: int) -> bytes | None:
    """The body of the payload of ``payload_type``, None when absent.

    Raises PayloadError if there are several."""
    found = [p.body for p in payloads if p.payload_type == payload_type]
    if len(found) > 1:
        raise PayloadError(f"expected at most one payload of type {payload_type}, "
                           f"got {len(found)}")
    return found[0] if found else None


__all__ = ["AUTH_SHARED_KEY_MIC", "ID_FQDN", "ID_IPV4_ADDR", "ID_RFC822_ADDR", "auth_body",
           "auth_data", "describe_id", "find", "find_optional", "id_body", "random_spi"]
