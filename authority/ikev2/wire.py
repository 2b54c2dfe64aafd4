"""IKEv2 framing: the IKE header (RFC 7296 §3.1), the generic payload header (§3.2) and chains
of payloads. All integers are big-endian; every decoder raises ``PayloadError`` and nothing else
for bad octets.

IKE header (28 octets)::

    SPIi (8) | SPIr (8) | Next Payload (1) | MjVer|MnVer (1) | Exchange Type (1) | Flags (1) |
    Message ID (4) | Length (4, whole message)

Flags: I (0x08, sent by the original initiator), V (0x10, higher version), R (0x20, response);
the other bits are reserved: cleared when sending, ignored on receipt (§3.1). Major version must
be 2; the minor version is ignored on receipt and 0 when sending.

Generic payload header (4 octets)::

    Next Payload (1) | C (1 bit) + RESERVED (7 bits) | Payload Length (2, header included)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from authority.ikev2.errors import PayloadError

IKE_HEADER_LEN = 28
PAYLOAD_HEADER_LEN = 4
MAX_PAYLOAD_LEN = 0xFFFF
MAX_MESSAGE_LEN = 0xFFFFFFFF
IKE_SPI_LEN = 8
ZERO_SPI = bytes(IKE_SPI_LEN)
IKE_MAJOR_VERSION = 2

FLAG_INITIATOR = 0x08
FLAG_VERSION = 0x10
FLAG_RESPONSE = 0x20
_FLAG_MASK = FLAG_INITIATOR | FLAG_VERSION | FLAG_RESPONSE
_CRITICAL = 0x80

# Exchange types (RFC 7296 §3.1, RFC 5723 §8)
IKE_SA_INIT = 34
IKE_AUTH = 35
CREATE_CHILD_SA = 36
INFORMATIONAL = 37
IKE_SESSION_RESUME = 38

# Payload types (RFC 7296 §3.2)
NO_NEXT_PAYLOAD = 0
PAYLOAD_SA = 33
PAYLOAD_KE = 34
PAYLOAD_IDI = 35
PAYLOAD_IDR = 36
PAYLOAD_CERT = 37
PAYLOAD_CERTREQ = 38
PAYLOAD_AUTH = 39
PAYLOAD_NONCE = 40
PAYLOAD_NOTIFY = 41
PAYLOAD_DELETE = 42
PAYLOAD_VENDOR_ID = 43
PAYLOAD_TSI = 44
PAYLOAD_TSR = 45
PAYLOAD_SK = 46
PAYLOAD_CP = 47
PAYLOAD_EAP = 48
PAYLOAD_SKF = 53  # RFC 7383
KNOWN_PAYLOAD_TYPES = frozenset(range(PAYLOAD_SA, PAYLOAD_EAP + 1)) | {PAYLOAD_SKF}

_HEADER = struct.Struct(">8s8sBBBBII")
_PAYLOAD_HEADER = struct.Struct(">BBH")


def _check_uint(value: int, bits: int, name: str) -> None:
    """Raises PayloadError unless 0 <= value < 2**bits."""
    if not 0 <= value < 1 << bits:
        raise PayloadError(f"{name} must fit in {bits} bits, got {value}")


@dataclass(frozen=True)
class IkeHeader:
    """A decoded IKE header. ``flags`` holds only the I, V and R bits."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange_type: int
    flags: int
    message_id: int
    length: int
    major_version: int = IKE_MAJOR_VERSION
    minor_version: int = 0

    @property
    def initiator(self) -> bool:
        """I flag: sent by the original initiator of the IKE SA."""
        return bool(self.flags & FLAG_INITIATOR)

    @property
    def response(self) -> bool:
        """R flag: this message is a response."""
        return bool(self.flags & FLAG_RESPONSE)


def encode_ike_header(header: IkeHeader) -> bytes:
    """The 28 octets of ``header``.

    Raises PayloadError for SPIs that are not 8 octets, reserved flag bits, a major version
    other than 2, a length under 28 or any field too large for its width."""
    if len(header.spi_i) != IKE_SPI_LEN or len(header.spi_r) != IKE_SPI_LEN:
        raise PayloadError("IKE header: SPIi and SPIr must be 8 octets each")
    if header.flags & ~_FLAG_MASK:
        raise PayloadError(f"IKE header: reserved flag bits set in {header.flags:#04x}")
    if header.major_version != IKE_MAJOR_VERSION:
        raise PayloadError(f"IKE header: major version must be 2, got {header.major_version}")
    for value, bits, name in ((header.next_payload, 8, "next payload"),
                              (header.exchange_type, 8, "exchange type"),
                              (header.flags, 8, "flags"), (header.minor_version, 4, "minor"),
                              (header.message_id, 32, "message id"),
                              (header.length, 32, "length")):
        _check_uint(value, bits, f"IKE header: {name}")
    if header.length < IKE_HEADER_LEN:
        raise PayloadError(f"IKE header: length {header.length} is shorter than the header")
    version = header.major_version << 4 | header.minor_version
    return _HEADER.pack(header.spi_i, header.spi_r, header.next_payload, version,
                        header.exchange_type, header.flags, header.message_id, header.length)


def decode_ike_header(data: bytes) -> IkeHeader:
    """Parse exactly 28 octets as an IKE header (reserved flag bits are dropped, §3.1).

    Raises PayloadError for a wrong size, a major version other than 2 or a length field under
    28."""
    if len(data) != IKE_HEADER_LEN:
        raise PayloadError(f"IKE header: need {IKE_HEADER_LEN} octets, got {len(data)}")
    spi_i, spi_r, nxt, version, exchange, flags, message_id, length = _HEADER.unpack(data)
    if version >> 4 != IKE_MAJOR_VERSION:
        raise PayloadError(f"IKE header: unsupported major version {version >> 4}")
    if length < IKE_HEADER_LEN:
        raise PayloadError(f"IKE header: length field {length} is shorter than the header")
    return IkeHeader(spi_i, spi_r, nxt, exchange, flags & _FLAG_MASK, message_id, length,
                     IKE_MAJOR_VERSION, version & 0x0F)


@dataclass(frozen=True)
class PayloadHeader:
    """A decoded generic payload header."""

    next_payload: int
    critical: bool
    length: int


def encode_payload_header(header: PayloadHeader) -> bytes:
    """The 4 octets of a generic payload header (RESERVED bits zero).

    Raises PayloadError for a next payload over 255 or a length outside 4..65535."""
    _check_uint(header.next_payload, 8, "payload header: next payload")
    if not PAYLOAD_HEADER_LEN <= header.length <= MAX_PAYLOAD_LEN:
        raise PayloadError(f"payload header: length {header.length} outside 4..65535")
    return _PAYLOAD_HEADER.pack(header.next_payload, _CRITICAL if header.critical else 0,
                                header.length)


def decode_payload_header(data: bytes) -> PayloadHeader:
    """Parse exactly 4 octets as a generic payload header (RESERVED bits ignored, §3.2).

    Raises PayloadError for a wrong size or a length field under 4."""
    if len(data) != PAYLOAD_HEADER_LEN:
        raise PayloadError(f"payload header: need 4 octets, got {len(data)}")
    nxt, flags, length = _PAYLOAD_HEADER.unpack(data)
    if length < PAYLOAD_HEADER_LEN:
        raise PayloadError(f"payload header: length field {length} is shorter than the header")
    return PayloadHeader(nxt, bool(flags & _CRITICAL), length)


def encode_generic_payload(next_payload: int, body: bytes, critical: bool = False) -> bytes:
    """One payload: generic header then ``body``.

    Raises PayloadError if the payload would exceed 65535 octets or next payload is over 255."""
    length = PAYLOAD_HEADER_LEN + len(body)
    if length > MAX_PAYLOAD_LEN:
        raise PayloadError(f"payload too long: {length} octets (at most 65535)")
    return encode_payload_header(PayloadHeader(next_payload, critical, length)) + bytes(body)


def decode_generic_payload(data: bytes) -> tuple[PayloadHeader, bytes]:
    """Split exactly one payload into its header and body.

    Raises PayloadError if ``data`` is shorter than 4 octets or its length field does not equal
    ``len(data)``."""
    if len(data) < PAYLOAD_HEADER_LEN:
        raise PayloadError(f"payload truncated: {len(data)} octets, header needs 4")
    header = decode_payload_header(data[:PAYLOAD_HEADER_LEN])
    if header.length != len(data):
        raise PayloadError(
            f"payload length field says {header.length} octets, got {len(data)}")
    return header, data[PAYLOAD_HEADER_LEN:]


@dataclass(frozen=True)
class RawPayload:
    """One payload of a chain: its type (from the previous header), C bit and body."""

    payload_type: int
    critical: bool
    body: bytes


def encode_payload_chain(payloads: Sequence[RawPayload]) -> tuple[int, bytes]:
    """Chain payloads: returns (type of the first payload or 0, octets).

    Raises PayloadError for a payload type outside 1..255 or a payload over 65535 octets."""
    out = bytearray()
    for index, payload in enumerate(payloads):
        if not 1 <= payload.payload_type <= 0xFF:
            raise PayloadError(f"payload type {payload.payload_type} outside 1..255")
        nxt = payloads[index + 1].payload_type if index + 1 < len(payloads) else NO_NEXT_PAYLOAD
        out += encode_generic_payload(nxt, payload.body, payload.critical)
    first = payloads[0].payload_type if payloads else NO_NEXT_PAYLOAD
    return first, bytes(out)


def decode_payload_chain(first_type: int, data: bytes) -> list[RawPayload]:
    """Walk a payload chain that starts with a payload of ``first_type`` and must fill ``data``
    exactly.

    Raises PayloadError for a truncated header, a length field under 4 or past the end, octets
    left after the last payload, or a chain that ends (next payload 0) before the data does."""
    payloads: list[RawPayload] = []
    offset, current = 0, first_type
    while current != NO_NEXT_PAYLOAD:
        if len(data) - offset < PAYLOAD_HEADER_LEN:
            raise PayloadError(
                f"payload {len(payloads) + 1} (type {current}): header truncated")
        header = decode_payload_header(data[offset : offset + PAYLOAD_HEADER_LEN])
        if header.length > len(data) - offset:
            raise PayloadError(
                f"payload {len(payloads) + 1} (type {current}): length {header.length} runs "
                f"past the end of the message")
        body = bytes(data[offset + PAYLOAD_HEADER_LEN : offset + header.length])
        payloads.append(RawPayload(current, header.critical, body))
        offset += header.length
        current = header.next_payload
    if offset != len(data):
        raise PayloadError(f"{len(data) - offset} trailing octets after the last payload")
    return payloads


def encode_message(header: IkeHeader, payloads: Sequence[RawPayload]) -> bytes:
    """An IKE message: ``header`` with its next payload and length replaced by the chain's.

    Raises PayloadError as ``encode_ike_header`` and ``encode_payload_chain`` do, or if the
    message exceeds 2^32 - 1 octets."""
    first, body = encode_payload_chain(payloads)
    length = IKE_HEADER_LEN + len(body)
    _check_uint(length, 32, "message length")
    fixed = IkeHeader(header.spi_i, header.spi_r, first, header.exchange_type, header.flags,
                      header.message_id, length, header.major_version, header.minor_version)
    return encode_ike_header(fixed) + body


def decode_message(data: bytes) -> tuple[IkeHeader, list[RawPayload]]:
    """Split an IKE message into its header and payloads (not interpreted).

    Raises PayloadError for a bad header, a length field that differs from ``len(data)`` or a
    malformed payload chain."""
    if len(data) < IKE_HEADER_LEN:
        raise PayloadError(f"message truncated: {len(data)} octets, the IKE header needs 28")
    header = decode_ike_header(data[:IKE_HEADER_LEN])
    if header.length != len(data):
        raise PayloadError(
            f"IKE header length field says {header.length} octets, message has {len(data)}")
    return header, decode_payload_chain(header.next_payload, data[IKE_HEADER_LEN:])
