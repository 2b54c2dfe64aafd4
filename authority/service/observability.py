"""The Prometheus HTTP endpoint (RPC latency by method and status code is observed by the
guards: ``Gate.observe`` in authority/service/admission.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import start_http_server

from authority.errors import StartupError
from authority.metrics import Metrics
from authority.settings_loader import parse_listen


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
