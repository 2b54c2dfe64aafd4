"""What both guards (``ThreadGuard``, ``AioGuard``) do with a method's handler before their own
I/O: take it apart (``shape_of``), serve a guarded call with its serializers as a
request-streaming handler (``serve``), and keep the guarded handler made for each method
(``Guarded``). See authority/service/admission.py for why every method is request-streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from authority.service.interceptors import KINDS, _safe


@dataclass(frozen=True)
class Shape:
    """A method handler taken apart: its behavior, whether it streams requests and responses,
    and its (de)serializers (an undecodable body is handed to the gate, not raised)."""

    behavior: Any
    stream_in: bool
    stream_out: bool
    options: dict[str, Any]


def shape_of(handler: Any) -> Shape:
    """``handler`` (a grpc.RpcMethodHandler) taken apart. Never raises."""
    behavior = next(getattr(handler, kind) for kind in KINDS
                    if getattr(handler, kind) is not None)
    return Shape(behavior, handler.request_streaming, handler.response_streaming,
                 {"request_deserializer": _safe(handler.request_deserializer),
                  "response_serializer": handler.response_serializer})


def serve(shape: Shape, call: Callable[..., Any]) -> Any:
    """A request-streaming handler that serves ``call`` with ``shape``'s serializers (its
    responses streamed when ``shape``'s are). Never raises."""
    make = (grpc.stream_stream_rpc_method_handler if shape.stream_out
            else grpc.stream_unary_rpc_method_handler)
    return make(call, **shape.options)


class Guarded:
    """The guarded handler of each method, made by ``make(method, handler)`` once for each
    handler the server hands over (and again if it hands over another)."""

    def __init__(self, make: Callable[[str, Any], Any]) -> None:
        self._make = make
        self._made: dict[str, tuple[Any, Any]] = {}   # method: (its handler, guarded)

    def __call__(self, details: Any, handler: Any) -> Any:
        """The guarded handler for ``handler`` (None for None: no such method). Never
        raises."""
        if handler is None:
            return None
        method = str(details.method)
        known = self._made.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._make(method, handler)
        self._made[method] = (handler, guarded)
        return guarded
