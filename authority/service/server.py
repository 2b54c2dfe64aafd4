"""Build and run the gRPC server: ticket and admin services, health, reflection, graceful stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.app import Authority
from authority.clock import Clock
from authority.config import Config
from authority.errors import StartupError
from authority.service.interceptors import ErrorInterceptor
from authority.service.observability import MetricsInterceptor, start_metrics_http
from authority.service.servicers import TicketAdminServicer, TicketAuthorityServicer
from authority.settings_loader import parse_listen

log = logging.getLogger(__name__)

TICKET_SERVICE = authority_pb2.DESCRIPTOR.services_by_name["TicketAuthority"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["TicketAdmin"].full_name
SERVER_FILE = "server.json"


@dataclass
class RunningServer:
    """A started server and what it serves."""

    server: grpc.Server
    port: int
    address: str
    authority: Authority
    health: health.HealthServicer
    metrics_server: Any = None
    metrics_port: int | None = None

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, drain in-flight calls for ``grace`` seconds, close the device."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.authority.close()


def build_server(config: Config, clock: Clock | None = None,
                 authority: Authority | None = None) -> RunningServer:
    """Open the authority (unless given) and start a server on ``config.server.listen``.

    Port 0 picks a free port; ``RunningServer.port`` says which.
    Raises: StartupError, ConfigError.
    """
    host, port = parse_listen(config.server.listen)
    authority = authority or Authority.open(config, clock)
    limit = config.server.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.server.workers,
                                   thread_name_prefix="grpc"),
        interceptors=[MetricsInterceptor(authority.metrics), ErrorInterceptor()],
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit),
                 ("grpc.so_reuseport", 0)])
    authority_pb2_grpc.add_TicketAuthorityServicer_to_server(
        TicketAuthorityServicer(authority), server)
    admin_pb2_grpc.add_TicketAdminServicer_to_server(TicketAdminServicer(authority), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (TICKET_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        authority.close()
        raise StartupError(f"server.listen: cannot listen on {config.server.listen}")
    running = RunningServer(server, bound, f"{host}:{bound}", authority, health_servicer)
    if config.server.metrics_listen:
        try:
            running.metrics_server, running.metrics_port = start_metrics_http(
                authority.metrics, config.server.metrics_listen)
        except StartupError:
            authority.close()
            raise
    server.start()
    for name in ("", TICKET_SERVICE, ADMIN_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully.

    Raises: StartupError, ConfigError, DeviceUnavailable at start-up.
    """
    running = build_server(config)
    running.authority.start_maintenance()
    server_file = config.state_dir / SERVER_FILE
    _write_server_file(server_file, running.address)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _announce(config, running)
    try:
        stop.wait()
    finally:
        running.stop(config.server.grace_seconds)
        server_file.unlink(missing_ok=True)
        log.info("stopped")


def _write_server_file(path: Path, address: str) -> None:
    data = json.dumps({"address": address, "pid": os.getpid()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data)
    tmp.replace(path)


def _metrics_line(config: Config, running: RunningServer) -> str:
    if running.metrics_port is None:
        return ""
    host = config.server.metrics_listen.rpartition(":")[0]
    return f"  curl http://{host}:{running.metrics_port}/metrics\n"


def _announce(config: Config, running: RunningServer) -> None:
    info = running.authority.backend.describe()
    primary = running.authority.ring.primary_id
    print(f"ike-ticket-authority listening on {running.address} (plaintext, loopback only)\n"
          f"  backend   {info.backend}: {info.token}\n"
          f"  state     {config.state_dir}\n"
          f"  sealing   key {primary.hex() if primary else '-'}\n"
          f"Try:\n"
          f"  ticket-authority status --listen {running.address}\n"
          f"  ticket-authority keys list --listen {running.address}\n"
          f"  grpcurl -plaintext {running.address} list\n"
          f"{_metrics_line(config, running)}"
          f"Stop with Ctrl-C or SIGTERM.", flush=True)
