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
2. the caller's slots (with client certificates: the certificate URI, else the peer host;
   behind a loopback listener without them every caller is the same peer, so there is no
   cap): at most ``server.max_calls_per_client`` calls held at once (``CallSlots``). A request
   stream and a ``Health/Watch`` hold a slot for their whole life (the client decides how
   long), a unary call only once its request is late (``LATE_AFTER``): a busy gateway's calls
   are never counted (under load the thread-pool server's workers wait a while for the poller
   to hand over a body that came with the headers), a client that stalls its requests holds
   at most its cap -- a late call finding no free slot is ended, and a client caught at its
   cap is *suspect* for ``SUSPECT_FOR`` seconds, its new unary calls refused while its held
   and waiting calls reach the cap;
3. the request is read within ``server.request_timeout`` (a stream's messages within
   ``server.stream_idle_timeout`` of each other), else the call is ended: DEADLINE_EXCEEDED
   (RESOURCE_EXHAUSTED for a late call with no slot) on the aio server; on the thread-pool
   server the guard can only cancel the call -- grpcio has no way to send a status while the
   worker waits for the body (``context.abort`` only raises in the calling thread;
   ``context.cancel`` ends the call from the watchdog's) -- so the client sees CANCELLED. Either
   way the worker or slot is free again.

Then, as before: request decoding (INVALID_ARGUMENT), the rate limit, the servicer; around it
all metrics and error mapping. ``Deadlines`` keeps the waits of one timeout in a FIFO (they
expire in the order they were armed), so arming and ending one costs an append and two
attribute stores on the hot path; a watchdog (a thread, or a task on the aio loop) acts on
what expired.

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
from authority.service.interceptors import Drain, _Undecodable
from authority.service.ratelimit import TokenBuckets, _cost, client_key

log = logging.getLogger(__name__)

KEEPALIVE_MS = 60_000          # the server pings a connection after a minute of silence
KEEPALIVE_TIMEOUT_MS = 20_000  # and closes it when the ping is not answered in 20 s
MIN_CLIENT_PING_MS = 300_000   # gRPC's default: a client may ping an idle connection every 5 min
PING_STRIKES = 2               # gRPC's default: pings beyond that rate, then GOAWAY
LATE_AFTER = 0.25              # a unary request not there by then is late (takes a slot)
SUSPECT_FOR = 60.0             # seconds a client caught stalling at its cap stays bounded
PRUNE_EVERY = 10.0             # seconds between sweeps of the per-client table


class RequestTimeout(AuthorityError):
    """The client did not send its request (or its stream's next message) in time."""

    status = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class Limits:
    """The admission settings of one listener."""

    request_timeout: float
    stream_idle_timeout: float
    calls_per_client: int | None       # None: no per-client cap

    @property
    def late_after(self) -> float:
        """When a unary call's request counts as late (it then takes a slot): ``LATE_AFTER``,
        at most half the request timeout."""
        return min(LATE_AFTER, self.request_timeout / 2)

    @classmethod
    def of(cls, config: Config, threads: bool, per_client: bool = True) -> Limits:
        """The limits of ``config``'s main listener (``per_client`` False: no cap, as on the
        local admin listener). Never raises for a validated config."""
        server = config.server
        mutual = config.tls is not None and config.tls.require_client_cert
        cap = calls_per_client(config, threads) if per_client and mutual else None
        return cls(server.request_timeout, server.stream_idle_timeout, cap)


def calls_per_client(config: Config, threads: bool) -> int:
    """``server.max_calls_per_client`` with ``auto`` resolved: a quarter of the workers on the
    thread-pool server (a held call holds a worker there: four clients stalling together
    still leave workers free), an eighth of ``max_concurrent_rpcs`` on the aio server. Never
    raises."""
    cap = config.server.max_calls_per_client
    if isinstance(cap, int):
        return cap
    if threads:
        return max(1, config.server.workers // 4)
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


class Client:
    """What one client holds. ``held``: its calls that count against the cap (streams and
    Health/Watch for their life, unary calls once their request is late); ``waiting``: its
    unary calls waiting for their request (late ones included); ``late``: those late ones;
    ``suspect_until``: until then (monotonic) the client is bounded as one that stalls."""

    __slots__ = ("held", "late", "suspect_until", "waiting")

    def __init__(self) -> None:
        self.held = 0
        self.waiting = 0
        self.late = 0
        self.suspect_until = 0.0


class CallSlots:
    """The calls each client holds, against ``cap``; thread-safe.

    A stream (or Health/Watch) takes a slot when it starts and keeps it to its end. A unary
    call waits for its request without a slot -- under load the thread-pool server's workers
    wait a while for the poller to hand them a body that arrived with the headers, so counting
    every fresh wait would refuse a busy gateway -- and takes one only once its request is late
    (``late``): a client that stalls its requests holds at most ``cap`` calls. A late call that
    finds no free slot is ended, and a client at its cap with late calls becomes *suspect* for
    ``suspect_for`` seconds: its new unary calls are refused while its held and fresh waiting
    calls reach the cap, so it cannot get past the cap with bursts of fresh calls either.
    """

    def __init__(self, cap: int, suspect_for: float = 60.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self.suspect_for = suspect_for
        self._now = now
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()

    def _client(self, key: str) -> Client:
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = Client()
        return client

    def _tidy(self, key: str, client: Client) -> None:
        if client.held == 0 and client.waiting == 0 and (
                client.suspect_until == 0.0 or client.suspect_until <= self._now()):
            del self._clients[key]

    def open(self, key: str) -> bool:
        """A stream or Watch of ``key`` starts: True with a slot taken, False (nothing taken)
        at its cap. Never raises."""
        with self._lock:
            client = self._client(key)
            if client.held >= self.cap:
                self._tidy(key, client)
                return False
            client.held += 1
            return True

    def close(self, key: str) -> None:
        """A stream or Watch of ``key`` ended. Never raises."""
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                client.held = max(0, client.held - 1)
                self._tidy(key, client)

    def wait(self, key: str) -> bool:
        """A unary call of ``key`` starts waiting for its request: True, or False (refused)
        for a suspect client whose held and fresh waiting calls reach the cap. Never raises."""
        with self._lock:
            client = self._client(key)
            if (client.suspect_until and client.held + client.waiting - client.late >= self.cap
                    and client.suspect_until > self._now()):
                self._tidy(key, client)
                return False
            client.waiting += 1
            return True

    def arrived(self, key: str, late: bool) -> None:
        """A unary call's wait is over (its request came, or the call ended). Never raises."""
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                return
            client.waiting = max(0, client.waiting - 1)
            if late:
                client.late = max(0, client.late - 1)
                client.held = max(0, client.held - 1)
            self._tidy(key, client)

    def late(self, key: str) -> bool:
        """A waiting unary call of ``key`` is late: True if it now holds a slot, False if none
        was free (end it). Either way a client at its cap becomes suspect. Never raises."""
        with self._lock:
            client = self._client(key)
            took = client.held < self.cap
            if took:
                client.held += 1
                client.late += 1
            if client.held >= self.cap:
                client.suspect_until = self._now() + self.suspect_for
            return took

    def prune(self) -> None:
        """Forget clients with nothing open whose suspicion expired. Never raises."""
        with self._lock:
            for key, client in list(self._clients.items()):
                self._tidy(key, client)


class Wait:
    """One wait for a request message: the watchdog acts on it when ``at`` passes while it is
    still ``waiting``. ``cancel`` ends the call; ``late``: it holds a slot as a late call;
    ``refused``: it was ended because its client had no slot left (else: timed out)."""

    __slots__ = ("at", "cancel", "client", "counted", "expired", "late", "refused", "waiting")

    def __init__(self, at: float, cancel: Callable[[], Any], client: str) -> None:
        self.at = at
        self.cancel: Callable[[], Any] | None = cancel
        self.client = client
        self.waiting = True
        self.counted = False     # a unary call's wait counted in CallSlots.wait
        self.expired = False
        self.late = False
        self.refused = False

    def end(self) -> None:
        """End the call now (from the watchdog). Never raises (a failure is logged)."""
        cancel, self.cancel = self.cancel, None
        self.expired = True
        if cancel is not None:
            try:
                cancel()
            except Exception:
                log.exception("ending a call that waited too long failed")


class Deadlines:
    """Waits of ``timeout`` seconds each, in the order they were armed (so also the order they
    expire in): a FIFO, no heap. Arming one and ``Gate.arrived`` are what the hot path pays;
    ``expire`` (the watchdog, from one thread or task) pops what is done and hands what expired
    to ``on_expiry``."""

    def __init__(self, timeout: float, on_expiry: Callable[[Wait], None],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._on_expiry = on_expiry
        self._now = now
        self._queue: deque[Wait] = deque()

    def arm(self, cancel: Callable[[], Any], client: str = "") -> Wait:
        """Start a wait. Never raises."""
        wait = Wait(self._now() + self.timeout, cancel, client)
        self._queue.append(wait)
        return wait

    def requeue(self, wait: Wait, timeout: float) -> None:
        """Wait ``timeout`` more for ``wait`` (which this queue no longer holds). Never raises."""
        wait.at = self._now() + timeout
        self._queue.append(wait)

    def expire(self) -> None:
        """Hand every wait past its deadline to ``on_expiry``. Never raises (``on_expiry``
        must not)."""
        queue, now = self._queue, self._now()
        while queue:
            head = queue[0]
            if head.waiting and head.at > now:
                break
            queue.popleft()
            if head.waiting:
                self._on_expiry(head)


def tick(limits: Limits) -> float:
    """How often a watchdog looks for expired waits: a fifth of the shortest wait, between
    20 ms and 100 ms. Never raises."""
    return min(0.1, max(0.02, min(limits.late_after, limits.stream_idle_timeout) / 5))


class Gate:
    """What every call passes in both guards: role, the caller's slots, the request deadlines,
    decoding, rate limit; and the RPC latency metric."""

    def __init__(self, metrics: Metrics, limits: Limits, roles: RoleMap | None = None,
                 buckets: TokenBuckets | None = None) -> None:
        self.limits = limits
        self.roles = roles
        self.buckets = buckets
        self.slots = (CallSlots(limits.calls_per_client, SUSPECT_FOR)
                      if limits.calls_per_client else None)
        self.requests = Deadlines(limits.request_timeout, Wait.end)
        self.lateness = Deadlines(limits.late_after, self._late)
        self.streams = Deadlines(limits.stream_idle_timeout, Wait.end)
        self._histogram = metrics.rpc_seconds
        self._children: dict[tuple[str, str], Any] = {}  # labels() is slow: one per pair
        self._pruned = time.monotonic()
        self.drain: Drain | None = None   # set once the server stops gracefully

    def admit(self, method: str, context: Any, holds: bool) -> str:
        """Check the caller's role, and take one of its slots for a call that ``holds`` one
        for its life (a stream, Health/Watch), before anything is read. Returns the caller's
        key ("" when neither slots nor a rate limit need one) for the other methods.

        Raises: Stopping (the server is stopping: every method but health's); Denied (role);
        ResourceExhausted naming ``server.max_calls_per_client``."""
        if self.drain is not None and not method.startswith(HEALTH_PREFIX):
            raise self.drain.refusal()
        if self.roles is None and self.slots is None and self.buckets is None:
            return ""
        uris = peer_uris(context)
        if self.roles is not None:
            authorize(self.roles, method, context, uris)
        client = client_key(context, uris)
        if holds and self.slots is not None and not self.slots.open(client):
            raise self._full(client)
        return client

    def release(self, client: str) -> None:
        """Give back the slot ``admit`` took for a call that holds one. Never raises."""
        if self.slots is not None and client:
            self.slots.close(client)

    def request(self, client: str, cancel: Callable[[], Any], holds: bool) -> Wait:
        """Start waiting for the request of a unary-request call (``cancel`` ends the call):
        within ``server.request_timeout``; a call that does not hold a slot takes one once its
        request is late, or is ended when its client has none left.

        Raises: ResourceExhausted (a suspect client at its cap)."""
        if self.slots is None or holds:
            return self.requests.arm(cancel, client)
        if not self.slots.wait(client):
            raise self._full(client)
        wait = self.lateness.arm(cancel, client)
        wait.counted = True
        return wait

    def message(self, client: str, cancel: Callable[[], Any]) -> Wait:
        """Start waiting for a request stream's next message (``server.stream_idle_timeout``).
        Never raises."""
        return self.streams.arm(cancel, client)

    def arrived(self, wait: Wait) -> None:
        """The wait is over (the message came, or the call ended). Never raises."""
        wait.waiting = False
        wait.cancel = None   # it holds the call: the thread-pool server releases the call (and
        # HTTP/2 stops counting its stream) only once nothing refers to it
        if wait.counted and self.slots is not None:
            self.slots.arrived(wait.client, wait.late)

    def _late(self, wait: Wait) -> None:
        """The watchdog: a unary call's request is late. Never raises."""
        assert self.slots is not None
        if self.slots.late(wait.client):
            wait.late = True
            self.requests.requeue(wait, self.limits.request_timeout - self.limits.late_after)
        else:
            wait.refused = True
            wait.end()

    def _full(self, client: str) -> ResourceExhausted:
        assert self.slots is not None
        return ResourceExhausted(f"{client} already has {self.slots.cap} calls open "
                                 f"(server.max_calls_per_client); retry when one has ended")

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

    def ended(self, method: str, wait: Wait, stream: bool) -> AuthorityError:
        """The error of a call the watchdog ended while it waited; logged. Never raises."""
        client = wait.client or "a client"
        if wait.refused:
            error: AuthorityError = self._full(wait.client)
            message = f"request late, and {error.message}"
            log.info("%s from %s: %s; call ended", method, client, message)
            return ResourceExhausted(message)
        if stream:
            setting, timeout = "server.stream_idle_timeout", self.limits.stream_idle_timeout
            what = "request stream: no message"
        else:
            setting, timeout = "server.request_timeout", self.limits.request_timeout
            what = "request: not received"
        message = f"{what} within {timeout:g} s ({setting})"
        log.info("%s from %s: %s; call ended", method, client, message)
        return RequestTimeout(message)

    def expire(self) -> None:
        """End (or make late) the calls whose waits expired: the watchdog's work. Never
        raises."""
        self.lateness.expire()
        self.requests.expire()
        self.streams.expire()
        if self.slots is not None and time.monotonic() - self._pruned > PRUNE_EVERY:
            self._pruned = time.monotonic()
            self.slots.prune()

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
