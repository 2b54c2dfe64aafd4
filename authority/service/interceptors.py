"""The one place that maps errors to gRPC status codes.

Deliberate errors carry their status (authority/errors.py). Anything unexpected is logged with
an incident id and answered UNKNOWN: a client never sees INTERNAL or a stack trace, and a request
body that is not a valid message is INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from authority.errors import AuthorityError

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


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid message")
        try:
            return behavior(request, context)
        except AuthorityError as exc:
            context.abort(grpc.StatusCode[exc.status], exc.message)
        except Exception:
            if context.code() is not None:  # context.abort() was already called
                raise
            incident = uuid.uuid4().hex[:12]
            log.exception("unexpected error (incident %s)", incident)
            context.abort(grpc.StatusCode.UNKNOWN, f"unexpected server error (incident "
                                                   f"{incident}); see the server log")

    return call


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps every unary handler: request decoding and error-to-status mapping."""

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        kwargs = {"request_deserializer": _safe(handler.request_deserializer),
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard(handler.unary_unary), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_guard(handler.unary_stream), **kwargs)
        return handler
