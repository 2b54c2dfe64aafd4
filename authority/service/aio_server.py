"""Start the grpc.aio server (``server.mode = "aio"``) on an event loop in its own thread, so
that ``build_server`` keeps one synchronous interface for both server modes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2

from authority._proto.ticketauthority.v1 import admin_pb2_grpc, authority_pb2_grpc
from authority.app import Authority, inline_device_calls
from authority.config import Config
from authority.metrics import InstrumentedBackend
from authority.service.admission import Gate, Limits, transport_options
from authority.service.aio import AioGuard, Runner, async_servicer
from authority.service.auth import RoleMap
from authority.service.interceptors import Drain, drain
from authority.service.ratelimit import TokenBuckets
from authority.service.registry import register
from authority.service.servicers import TicketAdminServicer, TicketAuthorityServicer
from authority.service.supervisor import reuse_port

T = TypeVar("T")
STOP_BEGUN = 0.01   # seconds for a started grpc.aio stop to reach the core's shutdown


class LoopThread:
    """An event loop running in a daemon thread; other threads submit coroutines to it."""

    def __init__(self, name: str = "grpc-aio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result. Raises: what ``coro`` raises."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and join its thread. Never raises."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class AioServers:
    """The aio listener(s), their loop and the pool for offloaded calls."""

    loop: LoopThread
    pool: futures.ThreadPoolExecutor
    server: grpc.aio.Server
    health: Any                           # grpc_health.v1 aio HealthServicer
    admin_server: grpc.aio.Server | None = None
    device: InstrumentedBackend | None = None   # device processes driven on this loop
    guards: list[AioGuard] = field(default_factory=list)

    async def start(self, service_names: tuple[str, ...]) -> None:
        """Start listening and report SERVING for ``service_names`` and the server."""
        for guard in self.guards:
            guard.start()
        await self.server.start()
        if self.admin_server is not None:
            await self.admin_server.start()
        for name in ("", *service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def report(self, serving: bool, service_names: tuple[str, ...]) -> None:
        """Set the health of the server and ``service_names`` to SERVING or NOT_SERVING from
        another thread (the authority's store watch); ignored once stopping. Never raises."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)

        async def apply() -> None:
            for name in ("", *service_names):
                await self.health.set(name, status)

        with contextlib.suppress(RuntimeError):   # the loop is closed: stopped meanwhile
            asyncio.run_coroutine_threadsafe(apply(), self.loop.loop)

    def stop(self, grace: float | None) -> None:
        """NOT_SERVING, refuse new calls UNAVAILABLE for a moment (``interceptors.drain``),
        stop the server(s) (in-flight calls have what is left of ``grace`` seconds), then stop
        the loop. Never raises."""
        with contextlib.suppress(TimeoutError, RuntimeError):
            self.loop.run(self.health.enter_graceful_shutdown(), timeout=10)
        draining, grace = drain([guard.gate for guard in self.guards], grace)
        try:
            with contextlib.suppress(TimeoutError, RuntimeError):
                self.loop.run(self._stop(grace, draining), timeout=(grace or 0) + 10)
        finally:
            if draining is not None:
                draining.release()
        self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _stop(self, grace: float | None, draining: Drain | None) -> None:
        stops = [asyncio.ensure_future(self.server.stop(grace))]
        if self.admin_server is not None:
            stops.append(asyncio.ensure_future(self.admin_server.stop(grace)))
        if draining is not None:
            await asyncio.sleep(STOP_BEGUN)   # each stop sent its GOAWAY, closed its listener
            draining.release()
        await asyncio.gather(*stops)
        for guard in self.guards:
            await guard.close()
        if self.device is not None:
            await self.device.detach()


def roles_of(config: Config) -> RoleMap | None:
    """The role map of the main listener (None without client certificates). Never raises."""
    tls = config.tls
    return RoleMap.from_settings(tls) if tls is not None and tls.require_client_cert else None


def rate_limits(config: Config) -> TokenBuckets | None:
    """The per-client token buckets (None: ``server.rate_limit_per_s`` is 0). Never raises
    for a validated config."""
    server = config.server
    return (TokenBuckets(server.rate_limit_per_s, server.rate_burst)
            if server.rate_limit_per_s > 0 else None)


def _server(config: Config, guard: AioGuard) -> grpc.aio.Server:
    limit = config.server.max_message_bytes
    return grpc.aio.server(
        interceptors=[guard],
        maximum_concurrent_rpcs=config.server.max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit),
                 ("grpc.so_reuseport", reuse_port(config)), *transport_options(config)])


async def _build(config: Config, authority: Authority, loop: LoopThread,
                 pool: futures.ThreadPoolExecutor) -> AioServers:
    """Create the server(s) and register the services (nothing listens yet)."""
    run = Runner(pool, inline_device_calls(config))
    guard = AioGuard(Gate(authority.metrics, Limits.of(config, threads=False),
                          roles_of(config), rate_limits(config)))
    server = _server(config, guard)
    device = authority.backend if authority.backend.asynchronous else None
    tickets = async_servicer(TicketAuthorityServicer(authority),
                             authority_pb2_grpc.TicketAuthorityServicer, run, device)
    admin = async_servicer(TicketAdminServicer(authority), admin_pb2_grpc.TicketAdminServicer,
                           run.offload)
    servers = AioServers(loop, pool, server, health.aio.HealthServicer(), device=device,
                         guards=[guard])
    if config.server.admin_listen:   # local: no roles, no per-client cap, no rate limit
        admin_guard = AioGuard(Gate(authority.metrics,
                                    Limits.of(config, threads=False, per_client=False)))
        servers.guards.append(admin_guard)
        servers.admin_server = _server(config, admin_guard)
    register(server, tickets, admin, servers.health, servers.admin_server)
    return servers


def create_aio_servers(config: Config, authority: Authority) -> AioServers:
    """The aio server(s) on a new loop thread, not yet listening (bind on the loop). Never
    raises for a valid config."""
    loop = LoopThread()
    pool = futures.ThreadPoolExecutor(max_workers=config.server.workers,
                                      thread_name_prefix="grpc-offload")
    return loop.run(_build(config, authority, loop, pool))
