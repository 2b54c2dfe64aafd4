"""Prometheus metrics: device latency and errors, ticket results, key ages and seal counts,
consumed set, health, the maintenance lease, the TLS certificates' expiry.

Each authority owns its registry (tests run several in one process). RPC latency is observed by
the service layer (authority/service/observability.py) into the same registry. The alert rules
and the dashboard that use them: monitoring/ (tests/test_monitoring.py checks every name they
use is exported).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from authority.backends.base import BackendInfo, KeyBackend
from authority.cluster import MAINTENANCE
from authority.errors import DeviceUnavailable, InvalidTicket, KeyNotFound
from authority.sealer import (
    CONSUME_FAILURE_CAUSES,
    CONSUME_VIAS,
    consume_attempts,
    consume_failures,
)
from authority.serving import DeviceHealth

if TYPE_CHECKING:
    from authority.app import Authority

DEVICE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                  0.1, 0.25, 1.0)
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0, 2.5)
#: the device operations InstrumentedBackend times (their error series exist from the start, at
#: 0, so that rate() sees the first error)
DEVICE_OPS = ("seal", "unseal", "seal_many", "unseal_many", "create_key", "destroy_key",
              "list_keys", "refresh")


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
        self.device_errors = Counter(
            "ticket_authority_device_errors", "Device calls that failed (DeviceUnavailable) or "
            "did not find a key the key ring has", ["op"], registry=self.registry)
        for op in DEVICE_OPS:
            self.device_errors.labels(op)

    def watch(self, authority: Authority) -> None:
        """Export the authority's counters and key ring at scrape time."""
        self.registry.register(_StateCollector(authority))


class _StateCollector(Collector):
    def __init__(self, authority: Authority) -> None:
        self._a = authority
        self._not_after = _NotAfterCache()

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
        consumes = CounterMetricFamily("ticket_authority_consumes", "ConsumeTicket(s) items "
                                       "by result (refused: a handle not authentic)",
                                       labels=["result"])
        for result, name in (("ok", "consumed"), ("replayed", "consume_replayed"),
                             ("refused", "consume_refused")):
            consumes.add_metric([result], counts.get(name, 0))
        errors = CounterMetricFamily("ticket_authority_maintenance_errors", "Heartbeats and "
                                     "maintenance passes that failed", labels=["task"])
        for task in ("heartbeat", "maintenance"):
            errors.add_metric([task], counts.get(f"{task}_errors", 0))
        yield from (issued, redeems, invalid, consumes, errors)
        yield from _consume_outcomes(counts)
        yield from self._keys()
        yield from self._store()
        yield from self._device()
        yield from self._serving()
        yield from self._certificates()

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
        yield from self._lease()

    def _lease(self) -> Iterator[Any]:
        """The maintenance lease's fencing epoch as the store has it (it moves by one at each
        change of holder, in every replica's view: a counter of holder changes that no
        restart resets; left out if the store fails now or no replica took it yet)."""
        try:
            lease = self._a.store.load_lease(MAINTENANCE)
        except DeviceUnavailable:
            return
        if lease is None:
            return
        epoch = GaugeMetricFamily("ticket_authority_maintenance_lease_epoch", "Fencing epoch "
                                  "of the maintenance lease (+1 at each change of holder)")
        epoch.add_metric([], lease.epoch)
        yield epoch

    def _device(self) -> Iterator[Any]:
        info = self._a.backend.describe()
        processes = GaugeMetricFamily("ticket_authority_device_processes",
                                      "Device processes running batches")
        processes.add_metric([], info.processes)
        restarts = CounterMetricFamily("ticket_authority_device_process_restarts",
                                       "Device processes replaced after dying, hanging or "
                                       "breaking the protocol")
        restarts.add_metric([], info.process_restarts)
        up = GaugeMetricFamily("ticket_authority_device_up", "1 while the key device works, 0 "
                               "once its calls have failed for 1 s without a success")
        up.add_metric([], 0 if self._a.backend.health.down else 1)
        yield from (processes, restarts, up)

    def _serving(self) -> Iterator[Any]:
        """Health as load balancers see it, and whether this replica holds the lease."""
        serving = GaugeMetricFamily("ticket_authority_serving", "1 while health is SERVING "
                                    "(store confirmed current and device working), else 0")
        serving.add_metric([], 1 if self._a.serving.serving else 0)
        held = GaugeMetricFamily("ticket_authority_maintenance_lease_held", "1 while this "
                                 "replica holds the maintenance lease (runs rotation, "
                                 "destruction, purges)")
        held.add_metric([], 0 if self._a.lease.epoch is None else 1)
        yield from (serving, held)

    def _certificates(self) -> Iterator[Any]:
        """With ``[tls]``: the earliest notAfter among the certificates of the server's chain
        file and of the client CA file, as they are on disk (what the server serves once it
        has reloaded them); a file that cannot be read or parsed now is left out."""
        tls = self._a.config.tls
        if tls is None:
            return
        family = GaugeMetricFamily("ticket_authority_tls_certificate_not_after_seconds",
                                   "Unix time the earliest certificate of each TLS file "
                                   "expires at", labels=["file"])
        for label, path in (("server", tls.cert_file), ("client_ca", tls.client_ca_file)):
            not_after = self._not_after.read(path)
            if not_after is not None:
                family.add_metric([label], not_after)
        yield family

    def _keys(self) -> Iterator[Any]:
        now = self._a.clock.now()
        age = GaugeMetricFamily("ticket_authority_key_age_seconds", "Age of each live key",
                                labels=["key_id", "state"])
        period = GaugeMetricFamily("ticket_authority_key_rotation_period_seconds", "keys."
                                   "rotation_period: seconds a key seals before it is rotated "
                                   "(0: never)")
        period.add_metric([], self._a.config.keys.rotation_period)
        present = GaugeMetricFamily("ticket_authority_sealing_key_present", "1 if this "
                                    "replica has a sealing key (issues can seal), else 0")
        present.add_metric([], 0 if self._a.ring.primary_id is None else 1)
        seals = GaugeMetricFamily("ticket_authority_key_seals", "Seals counted against each "
                                  "live key's nonce budget", labels=["key_id", "state"])
        for record in self._a.ring.records():
            if record.state.name == "DESTROYED":
                continue
            labels = [record.key_id.hex(), record.state.name]
            age.add_metric(labels, now - record.created_at)
            seals.add_metric(labels, record.seal_count)
        yield from (age, seals, period, present)


def _consume_outcomes(counts: dict[str, int]) -> Iterator[Any]:
    """Every consume whichever RPC carried it (authority/sealer.py counts them where they
    happen: a batch of n items is n): the attempts by ``via`` and the failures by ``via`` and
    ``cause``, every series from 0 (what TicketAuthorityConsumeFailures divides)."""
    attempts = CounterMetricFamily(
        "ticket_authority_consume_attempts", "Tickets the authority set out to mark used, by "
        "origin (via: consume = ConsumeTicket(s) handles, authentic and not expired; redeem = "
        "RedeemTicket(s)/RedeemTicketStream items with consume=true, authentic, not expired, of "
        "the gateway's realm)", labels=["via"])
    failures = CounterMetricFamily(
        "ticket_authority_consume_failures", "Consume attempts answered with a server-side "
        "error, nothing recorded (cause: unavailable = the store failed or could not be "
        "reached, or the policy copy is past store.max_staleness; error = anything else)",
        labels=["via", "cause"])
    for via in CONSUME_VIAS:
        attempts.add_metric([via], counts.get(consume_attempts(via), 0))
        for cause in CONSUME_FAILURE_CAUSES:
            failures.add_metric([via, cause], counts.get(consume_failures(via, cause), 0))
    yield from (attempts, failures)


class _NotAfterCache:
    """The earliest notAfter of the certificates in a PEM file, parsed again only when the
    file's size or modification time changed."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int], float]] = {}

    def read(self, path: Path) -> float | None:
        """Unix time, or None if the file cannot be read or holds no certificate. Never
        raises."""
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            seen = self._seen.get(path)
            if seen is not None and seen[0] == stamp:
                return seen[1]
            certificates = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            return None
        not_after = min(c.not_valid_after_utc.timestamp() for c in certificates)
        self._seen[path] = (stamp, not_after)
        return not_after


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
            self._failed(op)
            raise
        finally:
            self._end(op, start)
        self._judged(op, result, judge)
        return result

    async def _timed_async(self, op: str, call: Callable[[], Awaitable[Any]],
                           judge: Callable[[Any], bool | None] | None = None) -> Any:
        start = self._begin()
        try:
            result = await call()
        except (DeviceUnavailable, KeyNotFound):
            self._failed(op)
            raise
        finally:
            self._end(op, start)
        self._judged(op, result, judge)
        return result

    def _judged(self, op: str, result: Any,
                judge: Callable[[Any], bool | None] | None) -> None:
        """Feed a returned call's outcome to the device's health (see ``_timed``)."""
        verdict = True if judge is None else judge(result)
        if verdict is None:
            return
        if verdict:
            self.health.succeeded()
        else:
            self._failed(op)

    def _failed(self, op: str) -> None:
        """A device call under ``op`` failed: counted, and fed to the device's health."""
        self._metrics.device_errors.labels(op).inc()
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
