"""Per-client rate limits: a token bucket per caller, RESOURCE_EXHAUSTED when it is empty.

The caller is the URI SAN of its verified client certificate (mTLS), else its peer host
(``ipv4:10.0.0.7``: the port is dropped, so new connections do not buy new buckets). Each
request costs one token, a batch request (``items``) one token per item, and every message of a
stream is charged as it arrives. A bucket holds at most ``burst`` tokens and refills at
``rate`` per second; a request is let through when the bucket holds ``min(cost, burst)``
tokens, and may take it below zero (so a batch larger than the burst passes once the bucket is
full, and the debt is paid back before the next call). Health checks are never limited. Both
servers' guards charge the buckets (``Gate.charge`` in authority/service/admission.py).

At most ``max_clients`` buckets are kept (least recently used evicted first), so a flood of
distinct callers cannot grow memory without bound; an evicted caller starts again with a full
bucket, which only matters to a flood that already has that many distinct identities.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

from authority.service.auth import peer_uris

MAX_CLIENTS = 10_000


class TokenBuckets:
    """Token buckets keyed by client; thread-safe; bounded (LRU)."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS,
                 now: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0 or max_clients <= 0:
            raise ValueError("rate, burst and max_clients must be positive")
        self.rate = rate
        self.burst = burst
        self._max = max_clients
        self._now = now
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def take(self, client: str, cost: int = 1) -> float:
        """Charge ``cost`` tokens; returns 0.0 if allowed, else the seconds until it would be.
        Never raises."""
        cost = max(1, cost)
        with self._lock:
            now = self._now()
            tokens, then = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            need = min(cost, self.burst)
            if tokens >= need:
                tokens -= cost
                wait = 0.0
            else:
                wait = (need - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return wait

    def refusal(self, client: str, cost: int, method: str) -> str | None:
        """Charge ``client`` as ``take`` does; the RESOURCE_EXHAUSTED message if over its rate,
        else None. Never raises."""
        wait = self.take(client, cost)
        if wait <= 0:
            return None
        return (f"rate limit: {self.rate:g} requests/s (burst {self.burst}) exceeded for "
                f"{method}; retry in {wait:.2f} s")

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(context: grpc.ServicerContext, uris: list[str] | None = None) -> str:
    """The caller's rate-limit key: its certificate URI, else its peer without the port.
    ``uris``: the caller's ``peer_uris`` when already read. Never raises."""
    if uris is None:
        uris = peer_uris(context)
    if len(uris) == 1:
        return uris[0]
    peer = str(context.peer())
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


def _cost(request: Any) -> int:
    items = getattr(request, "items", None)
    try:
        return max(1, len(items)) if items is not None else 1
    except TypeError:
        return 1
