"""Prometheus metrics: device latency, ticket results, key ages and seal counts, consumed set.

Each authority owns its registry (tests run several in one process). RPC latency is observed by
the service layer (authority/service/observability.py) into the same registry.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from authority.backends.base import BackendInfo, KeyBackend
from authority.errors import DeviceUnavailable, InvalidTicket, KeyNotFound
from authority.serving import DeviceHealth

if TYPE_CHECKING:
    from authority.app import Authority

DEVICE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                  0.1, 0.25, 1.0)
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The metric objects of one authority."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.device_seconds = Histogram(
            "ticket_authority_device_operation_seconds", "Time of one device call (a batch "
            "call counts once)", ["op"], buckets=DEVICE_BUCKETS, registry=self.registry)
        self.device_inflight = Gauge(
            "ticket_authority_device_sessions_in_use", "Device calls in progress (sessions or "
            "worker slots in use)", registry=self.registry)
        self.rpc_seconds = Histogram(
            "ticket_authority_rpc_seconds", "gRPC call latency", ["method", "code"],
            buckets=RPC_BUCKETS, registry=self.registry)

    def watch(self, authority: Authority) -> None:
        """Export the authority's counters and key ring at scrape time."""
        self.registry.register(_StateCollector(authority))


class _StateCollector(Collector):
    def __init__(self, authority: Authority) -> None:
        self._a = authority

    def collect(self) -> Iterator[Any]:
        counts = self._a.counters.snapshot()
        issued = CounterMetricFamily("ticket_authority_tickets_issued", "Tickets issued")
        issued.add_metric([], counts.get("issued", 0))
        redeems = CounterMetricFamily("ticket_authority_redeems", "Redeems by result",
                                      labels=["result"])
        for result in ("ok", "invalid", "expired", "replayed", "revoked"):
            redeems.add_metric([result], counts.get(f"redeem.{result}", 0))
        invalid = CounterMetricFamily("ticket_authority_redeems_invalid",
                                      "INVALID redeems by the check that refused them",
                                      labels=["stage"])
        for stage in ("malformed", "key", "auth", "plaintext", "realm"):
            invalid.add_metric([stage], counts.get(f"redeem.invalid.{stage}", 0))
        yield from (issued, redeems, invalid)
        yield from self._keys()
        yield from self._store()
        yield from self._device()

    def _store(self) -> Iterator[Any]:
        """``ticket_authority_store_up`` (1: the state store answered this scrape, 0: it did
        not) and, only when it answered, the consumed-set size: a value the store cannot give
        now is left out (its series goes stale in Prometheus), not repeated as if current; the
        rest of the scrape still answers."""
        up = GaugeMetricFamily("ticket_authority_store_up", "1 if the state store answered "
                               "this scrape, 0 if it could not be reached (store-derived "
                               "gauges are then left out)")
        try:
            count = self._a.store.consumed_count(self._a.clock.now())
        except DeviceUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        consumed = GaugeMetricFamily("ticket_authority_consumed_tickets",
                                     "Live entries in the consumed-ticket set")
        consumed.add_metric([], count)
        yield from (up, consumed)

    def _device(self) -> Iterator[Any]:
        info = self._a.backend.describe()
        processes = GaugeMetricFamily("ticket_authority_device_processes",
                                      "Device processes running batches")
        processes.add_metric([], info.processes)
        restarts = CounterMetricFamily("ticket_authority_device_process_restarts",
                                       "Device processes replaced after dying, hanging or "
                                       "breaking the protocol")
        restarts.add_metric([], info.process_restarts)
        yield from (processes, restarts)

    def _keys(self) -> Iterator[Any]:
        now = self._a.clock.now()
        age = GaugeMetricFamily("ticket_authority_key_age_seconds", "Age of each live key",
                                labels=["key_id", "state"])
        seals = GaugeMetricFamily("ticket_authority_key_seals", "Seals counted against each "
                                  "live key's nonce budget", labels=["key_id", "state"])
        for record in self._a.ring.records():
            if record.state.name == "DESTROYED":
                continue
            labels = [record.key_id.hex(), record.state.name]
            age.add_metric(labels, now - record.created_at)
            seals.add_metric(labels, record.seal_count)
        yield from (age, seals)


def _all_keys_found(results: list[bytes | InvalidTicket]) -> bool:
    """Whether the device found every key of an unseal batch: callers ask only for keys the key
    ring says it holds, so a KeyNotFound is the device failing, as a failed call is."""
    return not any(isinstance(r, KeyNotFound) for r in results)


def _says_nothing(_result: object) -> None:
    """The judge of a call whose success says nothing of the device (a failure still
    counts)."""
    return None


class InstrumentedBackend:
    """A backend that times every device call into the metrics; behaviour unchanged."""

    def __init__(self, inner: KeyBackend, metrics: Metrics,
                 health: DeviceHealth | None = None) -> None:
        self._inner = inner
        self._metrics = metrics
        self.health = health or DeviceHealth(lambda up: None)   # up/down from the calls
        self.name = inner.name
        self.format_version = inner.format_version
        self._by_op: dict[str, Any] = {}   # labelled histogram children: labels() is slow

    def _timed(self, op: str, call: Callable[[], Any],
               judge: Callable[[Any], bool | None] | None = None) -> Any:
        """``call()`` timed; its outcome feeds the device's health: a failure if it raised
        DeviceUnavailable or KeyNotFound, or if ``judge(result)`` is False; a success unless
        ``judge(result)`` is None (the call says nothing of the device)."""
        start = self._begin()
        try:
            result = call()
        except (DeviceUnavailable, KeyNotFound):
            self.health.failed()
            raise
        finally:
            self._end(op, start)
        self._judged(result, judge)
        return result

    async def _timed_async(self, op: str, call: Callable[[], Awaitable[Any]],
                           judge: Callable[[Any], bool | None] | None = None) -> Any:
        start = self._begin()
        try:
            result = await call()
        except (DeviceUnavailable, KeyNotFound):
            self.health.failed()
            raise
        finally:
            self._end(op, start)
        self._judged(result, judge)
        return result

    def _judged(self, result: Any, judge: Callable[[Any], bool | None] | None) -> None:
        """Feed a returned call's outcome to the device's health (see ``_timed``)."""
        verdict = True if judge is None else judge(result)
        if verdict is None:
            return
        if verdict:
            self.health.succeeded()
        else:
            self.health.failed()

    def _begin(self) -> float:
        """Count one device call in flight; return its start time."""
        self._metrics.device_inflight.inc()
        return time.perf_counter()

    def _end(self, op: str, start: float) -> None:
        """Record the call's duration under ``op`` and count it out of flight."""
        child = self._by_op.get(op)
        if child is None:
            child = self._by_op[op] = self._metrics.device_seconds.labels(op)
        child.observe(time.perf_counter() - start)
        self._metrics.device_inflight.dec()

    @property
    def asynchronous(self) -> bool:
        """Whether the inner backend serves ``*_many_async`` on an event loop (device
        processes in asynchronous mode); otherwise the async methods run the synchronous
        ones."""
        return bool(getattr(self._inner, "asynchronous", False))

    async def detach(self) -> None:
        """Release what the inner backend holds on the running event loop (device
        processes' links); call on the loop before it stops. Never raises."""
        detach = getattr(self._inner, "detach", None)
        if detach is not None:
            await detach()

    async def seal_many_async(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        inner = getattr(self._inner, "seal_many_async", None)
        if inner is None:
            return self.seal_many(items)
        result: list[bytes] = await self._timed_async("seal_many", lambda: inner(items))
        return result

    async def unseal_many_async(self, items: Sequence[tuple[bytes, bytes, bytes]]
                                ) -> list[bytes | InvalidTicket]:
        inner = getattr(self._inner, "unseal_many_async", None)
        if inner is None:
            return self.unseal_many(items)
        result: list[bytes | InvalidTicket] = await self._timed_async(
            "unseal_many", lambda: inner(items), _all_keys_found)
        return result

    def create_key(self, key_id: bytes) -> None:
        self._timed("create_key", lambda: self._inner.create_key(key_id))

    def destroy_key(self, key_id: bytes) -> None:
        self._timed("destroy_key", lambda: self._inner.destroy_key(key_id))

    def list_keys(self) -> set[bytes]:
        # a listing that works proves nothing: the TPM backend reads its blob directory,
        # SoftHSM2 lists the keys it cached while its token files are gone (nor does a
        # refresh: the TPM backend's does nothing)
        result: set[bytes] = self._timed("list_keys", self._inner.list_keys, _says_nothing)
        return result

    def refresh(self) -> None:
        self._timed("refresh", self._inner.refresh, _says_nothing)   # re-reads, proves nothing

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        result: bytes = self._timed("seal", lambda: self._inner.seal(key_id, aad, plaintext))
        return result

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        result: bytes = self._timed("unseal", lambda: self._inner.unseal(key_id, aad, sealed))
        return result

    def seal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        result: list[bytes] = self._timed("seal_many", lambda: self._inner.seal_many(items))
        return result

    def unseal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]
                    ) -> list[bytes | InvalidTicket]:
        result: list[bytes | InvalidTicket] = self._timed(
            "unseal_many", lambda: self._inner.unseal_many(items), _all_keys_found)
        return result

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        return self._inner.key_attributes(key_id)

    def describe(self) -> BackendInfo:
        return self._inner.describe()

    def close(self) -> None:
        self._inner.close()
