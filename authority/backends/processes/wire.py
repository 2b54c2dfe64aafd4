"""The bytes between the service and its device processes: pure encoding, no I/O, no crypto.

A message travels as one frame: length (4 octets, big-endian) | payload. Payloads:

- hello (parent -> child): UTF-8 JSON of the backend settings, PIN included (never on a command
  line or in the environment);
- request: op (1 octet) | items, where items = count (4) then, per item,
  key_id (2-octet length | bytes) | aad (2-octet length | bytes) | data (4-octet length | bytes).
  SEAL / UNSEAL carry (key_id, aad, data) items; CREATE_KEY, DESTROY_KEY and KEY_ATTRIBUTES one
  (key_id, "", "") item; LIST_KEYS and DESCRIBE none;
- reply: RESULTS (1) | count (4) | per item: tag (1: OK, UNSEAL_FAILED, KEY_NOT_FOUND) |
  4-octet length | bytes (the output; empty; the missing key id), or
  FAILED (1) | error (1: DEVICE_UNAVAILABLE, KEY_NOT_FOUND, STARTUP, FAILED_PRECONDITION,
  INVALID_ARGUMENT) | UTF-8 text (the message; the key id for KEY_NOT_FOUND; field NUL message
  for INVALID_ARGUMENT). The results of LIST_KEYS are the key ids; of KEY_ATTRIBUTES and
  DESCRIBE one UTF-8 JSON object (``encode_flags``, ``encode_info``); of CREATE_KEY and
  DESTROY_KEY none.

Decoders raise WireError for anything that is not exactly one well-formed message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any, Final

from authority.backends.base import BackendInfo
from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    InvalidTicket,
    KeyNotFound,
    UnsealFailed,
)

Items = Sequence[tuple[bytes, bytes, bytes]]

SEAL: Final = 1
UNSEAL: Final = 2
CREATE_KEY: Final = 3
DESTROY_KEY: Final = 4
LIST_KEYS: Final = 5
KEY_ATTRIBUTES: Final = 6
DESCRIBE: Final = 7
OPS: Final = frozenset({SEAL, UNSEAL, CREATE_KEY, DESTROY_KEY, LIST_KEYS, KEY_ATTRIBUTES, DESCRIBE})
RESULTS: Final = 0
FAILED: Final = 1
OK: Final = 0
UNSEAL_FAILED: Final = 1
KEY_NOT_FOUND: Final = 2
DEVICE_UNAVAILABLE: Final = 3
STARTUP: Final = 4
FAILED_PRECONDITION: Final = 5
INVALID_ARGUMENT: Final = 6

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
    if op not in OPS:
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


def encode_invalid_argument(exc: InvalidArgument) -> bytes:
    """A FAILED reply carrying an InvalidArgument: its field and problem, NUL-separated."""
    problem = exc.message.removeprefix(f"{exc.field}: ")
    return encode_failure(INVALID_ARGUMENT, f"{exc.field}\0{problem}")


def _failure(error: int, data: bytes) -> Exception:
    if error == KEY_NOT_FOUND:
        return KeyNotFound(data)
    text = data.decode("utf-8", "replace")
    if error in (DEVICE_UNAVAILABLE, STARTUP):
        return DeviceUnavailable(text)
    if error == FAILED_PRECONDITION:
        return FailedPrecondition(text)
    if error == INVALID_ARGUMENT:
        field, _, problem = text.partition("\0")
        return InvalidArgument(field, problem)
    return WireError(f"unknown error code {error}")


def encode_flags(flags: dict[str, bool]) -> bytes:
    """A key's attributes (``KeyBackend.key_attributes``) as one JSON object."""
    return json.dumps(flags, sort_keys=True).encode()


def decode_flags(data: bytes) -> dict[str, bool]:
    """Raises: WireError unless ``data`` is a JSON object of booleans."""
    flags = _json_object(data)
    if not all(isinstance(value, bool) for value in flags.values()):
        raise WireError("key attributes: a value is not a boolean")
    return flags


def encode_info(info: BackendInfo) -> bytes:
    """What a device process's backend reports (``KeyBackend.describe``) as one JSON object."""
    return json.dumps({"backend": info.backend, "library": info.library, "token": info.token,
                       "sessions": info.sessions}).encode()


def decode_info(data: bytes) -> BackendInfo:
    """Raises: WireError unless ``data`` is what ``encode_info`` makes."""
    fields = _json_object(data)
    try:
        info = BackendInfo(backend=fields["backend"], library=fields["library"],
                           token=fields["token"], sessions=fields["sessions"])
    except KeyError as exc:
        raise WireError(f"backend info: {exc} missing") from None
    if not (all(isinstance(v, str) for v in (info.backend, info.library, info.token))
            and type(info.sessions) is int):
        raise WireError("backend info: a field has the wrong type")
    return info


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, nested too deep
        raise WireError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise WireError("not a JSON object")
    return value


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
