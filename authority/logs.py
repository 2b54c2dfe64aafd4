"""The server's log lines: text (``log_format = "text"``, the default) or JSON lines
(``log_format = "json"``), and the request id each line written during an RPC carries.

A JSON line is one event: ``time`` (RFC 3339, UTC, microseconds), ``level``, ``logger``,
``message``, ``pid`` and ``replica_id`` (null until this process's authority opened) always;
``request_id`` on a line written while serving an RPC; ``exc`` (the traceback) and ``stack``
when the line has them; then any extra fields the caller gave, under their own names (a
field whose name says it holds a secret -- pin, dsn, password, secret, auth -- is written as
``"********"``; a ``Secret`` value is never revealed by ``str``). A text line is
``time LEVEL logger: message``, followed by `` (request id X)`` during an RPC.

The request id lives in a context variable (``REQUEST_ID``): set by both servers' guards at
the start of every call (authority/service/interceptors.py ``begin_request``), so it follows
the call through its task (aio), its worker thread (threads) and the pool threads it runs
work in (aio ``Runner``).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

#: the id of the RPC being served in this context (None: not in an RPC)
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "********"
_HANDLER = "authority.logs"   # the name of the handler ``setup`` installs
#: parts of an extra field's name (split at "_") that mark it as a secret
_SECRET_PARTS = frozenset({"pin", "dsn", "password", "passwd", "secret", "auth", "credentials"})
#: attributes every LogRecord has (not extra fields)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "request_id", "replica_id", "taskName"}

_replica: dict[str, str | None] = {"id": None}


def note_replica(replica_id: str) -> None:
    """Name this process's replica (its authority's replica id) in every later line. Never
    raises."""
    _replica["id"] = replica_id


def replica_id() -> str | None:
    """The replica id lines carry (None: no authority opened yet). Never raises."""
    return _replica["id"]


class RequestContext(logging.Filter):
    """Stamps each record with the request id of the context that logs it (at the time of
    the call, in the caller's thread or task) unless it already has one. Never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, plus `` (request id X)`` during an RPC."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        request = getattr(record, "request_id", None)
        return f"{line} (request id {request})" if request else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or a traceback are
    escaped by JSON). Keys: see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": rfc3339(record.created), "level": record.levelname,
            "logger": record.name, "message": record.getMessage(),
            "pid": record.process, "replica_id": replica_id()}
        request = getattr(record, "request_id", None)
        if request:
            event["request_id"] = request
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exc"] = record.exc_text
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in event:
                event[key] = REDACTED if _secret_name(key) else value
        return json.dumps(event, default=str)


def _secret_name(key: str) -> bool:
    return bool(_SECRET_PARTS.intersection(key.lower().split("_")))


def rfc3339(created: float) -> str:
    """``created`` (seconds since the epoch) as RFC 3339 in UTC with microseconds:
    ``2025-01-02T03:04:05.678901Z``. Never raises for a time a log record can have."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def formatter(log_format: str, prefix: str = "") -> logging.Formatter:
    """The formatter for ``log_format`` ("text" or "json"); ``prefix``: put before the
    logger's name in text lines (a replica's "replica N: "). Raises: ValueError for another
    format (the settings loader refuses one first)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter(TEXT_FORMAT.replace("%(name)s", f"{prefix}%(name)s"))
    raise ValueError(f"log_format: one of {', '.join(FORMATS)}, not {log_format!r}")


def setup(level: str, log_format: str = "text", prefix: str = "",
          stream: TextIO | None = None) -> logging.Handler:
    """Send every log line at ``level`` and above to ``stream`` (default: stderr) in
    ``log_format`` from the root logger (what ``logging.basicConfig`` did before), replacing
    the handler an earlier ``setup`` installed (others stay); returns the handler.
    Raises: ValueError for an unknown format or level."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(log_format, prefix))
    handler.addFilter(RequestContext())
    handler.name = _HANDLER
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == _HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
