"""Ticket wire format, version 1: layout, limits, encode and decode. No crypto, no I/O.

Ticket (what the client carries, RFC 5723 "ticket by value")::

    0        1        4                12           24               len-16      len
    +--------+--------+----------------+------------+----------------+-----------+
    |version | reserved (3, zero) | key_id (8) | nonce (12) | ciphertext | tag (16) |
    +--------+--------+----------------+------------+----------------+-----------+
    \\______ header: associated data ______/

Version 1 means AES-256-GCM inside a PKCS#11 token. The 12-octet header (version, reserved,
key_id) is the GCM associated data; the nonce is GCM's IV. Version 2 is the TPM's
encrypt-then-MAC: iv (16) | AES-256-CFB ciphertext | HMAC-SHA256 (32) over header | iv |
ciphertext, both keys inside the TPM. The plaintext is encoded by ``encode_contents`` (layout in
docs/ticket-format.md). All integers are big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from authority.errors import InvalidTicket
from authority.state import ResumptionState

FORMAT_V1 = 1          # AES-256-GCM in a PKCS#11 token: nonce (12) | ciphertext | tag (16)
FORMAT_V2_TPM = 2      # TPM encrypt-then-MAC: iv (16) | AES-256-CFB ciphertext | HMAC-SHA256 (32)
#: octets a version's sealed body adds around the plaintext
SEAL_OVERHEAD = {FORMAT_V1: 12 + 16, FORMAT_V2_TPM: 16 + 32}
SUPPORTED_VERSIONS = frozenset(SEAL_OVERHEAD)
KEY_ID_LEN = 8
HEADER_LEN = 12
NONCE_LEN = 12
TAG_LEN = 16
TICKET_ID_LEN = 16
MAX_TICKET_LEN = 1024
MAX_EXTENSIONS_LEN = 128
MAX_REALM_LEN = 64
EXT_REALM = 1          # extension: the gateway realm, UTF-8
EXT_POLICY_EPOCH = 2   # extension: the realm's policy epoch when issued, u64

_HEADER = struct.Struct(">B3s8s")
# ticket_id, issued_at, expires_at, encr_id, encr_key_bits, prf_id, integ_id, dh_group,
# auth_method, spi_i, spi_r
_FIXED = struct.Struct(">16sQQHHHHHB8s8s")
_MIN_PLAINTEXT = _FIXED.size + 1 + 2 + 2 + 2 + 2
MIN_TICKET_LEN = HEADER_LEN + min(SEAL_OVERHEAD.values()) + _MIN_PLAINTEXT


@dataclass(frozen=True)
class ParsedTicket:
    """A ticket split at its seams; nothing in it has been authenticated yet."""

    version: int
    key_id: bytes
    header: bytes   # the associated data
    sealed: bytes   # nonce | ciphertext | tag: what the backend opens


@dataclass(frozen=True)
class TicketContents:
    """The plaintext of a ticket."""

    ticket_id: bytes
    issued_at: int      # Unix seconds
    expires_at: int     # Unix seconds, absolute, 64-bit
    state: ResumptionState
    extensions: bytes = b""  # further (unknown) type (1) | length (2) | value records, kept as is
    realm: str = ""          # extension type 1 (UTF-8, <= 64 octets); absent: the default realm
    policy_epoch: int = 0    # extension type 2 (u64) of the realm when issued; absent: 0


def encode_header(key_id: bytes, version: int = FORMAT_V1) -> bytes:
    """Return the 12-octet header for ``key_id``.

    Raises: ValueError if the key id is not 8 octets or the version is unknown.
    """
    if len(key_id) != KEY_ID_LEN:
        raise ValueError(f"key id must be {KEY_ID_LEN} octets")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unknown ticket format version {version}")
    return _HEADER.pack(version, bytes(3), key_id)


def sealed_ticket_len(version: int, plaintext_len: int) -> int:
    """The length of the ticket a seal of ``plaintext_len`` octets makes under ``version``:
    header, then what the version adds around the plaintext (``SEAL_OVERHEAD``).

    Raises: ValueError if the version is unknown.
    """
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unknown ticket format version {version}")
    return HEADER_LEN + SEAL_OVERHEAD[version] + plaintext_len


def assemble_ticket(header: bytes, sealed: bytes) -> bytes:
    """Join a header and a sealed body into a ticket.

    Raises: ValueError if the result would break the format's limits.
    """
    ticket = header + sealed
    if not MIN_TICKET_LEN <= len(ticket) <= MAX_TICKET_LEN:
        raise ValueError(f"ticket of {len(ticket)} octets outside the format's limits")
    return ticket


def parse_ticket(ticket: bytes) -> ParsedTicket:
    """Split a ticket into header and sealed body, checking syntax only.

    Raises: InvalidTicket (cause for logs) on a wrong length, version or reserved octets.
    """
    if len(ticket) < MIN_TICKET_LEN:
        raise InvalidTicket(f"too short ({len(ticket)} octets)")
    if len(ticket) > MAX_TICKET_LEN:
        raise InvalidTicket(f"too long ({len(ticket)} octets)")
    version, reserved, key_id = _HEADER.unpack_from(ticket)
    if version not in SUPPORTED_VERSIONS:
        raise InvalidTicket(f"unknown format version {version}")
    if len(ticket) < HEADER_LEN + SEAL_OVERHEAD[version] + _MIN_PLAINTEXT:
        raise InvalidTicket(f"too short for version {version} ({len(ticket)} octets)")
    if reserved != bytes(3):
        raise InvalidTicket("reserved octets not zero")
    return ParsedTicket(version, key_id, ticket[:HEADER_LEN], ticket[HEADER_LEN:])


def encode_contents(contents: TicketContents) -> bytes:
    """Encode the plaintext of a ticket.

    Raises: ValueError if a field does not fit its length prefix or the id is not 16 octets.
    """
    s = contents.state
    if len(contents.ticket_id) != TICKET_ID_LEN:
        raise ValueError("ticket id must be 16 octets")
    extensions = encode_extensions(contents.realm, contents.policy_epoch) + contents.extensions
    if len(extensions) > MAX_EXTENSIONS_LEN:
        raise ValueError("extensions too long")
    fixed = _FIXED.pack(contents.ticket_id, contents.issued_at, contents.expires_at, s.encr_id,
                        s.encr_key_bits, s.prf_id, s.integ_id, s.dh_group, s.auth_method,
                        s.spi_i, s.spi_r)
    if len(s.sk_d) > 0xFF:
        raise ValueError("sk_d too long")
    parts = [fixed, bytes([len(s.sk_d)]), s.sk_d]
    for value in (s.id_i, s.id_r, s.gateway_data, extensions):
        if len(value) > 0xFFFF:
            raise ValueError("field too long")
        parts += [len(value).to_bytes(2, "big"), value]
    return b"".join(parts)


def decode_contents(plaintext: bytes) -> TicketContents:
    """Decode a plaintext made by ``encode_contents``; strict (no trailing octets).

    Raises: InvalidTicket if the plaintext is malformed.
    """
    size = len(plaintext)
    if size < _MIN_PLAINTEXT:
        raise InvalidTicket("plaintext truncated")
    (ticket_id, issued_at, expires_at, encr_id, encr_key_bits, prf_id, integ_id, dh_group,
     auth_method, spi_i, spi_r) = _FIXED.unpack_from(plaintext)
    pos = _FIXED.size + 1
    end = pos + plaintext[pos - 1]
    sk_d = plaintext[pos:end]
    fields = []
    for _ in range(4):  # id_i, id_r, gateway_data, extensions: 2-octet length prefixes
        pos = end + 2
        if pos > size:
            raise InvalidTicket("plaintext truncated")
        end = pos + (plaintext[pos - 2] << 8 | plaintext[pos - 1])
        fields.append(plaintext[pos:end])
    if end != size:
        raise InvalidTicket("plaintext truncated" if end > size else
                            "trailing octets in plaintext")
    id_i, id_r, gateway_data, extensions = fields
    realm, epoch, others = decode_extensions(extensions) if extensions else ("", 0, b"")
    state = ResumptionState(id_i, id_r, spi_i, spi_r, sk_d, encr_id, encr_key_bits, prf_id,
                            integ_id, dh_group, auth_method, gateway_data)
    return TicketContents(ticket_id, issued_at, expires_at, state, others, realm, epoch)


def encode_extensions(realm: str, policy_epoch: int) -> bytes:
    """The extension records for a realm and epoch; a default value ("" or 0) is left out.

    Raises: ValueError if the realm is longer than 64 octets or the epoch outside u64.
    """
    out = b""
    if realm:
        raw = realm.encode("utf-8")
        if len(raw) > MAX_REALM_LEN:
            raise ValueError(f"realm longer than {MAX_REALM_LEN} octets")
        out += bytes([EXT_REALM]) + len(raw).to_bytes(2, "big") + raw
    if policy_epoch:
        if not 0 < policy_epoch < 2**64:
            raise ValueError("policy epoch outside 64 bits")
        out += bytes([EXT_POLICY_EPOCH]) + (8).to_bytes(2, "big") + policy_epoch.to_bytes(8, "big")
    return out


def decode_extensions(extensions: bytes) -> tuple[str, int, bytes]:
    """Split extension records into (realm, policy epoch, the other records as they were).

    Raises: InvalidTicket on a truncated record, a repeated or malformed realm or epoch.
    """
    reader = _Reader(extensions)
    realm: str | None = None
    epoch: int | None = None
    others: list[bytes] = []
    while not reader.done():
        kind = reader.take(1)[0]
        value = reader.prefixed(2)
        if kind == EXT_REALM:
            if realm is not None or not 0 < len(value) <= MAX_REALM_LEN:
                raise InvalidTicket("bad realm extension")
            try:
                realm = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidTicket("realm extension not UTF-8") from None
        elif kind == EXT_POLICY_EPOCH:
            if epoch is not None or len(value) != 8:
                raise InvalidTicket("bad policy epoch extension")
            epoch = int.from_bytes(value, "big")
        else:
            others.append(bytes([kind]) + len(value).to_bytes(2, "big") + value)
    return realm or "", epoch or 0, b"".join(others)


class _Reader:
    """Bounds-checked cursor over a byte string."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise InvalidTicket("plaintext truncated")
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def prefixed(self, width: int) -> bytes:
        return self.take(int.from_bytes(self.take(width), "big"))

    def done(self) -> bool:
        return self._pos == len(self._data)
