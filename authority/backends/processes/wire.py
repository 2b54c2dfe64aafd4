"""The bytes between the service and its device processes: pure encoding, no I/O, no crypto.

A message travels as one frame: length (4 octets, big-endian) | payload. Payloads:

- hello (parent -> child): UTF-8 JSON of the backend settings, PIN included (never on a command
  line or in the environment);
- request: op (1 octet: SEAL or UNSEAL) | items, where items = count (4) then, per item,
  key_id (2-octet length | bytes) | aad (2-octet length | bytes) | data (4-octet length | bytes);
- reply: RESULTS (1) | count (4) | per item: tag (1: OK, UNSEAL_FAILED, KEY_NOT_FOUND) |
  4-octet length | bytes (the output; empty; the missing key id), or
  FAILED (1) | error (1: DEVICE_UNAVAILABLE, KEY_NOT_FOUND, STARTUP) | UTF-8 text (the message;
  the key id for KEY_NOT_FOUND).

Decoders raise WireError for anything that is not exactly one well-formed message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from authority.errors import DeviceUnavailable, InvalidTicket, KeyNotFound, UnsealFailed

Items = Sequence[tuple[bytes, bytes, bytes]]

SEAL: Final = 1
UNSEAL: Final = 2
RESULTS: Final = 0
FAILED: Final = 1
OK: Final = 0
UNSEAL_FAILED: Final = 1
KEY_NOT_FOUND: Final = 2
DEVICE_UNAVAILABLE: Final = 3
STARTUP: Final = 4

MAX_FRAME: Final = 64 << 20   # a full batch of maximum-size tickets is far below this
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class WireError(Exception):
    """A frame or payload that is not a well-formed message."""


def frame_length(prefix: bytes) -> int:
    """The payload length announced by a 4-octet frame prefix. Raises: WireError."""
    if len(prefix) != 4:
        raise WireError("short frame prefix")
    length = int.from_bytes(prefix, "big")
    if length > MAX_FRAME:
        raise WireError(f"frame of {length} octets exceeds {MAX_FRAME}")
    return length


def frame(payload: bytes) -> bytes:
    """``payload`` with its length prefix. Raises: WireError (too large)."""
    if len(payload) > MAX_FRAME:
        raise WireError(f"frame of {len(payload)} octets exceeds {MAX_FRAME}")
    return _U32.pack(len(payload)) + payload


def encode_request(op: int, items: Items) -> bytes:
    """A SEAL or UNSEAL request. Raises: WireError (a field too long for its length)."""
    parts = [bytes([op]), _U32.pack(len(items))]
    try:
        for key_id, aad, data in items:
            parts += (_U16.pack(len(key_id)), key_id, _U16.pack(len(aad)), aad,
                      _U32.pack(len(data)), data)
    except struct.error as exc:
        raise WireError(f"item field too long: {exc}") from exc
    return b"".join(parts)


def decode_request(payload: bytes) -> tuple[int, list[tuple[bytes, bytes, bytes]]]:
    """(op, items) of a request. Raises: WireError."""
    reader = _Reader(payload)
    op = reader.u8()
    if op not in (SEAL, UNSEAL):
        raise WireError(f"unknown operation {op}")
    items = [(reader.field(2), reader.field(2), reader.field(4)) for _ in range(reader.count())]
    reader.end()
    return op, items


def encode_results(results: Sequence[bytes | InvalidTicket]) -> bytes:
    """A RESULTS reply: plaintexts / sealed bodies, or per-item UnsealFailed / KeyNotFound.
    Raises: WireError (an InvalidTicket of another kind)."""
    parts = [bytes([RESULTS]), _U32.pack(len(results))]
    for result in results:
        if isinstance(result, bytes):
            tag, data = OK, result
        elif isinstance(result, KeyNotFound):
            tag, data = KEY_NOT_FOUND, result.key_id
        elif isinstance(result, UnsealFailed):
            tag, data = UNSEAL_FAILED, b""
        else:
            raise WireError(f"cannot encode {type(result).__name__}")
        parts += (bytes([tag]), _U32.pack(len(data)), data)
    return b"".join(parts)


def encode_failure(error: int, text: str | bytes) -> bytes:
    """A FAILED reply: the whole request failed with ``error``."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    return bytes([FAILED, error]) + data


def decode_reply(payload: bytes) -> list[bytes | InvalidTicket]:
    """The results of a reply.

    Raises: DeviceUnavailable or KeyNotFound for a FAILED reply (as the device process raised
    them), StartupError-kind failures as DeviceUnavailable; WireError for a malformed reply.
    """
    reader = _Reader(payload)
    kind = reader.u8()
    if kind == FAILED:
        raise _failure(reader.u8(), reader.rest())
    if kind != RESULTS:
        raise WireError(f"unknown reply kind {kind}")
    results: list[bytes | InvalidTicket] = []
    for _ in range(reader.count()):
        tag, data = reader.u8(), reader.field(4)
        if tag == OK:
            results.append(data)
        elif tag == UNSEAL_FAILED and not data:
            results.append(UnsealFailed())
        elif tag == KEY_NOT_FOUND:
            results.append(KeyNotFound(data))
        else:
            raise WireError(f"bad result tag {tag}")
    reader.end()
    return results


def _failure(error: int, data: bytes) -> Exception:
    if error == KEY_NOT_FOUND:
        return KeyNotFound(data)
    if error in (DEVICE_UNAVAILABLE, STARTUP):
        return DeviceUnavailable(data.decode("utf-8", "replace"))
    return WireError(f"unknown error code {error}")


class _Reader:
    """Reads a payload front to back; every read checks the bounds. Raises: WireError."""

    def __init__(self, payload: bytes) -> None:
        self._data = payload
        self._at = 0

    def take(self, size: int) -> bytes:
        end = self._at + size
        if end > len(self._data):
            raise WireError(f"truncated at octet {self._at} (wanted {size})")
        chunk = self._data[self._at:end]
        self._at = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def count(self) -> int:
        count = int.from_bytes(self.take(4), "big")
        if count > len(self._data):  # each item takes at least one octet
            raise WireError(f"count {count} exceeds the payload")
        return count

    def field(self, width: int) -> bytes:
        return self.take(int.from_bytes(self.take(width), "big"))

    def rest(self) -> bytes:
        chunk = self._data[self._at:]
        self._at = len(self._data)
        return chunk

    def end(self) -> None:
        if self._at != len(self._data):
            raise WireError(f"{len(self._data) - self._at} trailing octets")
