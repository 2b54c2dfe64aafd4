"""RPC latency by method and status code, and the Prometheus HTTP endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import start_http_server

from authority.errors import StartupError
from authority.metrics import Metrics
from authority.settings_loader import parse_listen


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Observes every call's duration with the status it ended with."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or (handler.unary_unary is None and handler.stream_stream is None):
            return handler
        method = str(details.method).rsplit("/", 1)[-1]
        histogram = self._metrics.rpc_seconds
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return inner(request, context)
                finally:
                    histogram.labels(method, _code(context)).observe(time.perf_counter() - start)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        stream_inner = handler.stream_stream

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                yield from stream_inner(requests, context)
            finally:
                histogram.labels(method, _code(context)).observe(time.perf_counter() - start)

        return grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _code(context: grpc.ServicerContext) -> str:
    code = context.code()
    return "OK" if code is None else str(code.name)


def start_metrics_http(metrics: Metrics, listen: str) -> tuple[Any, int]:
    """Serve /metrics on ``listen``; returns (server, bound port).

    Raises: StartupError naming ``server.metrics_listen`` if it cannot listen.
    """
    host, port = parse_listen(listen, setting="server.metrics_listen", loopback_only=False)
    host = host.strip("[]")
    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise StartupError(f"server.metrics_listen: cannot listen on {listen}: "
                           f"{exc.strerror}") from exc
    return server, int(server.server_port)
