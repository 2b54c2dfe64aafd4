"""The one place that maps errors to gRPC status codes.

Deliberate errors carry their status (authority/errors.py). Anything unexpected is logged with
an incident id and answered UNKNOWN: a client never sees INTERNAL or a stack trace, and a request
body that is not a valid message is INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from authority.errors import AuthorityError

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


def _fail(exc: Exception, context: grpc.ServicerContext) -> NoReturn:
    """Abort the call with the status an exception deserves (re-raise an abort in flight)."""
    if isinstance(exc, AuthorityError):
        context.abort(grpc.StatusCode[exc.status], exc.message)
    if context.code() is not None:  # context.abort() was already called
        raise exc
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error (incident %s)", incident, exc_info=exc)
    context.abort(grpc.StatusCode.UNKNOWN, f"unexpected server error (incident {incident}); "
                                           "see the server log")
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


_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _unary_response, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _stream_response, False),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _unary_response, True),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _stream_response, True),
)


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler: request decoding and error-to-status mapping."""

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        for attr, make_handler, wrap, stream_in in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make_handler(wrap(behavior, stream_in),
                                    request_deserializer=_safe(handler.request_deserializer),
                                    response_serializer=handler.response_serializer)
        return handler
