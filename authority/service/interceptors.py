"""The one place that maps errors to gRPC status codes (``failure``, for both servers' guards).

Deliberate errors carry their status (authority/errors.py), a role refusal its code. Anything
unexpected is logged with an incident id and answered UNKNOWN: a client never sees INTERNAL or a
stack trace, and a request body that is not a valid message is INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from authority.errors import AuthorityError
from authority.service.auth import Denied

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request body that failed to parse."""


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable()

    return parse


def failure(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a call that raised ``exc`` ends with, for both servers: an
    authority error's own; a role refusal's (logged when PERMISSION_DENIED); anything else
    UNKNOWN with an incident id, logged with the error. Never raises."""
    if isinstance(exc, AuthorityError):
        return grpc.StatusCode[exc.status], exc.message
    if isinstance(exc, Denied):
        if exc.code == grpc.StatusCode.PERMISSION_DENIED:
            log.warning("denied: %s", exc.message)
        return exc.code, exc.message
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error (incident %s)", incident, exc_info=exc)
    return (grpc.StatusCode.UNKNOWN,
            f"unexpected server error (incident {incident}); see the server log")


def _fail(exc: Exception, context: grpc.ServicerContext) -> NoReturn:
    """Abort the call with the status an exception deserves (``failure``); re-raise an abort
    in flight."""
    if not isinstance(exc, (AuthorityError, Denied)) and context.code() is not None:
        raise exc   # context.abort() was already called
    context.abort(*failure(exc))
    raise AssertionError("unreachable")  # context.abort raises


#: the four kinds of method handler, in grpc's attribute names
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
