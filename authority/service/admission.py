"""What one client may hold: checks every call passes before the server reads its request.

A call holds something from the moment it starts: a worker thread on the thread-pool server,
one of ``server.max_concurrent_rpcs`` slots on either server. Neither grpcio server tells an
interceptor who is calling before the call has a worker (the thread-pool server) or before a
unary request body arrived (aio: it reads the body before the handler runs). So both guards
(``ThreadGuard`` in authority/service/guard.py, ``AioGuard`` in authority/service/aio.py)
register every method as a *request-streaming* handler -- on the wire a unary call is the
same -- and ``Gate`` runs first thing in the handler, before any read:

1. the role check (with client certificates): a caller with the wrong role, or none, is
   refused at once and never waits for its request;
2. a slot of the caller (certificate URI, else peer host; with client certificates only:
   behind a loopback listener without them every caller is the same peer): at most
   ``server.max_calls_per_client`` calls at once, else RESOURCE_EXHAUSTED. A unary call holds
   its slot until its request arrived (its work is then bounded by the server, and by the rate
   limit), a request stream and a ``Health/Watch`` until they end (the client decides);
3. the request is read within ``server.request_timeout`` (a stream's messages within
   ``server.stream_idle_timeout`` of each other), else the call is ended: DEADLINE_EXCEEDED on
   the aio server; on the thread-pool server the guard can only cancel the call (grpcio has no
   way to send a status while the worker waits for the body: ``context.abort`` only raises in
   the calling thread, ``context.cancel`` ends the call from another one), so the client sees
   CANCELLED. Either way the worker or slot is free again.

Then, as before: request decoding (INVALID_ARGUMENT), the rate limit, the servicer, metrics and
error mapping. ``Deadlines`` keeps the armed deadlines in a FIFO (all of one timeout expire in
the order they were armed), so arming and disarming one costs an append and a flag on the hot
path; a watchdog (a thread, or a task on the aio loop) ends what expired.

The transport adds per-connection bounds (``transport_options``): HTTP/2 concurrent streams,
idle and maximum connection age, keepalive pings to find dead peers, and gRPC's enforcement of
client pings (a client pinging too often is sent GOAWAY).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from authority.config import Config
from authority.errors import AuthorityError, InvalidArgument, ResourceExhausted
from authority.metrics import Metrics
from authority.service.auth import HEALTH_PREFIX, Denied, RoleMap, authorize, peer_uris
from authority.service.interceptors import _Undecodable
from authority.service.ratelimit import TokenBuckets, _cost, client_key

log = logging.getLogger(__name__)

KEEPALIVE_MS = 60_000          # the server pings a connection after a minute of silence
KEEPALIVE_TIMEOUT_MS = 20_000  # and closes it when the ping is not answered in 20 s
MIN_CLIENT_PING_MS = 300_000   # gRPC's default: a client may ping an idle connection every 5 min
PING_STRIKES = 2               # gRPC's default: pings beyond that rate, then GOAWAY


class RequestTimeout(AuthorityError):
    """The client did not send its request (or its stream's next message) in time."""

    status = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class Limits:
    """The admission settings of one listener."""

    request_timeout: float
    stream_idle_timeout: float
    calls_per_client: int | None       # None: no per-client cap

    @classmethod
    def of(cls, config: Config, threads: bool, per_client: bool = True) -> Limits:
        """The limits of ``config``'s main listener (``per_client`` False: no cap, as on the
        local admin listener). Never raises for a validated config."""
        server = config.server
        mutual = config.tls is not None and config.tls.require_client_cert
        cap = calls_per_client(config, threads) if per_client and mutual else None
        return cls(server.request_timeout, server.stream_idle_timeout, cap)


def calls_per_client(config: Config, threads: bool) -> int:
    """``server.max_calls_per_client`` with ``auto`` resolved: half the workers on the
    thread-pool server, an eighth of ``max_concurrent_rpcs`` on the aio server. Never raises."""
    cap = config.server.max_calls_per_client
    if isinstance(cap, int):
        return cap
    if threads:
        return max(1, config.server.workers // 2)
    return max(1, config.server.max_concurrent_rpcs // 8)


def transport_options(config: Config) -> list[tuple[str, int]]:
    """The per-connection bounds of a listener, as gRPC channel arguments. Never raises."""
    server = config.server
    options = [("grpc.max_concurrent_streams", server.max_streams_per_connection),
               ("grpc.keepalive_time_ms", KEEPALIVE_MS),
               ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
               ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
               ("grpc.http2.max_ping_strikes", PING_STRIKES)]
    if server.connection_idle_timeout > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(server.connection_idle_timeout)))
    if server.connection_max_age > 0:
        options += [("grpc.max_connection_age_ms", _ms(server.connection_max_age)),
                    ("grpc.max_connection_age_grace_ms", _ms(server.connection_age_grace))]
    return options


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class CallSlots:
    """How many calls each client holds; thread-safe. A client without calls has no entry, so
    the table is as large as the number of clients with calls open."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> bool:
        """One more call for ``client``; False (nothing taken) at its cap. Never raises."""
        with self._lock:
            held = self._held.get(client, 0)
            if held >= self.cap:
                return False
            self._held[client] = held + 1
            return True

    def give(self, client: str) -> None:
        """A call of ``client`` ended. Never raises."""
        with self._lock:
            held = self._held.get(client, 0) - 1
            if held > 0:
                self._held[client] = held
            else:
                self._held.pop(client, None)

    def held(self, client: str) -> int:
        """Calls ``client`` holds now. Never raises."""
        return self._held.get(client, 0)


class Deadline:
    """One armed wait: ``cancel`` ends the call when ``at`` passes while still ``waiting``."""

    __slots__ = ("at", "cancel", "expired", "waiting")

    def __init__(self, at: float, cancel: Callable[[], Any]) -> None:
        self.at = at
        self.cancel: Callable[[], Any] | None = cancel
        self.waiting = True
        self.expired = False

    def disarm(self) -> None:
        """The wait is over in time. Drops ``cancel`` at once: it holds the call, which the
        thread-pool server releases (and HTTP/2 stops counting) only once nothing refers to
        it. Never raises."""
        self.waiting = False
        self.cancel = None


class Deadlines:
    """Waits of ``timeout`` seconds each, in the order they were armed (so also the order they
    expire in). ``arm`` and a disarm (``deadline.waiting = False``) are what the hot path pays;
    ``expire`` (the watchdog, from one thread or task) pops what is done."""

    def __init__(self, timeout: float, now: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._now = now
        self._queue: deque[Deadline] = deque()

    def arm(self, cancel: Callable[[], Any]) -> Deadline:
        """Start a wait that ``cancel`` ends unless disarmed in time. Never raises."""
        deadline = Deadline(self._now() + self.timeout, cancel)
        self._queue.append(deadline)
        return deadline

    def expire(self) -> int:
        """Cancel every wait past its deadline; returns how many. Never raises (a failing
        ``cancel`` is logged)."""
        queue, now, ended = self._queue, self._now(), 0
        while queue:
            head = queue[0]
            if head.waiting and head.at > now:
                break
            queue.popleft()
            cancel = head.cancel
            if head.waiting and cancel is not None:
                head.expired = True
                head.cancel = None
                ended += 1
                try:
                    cancel()
                except Exception:
                    log.exception("ending a call past its deadline failed")
        return ended

    def __len__(self) -> int:
        return len(self._queue)


def tick(limits: Limits) -> float:
    """How often a watchdog looks for expired waits: a tenth of the shorter timeout, between
    20 ms and 250 ms. Never raises."""
    return min(0.25, max(0.02, min(limits.request_timeout, limits.stream_idle_timeout) / 10))


class Gate:
    """What every call passes in both guards: role, per-client slot, request deadline,
    decoding, rate limit; and the RPC latency metric."""

    def __init__(self, metrics: Metrics, limits: Limits, roles: RoleMap | None = None,
                 buckets: TokenBuckets | None = None) -> None:
        self.limits = limits
        self.roles = roles
        self.buckets = buckets
        self.slots = CallSlots(limits.calls_per_client) if limits.calls_per_client else None
        self.requests = Deadlines(limits.request_timeout)
        self.streams = Deadlines(limits.stream_idle_timeout)
        self._histogram = metrics.rpc_seconds
        self._children: dict[tuple[str, str], Any] = {}  # labels() is slow: one per pair

    def admit(self, method: str, context: Any) -> str:
        """Check the caller's role and take one of its slots, before anything is read.
        Returns the caller's key ("" when neither a slot nor a rate limit needs one); pass it
        to ``release`` and ``charge``.

        Raises: Denied (role); ResourceExhausted naming ``server.max_calls_per_client``."""
        if self.roles is None and self.slots is None and self.buckets is None:
            return ""
        uris = peer_uris(context)
        if self.roles is not None:
            authorize(self.roles, method, context, uris)
        client = client_key(context, uris)
        if self.slots is not None and not self.slots.take(client):
            raise ResourceExhausted(
                f"{client} already has {self.slots.cap} calls open "
                f"(server.max_calls_per_client); retry when one has ended")
        return client

    def release(self, client: str) -> None:
        """Give back the slot ``admit`` took. Never raises."""
        if self.slots is not None and client:
            self.slots.give(client)

    def charge(self, method: str, client: str, request: Any) -> Any:
        """Returns ``request`` once it decoded and the caller's bucket paid for it.
        Raises: InvalidArgument, ResourceExhausted."""
        if isinstance(request, _Undecodable):
            raise InvalidArgument("request", "not a valid message")
        if self.buckets is not None and not method.startswith(HEALTH_PREFIX):
            refused = self.buckets.refusal(client, _cost(request), method)
            if refused is not None:
                raise ResourceExhausted(refused)
        return request

    def late(self, method: str, client: str, stream: bool) -> RequestTimeout:
        """The error of a call whose request (or next stream message) did not come in time;
        logged. Never raises."""
        if stream:
            setting, timeout = "server.stream_idle_timeout", self.limits.stream_idle_timeout
            what = "request stream: no message"
        else:
            setting, timeout = "server.request_timeout", self.limits.request_timeout
            what = "request: not received"
        message = f"{what} within {timeout:g} s ({setting})"
        log.info("%s from %s: %s; call ended", method, client or "a client", message)
        return RequestTimeout(message)

    def expire(self) -> None:
        """End the calls whose waits expired (the watchdog's work). Never raises."""
        self.requests.expire()
        self.streams.expire()

    def observe(self, name: str, code: str, seconds: float) -> None:
        """Record one call's latency with the status it ended with. Never raises."""
        child = self._children.get((name, code))
        if child is None:
            child = self._children[(name, code)] = self._histogram.labels(name, code)
        child.observe(seconds)


def status_name(exc: BaseException) -> str:
    """The status name a call that raised ``exc`` ends with (for metrics). Never raises."""
    if isinstance(exc, AuthorityError):
        return exc.status
    if isinstance(exc, Denied):
        return str(exc.code.name)
    if isinstance(exc, grpc.RpcError):   # the request stream of a call that was cancelled
        return "CANCELLED"
    return "UNKNOWN"
