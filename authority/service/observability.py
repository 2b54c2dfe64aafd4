"""RPC latency by method and status code, and the Prometheus HTTP endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import start_http_server

from authority.errors import StartupError
from authority.metrics import Metrics
from authority.service.interceptors import rewrap
from authority.settings_loader import parse_listen


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Observes every call's duration with the status it ended with."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        histogram = self._metrics.rpc_seconds

        def timed(inner: Any, stream_in: bool, stream_out: bool) -> Any:
            if stream_in != stream_out:  # unary-stream and stream-unary calls are not timed
                return inner
            if not stream_out:
                def unary(request: Any, context: grpc.ServicerContext) -> Any:
                    start = time.perf_counter()
                    try:
                        return inner(request, context)
                    finally:
                        histogram.labels(method, _code(context)).observe(
                            time.perf_counter() - start)

                return unary

            def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                try:
                    yield from inner(requests, context)
                finally:
                    histogram.labels(method, _code(context)).observe(
                        time.perf_counter() - start)

            return stream

        return rewrap(handler, timed)


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
