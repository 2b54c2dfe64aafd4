"""The one place that maps errors to gRPC status codes (``failure``, for both servers' guards).

Deliberate errors carry their status (authority/errors.py), a role refusal its code. Anything
unexpected is logged with an incident id and answered UNKNOWN: a client never sees INTERNAL or a
stack trace, and a request body that is not a valid message is INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from authority.errors import AuthorityError
from authority.service.auth import Denied

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]


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


def _checked(request: Any, context: grpc.ServicerContext) -> Any:
    if isinstance(request, _Undecodable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid message")
    return request


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


def _unary_response(behavior: Behavior, stream_in: bool) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        arg = (_checked(r, context) for r in request) if stream_in else _checked(request, context)
        try:
            return behavior(arg, context)
        except Exception as exc:
            _fail(exc, context)

    return call


def _stream_response(behavior: Behavior, stream_in: bool) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        arg = (_checked(r, context) for r in request) if stream_in else _checked(request, context)
        try:
            yield from behavior(arg, context)
        except Exception as exc:
            _fail(exc, context)

    return call


#: Wraps a handler's behavior, given whether it streams requests and responses.
Wrap = Callable[[Any, bool, bool], Any]

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def rewrap(handler: Any, wrap: Wrap, safe_decoding: bool = False) -> Any:
    """``handler`` (a method handler of either server) with its behavior replaced by
    ``wrap(behavior, stream_in, stream_out)``; with ``safe_decoding`` an undecodable request
    body reaches the behavior as ``_Undecodable`` instead of failing in grpc. The one place
    that knows the four kinds of method handler. Never raises."""
    for kind in KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            make = getattr(grpc, f"{kind}_rpc_method_handler")
            deserializer = handler.request_deserializer
            return make(wrap(behavior, kind.startswith("stream"), kind.endswith("stream")),
                        request_deserializer=_safe(deserializer) if safe_decoding
                        else deserializer,
                        response_serializer=handler.response_serializer)
    return handler


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler: request decoding and error-to-status mapping."""

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return rewrap(handler, lambda behavior, stream_in, stream_out: (
            _stream_response if stream_out else _unary_response)(behavior, stream_in),
            safe_decoding=True)
