"""Nonce (RFC 7296 §3.9) and Notify (§3.10) payloads, and RFC 5723's ticket notifies.

Notify payload body::

    Protocol ID (1) | SPI Size (1) | Notify Message Type (2) | SPI (SPI Size) | Notification Data

RFC 5723 §8 notifies all have Protocol ID 0 and SPI Size 0:

============================  =====  ==========================================
TICKET_LT_OPAQUE              16409  Lifetime (4, seconds from now) | Ticket
TICKET_REQUEST                16410  empty
TICKET_ACK                    16411  empty
TICKET_NACK                   16412  empty
TICKET_OPAQUE                 16413  Ticket
============================  =====  ==========================================

Encoders and decoders raise ``PayloadError`` for anything that breaks these rules.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from authority.ikev2.errors import PayloadError
from authority.ikev2.wire import (
    PayloadHeader,
    decode_generic_payload,
    encode_generic_payload,
)

NONCE_MIN_LEN = 16
NONCE_MAX_LEN = 256

# Notify message types
COOKIE = 16390
TICKET_LT_OPAQUE = 16409
TICKET_REQUEST = 16410
TICKET_ACK = 16411
TICKET_NACK = 16412
TICKET_OPAQUE = 16413
TICKET_NOTIFY_TYPES = frozenset(
    {TICKET_LT_OPAQUE, TICKET_REQUEST, TICKET_ACK, TICKET_NACK, TICKET_OPAQUE})
TICKET_SIGNAL_TYPES = frozenset({TICKET_REQUEST, TICKET_ACK, TICKET_NACK})
ERROR_TYPES_END = 16384  # notify types below this are errors
COOKIE_MAX_LEN = 64  # RFC 7296 §2.6: 1..64 octets

_NOTIFY_FIXED = struct.Struct(">BBH")
_LIFETIME = struct.Struct(">I")


def check_nonce(nonce: bytes) -> bytes:
    """Return ``nonce`` if its length is 16..256 octets (RFC 7296 §3.9).

    Raises PayloadError otherwise."""
    if not NONCE_MIN_LEN <= len(nonce) <= NONCE_MAX_LEN:
        raise PayloadError(f"Nonce: {len(nonce)} octets, must be 16..256")
    return bytes(nonce)


def encode_nonce_payload(nonce: bytes, next_payload: int = 0, critical: bool = False) -> bytes:
    """A whole Nonce payload.

    Raises PayloadError for a nonce outside 16..256 octets or a next payload over 255."""
    return encode_generic_payload(next_payload, check_nonce(nonce), critical)


def decode_nonce_payload(data: bytes) -> tuple[PayloadHeader, bytes]:
    """Parse exactly one Nonce payload into (generic header, nonce).

    Raises PayloadError for a malformed payload or a nonce outside 16..256 octets."""
    header, body = decode_generic_payload(data)
    return header, check_nonce(body)


@dataclass(frozen=True)
class Notify:
    """A decoded Notify payload body."""

    notify_type: int
    data: bytes = b""
    protocol_id: int = 0
    spi: bytes = b""


def encode_notify_body(notify: Notify) -> bytes:
    """The Notify payload body (without the generic header).

    Raises PayloadError for a protocol id over 255, an SPI over 255 octets or a notify type over
    65535."""
    if not 0 <= notify.protocol_id <= 0xFF:
        raise PayloadError(f"Notify: protocol id {notify.protocol_id} outside 0..255")
    if len(notify.spi) > 0xFF:
        raise PayloadError(f"Notify: SPI of {len(notify.spi)} octets (at most 255)")
    if not 0 <= notify.notify_type <= 0xFFFF:
        raise PayloadError(f"Notify: type {notify.notify_type} outside 0..65535")
    fixed = _NOTIFY_FIXED.pack(notify.protocol_id, len(notify.spi), notify.notify_type)
    return fixed + bytes(notify.spi) + bytes(notify.data)


def decode_notify_body(body: bytes) -> Notify:
    """Parse a Notify payload body.

    Raises PayloadError if the body is shorter than 4 octets or than its SPI Size says."""
    if len(body) < _NOTIFY_FIXED.size:
        raise PayloadError(f"Notify: body of {len(body)} octets, the fixed part needs 4")
    protocol_id, spi_size, notify_type = _NOTIFY_FIXED.unpack(body[: _NOTIFY_FIXED.size])
    end = _NOTIFY_FIXED.size + spi_size
    if len(body) < end:
        raise PayloadError(f"Notify type {notify_type}: SPI Size {spi_size} runs past the end")
    return Notify(notify_type, bytes(body[end:]), protocol_id, bytes(body[_NOTIFY_FIXED.size:end]))


def encode_notify_payload(notify: Notify, next_payload: int = 0, critical: bool = False) -> bytes:
    """A whole Notify payload.

    Raises PayloadError as ``encode_notify_body`` does, or if it exceeds 65535 octets."""
    return encode_generic_payload(next_payload, encode_notify_body(notify), critical)


def decode_notify_payload(data: bytes) -> tuple[PayloadHeader, Notify]:
    """Parse exactly one Notify payload into (generic header, Notify).

    Raises PayloadError for a malformed payload or body."""
    header, body = decode_generic_payload(data)
    return header, decode_notify_body(body)


def check_cookie(notify: Notify) -> bytes:
    """The cookie of an N(COOKIE) (RFC 7296 §2.6, §3.10.1): protocol 0, no SPI, 1..64 octets.

    Raises PayloadError otherwise."""
    _check_no_spi(notify, "COOKIE")
    if not 1 <= len(notify.data) <= COOKIE_MAX_LEN:
        raise PayloadError(f"COOKIE: {len(notify.data)} octets of data, must be 1..64")
    return notify.data


@dataclass(frozen=True)
class TicketLtOpaque:
    """N(TICKET_LT_OPAQUE): lifetime in seconds from now (informational) and the ticket."""

    lifetime: int
    ticket: bytes


@dataclass(frozen=True)
class TicketOpaque:
    """N(TICKET_OPAQUE): the ticket the client presents."""

    ticket: bytes


@dataclass(frozen=True)
class TicketSignal:
    """N(TICKET_REQUEST), N(TICKET_ACK) or N(TICKET_NACK): no data."""

    notify_type: int


TicketNotify = TicketLtOpaque | TicketOpaque | TicketSignal


def _check_no_spi(notify: Notify, name: str) -> None:
    """Raises PayloadError unless Protocol ID and SPI Size are both 0."""
    if notify.protocol_id != 0:
        raise PayloadError(f"{name}: protocol id must be 0, got {notify.protocol_id}")
    if notify.spi:
        raise PayloadError(f"{name}: SPI size must be 0, got {len(notify.spi)}")


def _check_ticket(ticket: bytes, name: str) -> bytes:
    """Raises PayloadError for an empty ticket."""
    if not ticket:
        raise PayloadError(f"{name}: ticket missing")
    return bytes(ticket)


def ticket_to_notify(ticket_notify: TicketNotify) -> Notify:
    """The Notify for an RFC 5723 ticket notify.

    Raises PayloadError for an empty ticket, a lifetime outside 0..2^32-1 or a signal type that
    is not TICKET_REQUEST/ACK/NACK."""
    if isinstance(ticket_notify, TicketLtOpaque):
        lifetime = ticket_notify.lifetime
        if not 0 <= lifetime <= 0xFFFFFFFF:
            raise PayloadError(f"TICKET_LT_OPAQUE: lifetime {lifetime} outside 0..2^32-1")
        ticket = _check_ticket(ticket_notify.ticket, "TICKET_LT_OPAQUE")
        return Notify(TICKET_LT_OPAQUE, _LIFETIME.pack(lifetime) + ticket)
    if isinstance(ticket_notify, TicketOpaque):
        return Notify(TICKET_OPAQUE, _check_ticket(ticket_notify.ticket, "TICKET_OPAQUE"))
    if ticket_notify.notify_type not in TICKET_SIGNAL_TYPES:
        raise PayloadError(f"notify type {ticket_notify.notify_type} is not a ticket signal")
    return Notify(ticket_notify.notify_type)


def ticket_from_notify(notify: Notify) -> TicketNotify:
    """Interpret one of RFC 5723's five notifies.

    Raises PayloadError for another notify type, a protocol id or SPI size other than 0, a
    TICKET_LT_OPAQUE without its 4-octet lifetime or without a ticket, an empty TICKET_OPAQUE, or
    data in TICKET_REQUEST/ACK/NACK."""
    kind = notify.notify_type
    if kind not in TICKET_NOTIFY_TYPES:
        raise PayloadError(f"notify type {kind} is not an RFC 5723 ticket notify")
    name = _TICKET_NAMES[kind]
    _check_no_spi(notify, name)
    if kind == TICKET_LT_OPAQUE:
        if len(notify.data) < _LIFETIME.size:
            raise PayloadError(f"{name}: lifetime missing ({len(notify.data)} octets of data)")
        (lifetime,) = _LIFETIME.unpack(notify.data[: _LIFETIME.size])
        return TicketLtOpaque(lifetime, _check_ticket(notify.data[_LIFETIME.size :], name))
    if kind == TICKET_OPAQUE:
        return TicketOpaque(_check_ticket(notify.data, name))
    if notify.data:
        raise PayloadError(f"{name}: must carry no data, got {len(notify.data)} octets")
    return TicketSignal(kind)


_TICKET_NAMES = {
    TICKET_LT_OPAQUE: "TICKET_LT_OPAQUE",
    TICKET_REQUEST: "TICKET_REQUEST",
    TICKET_ACK: "TICKET_ACK",
    TICKET_NACK: "TICKET_NACK",
    TICKET_OPAQUE: "TICKET_OPAQUE",
}
