"""The audit log: an append-only JSON-lines file of admin actions and key lifecycle events, each
line chained to the one before it by a SHA-256 hash.

One line is one JSON object with exactly these members::

    {"action": "key.rotated", "actor": "spiffe://example.org/admin/alice",
     "details": {...}, "hash": "<64 hex>", "prev": "<64 hex>", "seq": 7,
     "time": "2027-01-15T08:00:00.000000Z"}

- ``seq`` counts from 1 and grows by exactly 1 per line;
- ``time`` is UTC, ISO 8601 with microseconds and a ``Z``;
- ``actor`` is who did it: the URI SAN of the caller's verified client certificate, ``local``
  for a call without one (plaintext loopback or the admin socket), ``system`` for automatic
  events (first key, scheduled rotation, seal budget, destruction when a window closes);
- ``details`` holds key ids (hex), reasons and times; never tickets, SK_d, PINs or owner auth;
- ``prev`` is the ``hash`` of the previous line (64 zeros on the first line);
- ``hash`` is ``sha256(canonical(entry without "hash")).hexdigest()`` where ``canonical`` is
  ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` encoded as
  UTF-8. The line itself is the canonical JSON of the whole entry (``hash`` included) plus
  ``"\\n"``, so ``verify`` can recompute every hash from the file alone.

The chain makes any edit, removal, reordering or insertion visible from that line on; it does
not stop someone who can write the file from rewriting the whole chain (ship the log off the
host, or keep the last hash elsewhere, for that: docs/threat-model.md).

Fail-closed: ``record`` writes the line (``O_APPEND``, one ``write``, then ``fsync``) and only
then returns; callers write the line *before* the change takes effect (the key ring calls its
audit hook before it commits, and before a key is destroyed in the device), so when the log
cannot be written the action is refused with UNAVAILABLE and nothing changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authority.errors import AuthorityError, StartupError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FIELDS = frozenset({"seq", "time", "actor", "action", "details", "prev", "hash"})
SYSTEM = "system"
LOCAL = "local"

AuditHook = Callable[[str, str, Mapping[str, Any]], None]
"""``hook(actor, action, details)``: write one audit line; raises AuditUnavailable."""


class AuditUnavailable(AuthorityError):
    """The audit log cannot be written: the action it would record is refused."""

    status = "UNAVAILABLE"


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an object: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of ``entry`` without its ``hash`` member."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify``: ``lines`` good lines read; the first bad one and why."""

    ok: bool
    lines: int
    first_bad_line: int | None = None
    reason: str = ""
    last_hash: str = GENESIS


def _check_line(raw: bytes, prev_seq: int, prev_hash: Any) -> dict[str, Any]:
    """Parse and check one line (with its newline). Raises ValueError(reason)."""
    if not raw.endswith(b"\n"):
        raise ValueError("incomplete line (no newline at the end of the file)")
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if set(entry) != FIELDS:
        raise ValueError(f"members must be {', '.join(sorted(FIELDS))}")
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq != prev_seq + 1:
        raise ValueError(f"seq is {seq!r}, expected {prev_seq + 1}")
    if entry["prev"] != prev_hash:
        raise ValueError("prev does not match the hash of the previous line")
    if entry["hash"] != entry_hash(entry):
        raise ValueError("hash does not match the line's contents")
    if canonical(entry) + b"\n" != raw:
        raise ValueError("not in canonical form")
    return entry


def verify(path: Path) -> VerifyResult:
    """Check the whole chain of an audit log file; names the first bad line (1-based).

    Raises: OSError if the file cannot be read.
    """
    prev_seq, prev_hash, count = 0, GENESIS, 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                entry = _check_line(raw, prev_seq, prev_hash)
            except ValueError as exc:
                return VerifyResult(False, count, number, str(exc), prev_hash)
            prev_seq, prev_hash, count = entry["seq"], entry["hash"], number
    return VerifyResult(True, count, last_hash=prev_hash)


def _last_line(fd: int) -> tuple[bytes, int]:
    """The last line of an open file (with its newline, if any) and its offset; reads
    backwards in blocks, so opening a long log stays cheap. Empty file: (b"", 0)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b"", 0
    block = 4096
    end = size
    data = b""
    while True:
        start = max(0, end - block)
        data = os.pread(fd, end - start, start) + data
        end = start
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0:
            return data[cut + 1:], end + cut + 1
        if start == 0:
            return data, 0


class AuditLog:
    """An open audit log; ``record`` is thread-safe and fail-closed."""

    def __init__(self, path: Path, now: Callable[[], float] | None = None) -> None:
        """Open (create 0600) ``path`` for appending and resume the chain from its last line.

        Raises: StartupError naming ``audit_log`` if the file cannot be opened or its last line
        is not a valid chain link (run ``ticket-authority audit verify`` on it).
        """
        self.path = path
        self._now = now or (lambda: datetime.now(UTC).timestamp())
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd: int | None = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with open(path, "rb") as reader:
                last, _ = _last_line(reader.fileno())
        except OSError as exc:
            raise StartupError(f"audit_log: cannot open {path}: {exc.strerror}") from exc
        self._seq, self._prev = 0, GENESIS
        if last:
            try:
                entry = json.loads(last)
                if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
                    raise ValueError("not an audit entry")
                _check_line(last, entry["seq"] - 1, entry.get("prev"))
            except ValueError as exc:  # JSONDecodeError is a ValueError
                self.close()
                raise StartupError(
                    f"audit_log: the last line of {path} is damaged ({exc}); run "
                    f"'ticket-authority audit verify {path}'") from exc
            self._seq, self._prev = entry["seq"], entry["hash"]

    def record(self, actor: str, action: str, details: Mapping[str, Any]) -> None:
        """Append one entry and fsync it.

        Raises: AuditUnavailable if the line cannot be written (the caller's action must not
        take effect).
        """
        with self._lock:
            if self._fd is None:
                raise AuditUnavailable("audit log closed: action refused")
            stamp = datetime.fromtimestamp(self._now(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            entry: dict[str, Any] = {"seq": self._seq + 1, "time": stamp, "actor": actor,
                                     "action": action, "details": dict(details),
                                     "prev": self._prev}
            entry["hash"] = entry_hash(entry)
            line = canonical(entry) + b"\n"
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(0, f"short write ({written} of {len(line)} octets)")
                os.fsync(self._fd)
            except OSError as exc:
                log.error("audit log %s not written (%s): refusing %s by %s", self.path,
                          exc.strerror or exc, action, actor)
                raise AuditUnavailable(
                    f"audit log cannot be written ({exc.strerror or exc}): action refused"
                ) from exc
            self._seq, self._prev = entry["seq"], entry["hash"]

    @property
    def last_hash(self) -> str:
        """The hash of the last line written (the chain's head)."""
        return self._prev

    def close(self) -> None:
        """Close the file; later ``record`` calls raise AuditUnavailable."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
