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
cannot be written the action is refused with UNAVAILABLE and nothing changes (a line written
in part, or written but not synced, is cut off again).

One chain across processes: several processes on one host (``server.processes``) may append to
one file. ``record`` takes an exclusive ``flock`` on the file, re-reads its last line (the
chain's head, whoever wrote it), appends the next line, syncs it and only then unlocks; so two
processes appending at once write seq n and n+1, linked, never two children of one line. A
damaged last line refuses the append (AuditUnavailable) as it refuses a start.

Replicas sharing a PostgreSQL database keep the same chain, entry for entry in this format, in
a table of the database instead (authority/audit_pg.py); ``AuditSink`` is what both offer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from authority.errors import AuthorityError, StartupError
from authority.flock import flocked

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FIELDS = frozenset({"seq", "time", "actor", "action", "details", "prev", "hash"})
SYSTEM = "system"
LOCAL = "local"
LOCK_WAIT: Final = 10.0   # seconds ``record`` waits for another process's append to finish

AuditHook = Callable[[str, str, Mapping[str, Any]], None]
"""``hook(actor, action, details)``: write one audit line; raises AuditUnavailable."""


class AuditUnavailable(AuthorityError):
    """The audit log cannot be written: the action it would record is refused."""

    status = "UNAVAILABLE"


class AuditSink(Protocol):
    """Where the chain is kept: a file (``AuditLog``) or, for replicas, a PostgreSQL table
    (authority/audit_pg.py). ``record`` is thread-safe and fail-closed."""

    def record(self, actor: str, action: str, details: Mapping[str, Any]) -> None:
        """Append one entry after the chain's current head; return once it is durable.

        Raises: AuditUnavailable (the caller's action must not take effect).
        """
        ...

    @property
    def last_hash(self) -> str:
        """The hash of the last entry this sink wrote or read (GENESIS before any)."""
        ...

    def close(self) -> None:
        """Stop; later ``record`` calls raise AuditUnavailable. Never raises."""
        ...


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an object: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of ``entry`` without its ``hash`` member."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def new_entry(seq: int, prev: str, when: float, actor: str, action: str,
              details: Mapping[str, Any]) -> dict[str, Any]:
    """The entry numbered ``seq`` that follows the entry whose hash is ``prev``, stamped
    ``when`` (Unix seconds), with its own hash. Raises: ValueError, OverflowError (``when``
    not a representable time)."""
    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    entry: dict[str, Any] = {"seq": seq, "time": stamp, "actor": actor, "action": action,
                             "details": dict(details), "prev": prev}
    entry["hash"] = entry_hash(entry)
    return entry


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify``: ``lines`` good lines read; the first bad one and why."""

    ok: bool
    lines: int
    first_bad_line: int | None = None
    reason: str = ""
    last_hash: str = GENESIS


def _parse(raw: bytes) -> Any:
    """The JSON value of one whole line (with its newline). Raises ValueError(reason)."""
    if not raw.endswith(b"\n"):
        raise ValueError("incomplete line (no newline at the end of the file)")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None


def _check_line(raw: bytes, prev_seq: int, prev_hash: Any) -> dict[str, Any]:
    """Parse and check one line (with its newline). Raises ValueError(reason)."""
    entry = _parse(raw)
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


def head_of(raw: bytes) -> tuple[int, str]:
    """The (seq, hash) of a chain's last line (with its newline), checked as a link on its
    own; (0, GENESIS) for no line (``b""``).

    Raises: ValueError(reason) if it is not a valid chain link.
    """
    if not raw:
        return 0, GENESIS
    entry = _parse(raw)
    if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
        raise ValueError("not an audit entry")
    _check_line(raw, entry["seq"] - 1, entry.get("prev"))
    return entry["seq"], entry["hash"]


def verify_lines(lines: Iterable[tuple[int, bytes]]) -> VerifyResult:
    """Check a chain given as (label, line with its newline), in order; ``first_bad_line`` is
    the label of the first bad line (a file's line number, a table's seq).

    Raises: whatever iterating ``lines`` raises.
    """
    prev_seq, prev_hash, count = 0, GENESIS, 0
    for label, raw in lines:
        try:
            entry = _check_line(raw, prev_seq, prev_hash)
        except ValueError as exc:
            return VerifyResult(False, count, label, str(exc), prev_hash)
        prev_seq, prev_hash, count = entry["seq"], entry["hash"], count + 1
    return VerifyResult(True, count, last_hash=prev_hash)


def verify(path: Path) -> VerifyResult:
    """Check the whole chain of an audit log file; names the first bad line (1-based).

    Raises: OSError if the file cannot be read.
    """
    with path.open("rb") as fh:
        return verify_lines(enumerate(fh, start=1))


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


class DamagedHead(Exception):
    """The chain's last link (a file's last line, a table's last entry) is not valid:
    ``reason``, and ``seq`` when the entry names one (then shown as "seq N: reason")."""

    def __init__(self, reason: str, seq: object = None) -> None:
        super().__init__(reason if seq is None else f"seq {seq}: {reason}")
        self.reason = reason
        self.seq = seq


class AuditLog:
    """An open audit log file; ``record`` is thread-safe, safe for several processes
    appending to the same file (``flock``), and fail-closed."""

    def __init__(self, path: Path, now: Callable[[], float] | None = None) -> None:
        """Open (create 0600) ``path`` for appending and check the chain's last line.

        Raises: StartupError naming ``audit_log`` if the file cannot be opened or read, or its
        last line is not a valid chain link (run ``ticket-authority audit verify`` on it).
        """
        self.path = path
        self._now = now or (lambda: datetime.now(UTC).timestamp())
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd: int | None = os.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"audit_log: cannot open {path}: {exc.strerror}") from exc
        self._prev = GENESIS
        try:
            with flocked(self._fd, LOCK_WAIT):
                _, self._prev, _ = self._head(self._fd)
        except OSError as exc:
            self.close()
            raise StartupError(f"audit_log: cannot read {path}: {exc.strerror or exc}") from exc
        except DamagedHead as exc:
            self.close()
            raise StartupError(
                f"audit_log: the last line of {path} is damaged ({exc}); run "
                f"'ticket-authority audit verify {path}'") from exc

    @staticmethod
    def _head(fd: int) -> tuple[int, str, int]:
        """The chain's head as the file holds it now: (seq, hash, the file's size).

        Raises: OSError (unreadable), DamagedHead (the last line is not a valid link).
        """
        size = os.fstat(fd).st_size
        last, _ = _last_line(fd)
        try:
            seq, head = head_of(last)
        except ValueError as exc:
            raise DamagedHead(str(exc)) from None
        return seq, head, size

    def record(self, actor: str, action: str, details: Mapping[str, Any]) -> None:
        """Under the file lock: read the chain's head, append the next entry, fsync it.

        Raises: AuditUnavailable if the line cannot be written (the caller's action must not
        take effect; a line written in part is cut off again) or the last line is damaged.
        """
        with self._lock:
            if self._fd is None:
                raise AuditUnavailable("audit log closed: action refused")
            try:
                with flocked(self._fd, LOCK_WAIT):
                    self._append(self._fd, actor, action, details)
            except OSError as exc:
                log.error("audit log %s not written (%s): refusing %s by %s", self.path,
                          exc.strerror or exc, action, actor)
                raise AuditUnavailable(
                    f"audit log cannot be written ({exc.strerror or exc}): action refused"
                ) from exc
            except DamagedHead as exc:
                log.error("audit log %s: its last line is damaged (%s): refusing %s by %s",
                          self.path, exc, action, actor)
                raise AuditUnavailable(
                    f"audit log cannot be written (its last line is damaged: {exc}; run "
                    f"'ticket-authority audit verify {self.path}'): action refused") from exc

    def _append(self, fd: int, actor: str, action: str, details: Mapping[str, Any]) -> None:
        """Append the entry that follows the file's head (the caller holds the file lock).

        Raises: OSError (the file cut back to its size before), DamagedHead.
        """
        seq, prev, size = self._head(fd)
        entry = new_entry(seq + 1, prev, self._now(), actor, action, details)
        line = canonical(entry) + b"\n"
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(0, f"short write ({written} of {len(line)} octets)")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):   # no torn line, no line for a refused action
                os.ftruncate(fd, size)
            raise
        self._prev = entry["hash"]

    @property
    def last_hash(self) -> str:
        """The hash of the last line this log wrote or read (the chain's head then)."""
        return self._prev

    def close(self) -> None:
        """Close the file; later ``record`` calls raise AuditUnavailable. Never raises."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
