"""Everything one run measured, and its JSON form (the keys the issue names are top level)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from authority.bench import gateway
from authority.bench.loops import Latencies, Tally, percentile
from authority.bench.options import Options
from authority.bench.savings import Savings
from authority.bench.storm import StormRun
from authority.bench.targets import evaluate, ratio, store_comparison

CLIENT = "one grpc.aio client process, one channel"
#: JSON key of each gRPC phase's rate (the raw device is added by ``figures``)
_RATES = (("echo_calls_per_s", "echo"), ("unary_issue_per_s", "unary_issue"),
          ("unary_redeem_per_s", "unary_redeem"), ("batch_redeem_per_s", "batch_redeem"),
          ("stream_redeem_per_s", "stream_redeem"))


@dataclass
class Results:
    """Filled phase by phase by the runner; ``figures`` makes the report."""

    options: Options
    machine: dict[str, object]
    backend_info: dict[str, object] = field(default_factory=dict)
    phases: dict[str, Tally] = field(default_factory=dict)
    device_threads: int | None = None
    device_processes: int | None = None
    latency: Latencies | None = None
    same_load: Latencies | None = None        # (f) at the run's common load (--store)
    echo_latency: Latencies | None = None
    storm: StormRun | None = None
    savings: Savings | None = None
    gateway: dict[str, Any] | None = None     # (h): gateway.measure's document
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    server_mode: str = ""                     # the mode measured ("" with --address)
    by_mode: dict[str, dict[str, Any]] = field(default_factory=dict)  # --server-mode both
    server_processes: int | None = None       # server.processes measured (None: default)
    by_processes: dict[str, dict[str, Any]] = field(default_factory=dict)  # --server-processes
    store: str = "sqlite"                     # the store of the server measured
    by_store: dict[str, dict[str, Any]] = field(default_factory=dict)  # --store postgresql

    def rate(self, phase: str) -> float | None:
        """OK items per second of a phase, or None if it did not run (or nothing succeeded)."""
        tally = self.phases.get(phase)
        return tally.per_s if tally is not None and tally.ok else None

    def redeem_client_us(self) -> float | None:
        """Client CPU microseconds per unary RedeemTicket call."""
        tally = self.phases.get("unary_redeem")
        return tally.client_cpu / tally.calls * 1e6 if tally and tally.calls else None

    def call_p99_ms(self, phase: str) -> float | None:
        """p99 of the seconds of a closed-loop phase's answered calls, in ms (None: none)."""
        tally = self.phases.get(phase)
        return _ms(percentile(tally.latencies, 0.99)) if tally is not None else None

    def figures(self) -> dict[str, Any]:
        """The JSON document: flat figures, then details, then the targets."""
        out: dict[str, Any] = {"backend": self.backend_info.get("backend", self.options.backend)}
        out.update((key, self.rate(phase)) for key, phase in _RATES)
        out["raw_device_per_s"] = self.rate("raw_device")
        out["raw_device_threads"] = self.device_threads
        out["raw_device_processes"] = self.device_processes
        out["raw_device_one_session_per_s"] = self.rate("raw_device_one_session")
        out.update(ceiling(out["echo_calls_per_s"], out["raw_device_one_session_per_s"],
                           out["unary_issue_per_s"], out["unary_redeem_per_s"]))
        out["batch_redeem_p99_ms"] = self.call_p99_ms("batch_redeem")
        out.update(self._storm_figures())
        out.update(self._latency_figures())
        out["store"] = self.store if self.options.own_server else None
        if self.by_store:
            out["by_store"] = self.by_store
            out.update(store_comparison(self.by_store))
        out["savings"] = self.savings.as_json() if self.savings else None
        out.update(gateway.figures(self.gateway, self.skipped.get("gateway", "")))
        out["failures"] = sum(t.failed for t in self.phases.values())
        out["server_mode"] = self.server_mode or None
        out["server_modes"] = self.by_mode
        out["server_processes"] = self.server_processes
        out["by_server_processes"] = self.by_processes
        out["phases"] = {name: _phase_json(t) for name, t in self.phases.items()}
        out["machine"] = self.machine
        out["backend_info"] = self.backend_info
        out["settings"] = _settings(self.options)
        out["skipped"] = self.skipped
        out["errors"] = self.errors
        out["targets"] = {t.name: t.as_json() for t in evaluate(out)}
        return out

    def mode_figures(self, raw_device_per_s: float | None) -> dict[str, Any]:
        """The figures that compare server modes (rates, ratios, storm, latency, CPU, the
        unary ceiling from this run's own one-session device slices)."""
        out: dict[str, Any] = {key: self.rate(phase) for key, phase in _RATES}
        echo = out["echo_calls_per_s"]
        out["unary_issue_vs_echo"] = ratio(out["unary_issue_per_s"], echo)
        out["unary_redeem_vs_echo"] = ratio(out["unary_redeem_per_s"], echo)
        out["raw_device_one_session_per_s"] = self.rate("raw_device_one_session")
        out.update(ceiling(echo, out["raw_device_one_session_per_s"], out["unary_issue_per_s"],
                           out["unary_redeem_per_s"]))
        out["batch_vs_raw_device"] = ratio(out["batch_redeem_per_s"], raw_device_per_s)
        out["batch_redeem_p99_ms"] = self.call_p99_ms("batch_redeem")
        out["unary_redeem_closed_p99_ms"] = self.call_p99_ms("unary_redeem")
        out.update(self._storm_figures())
        out.update({k: v for k, v in self._latency_figures().items()
                    if k in ("redeem_p50_ms", "redeem_p99_ms", "redeem_p999_ms",
                             "latency_offered_per_s")})
        same = self.same_load
        out["same_load_offered_per_s"] = same.offered_per_s if same else None
        out["same_load_redeem_p50_ms"] = _ms(percentile(same.seconds, 0.50)) if same else None
        out["same_load_redeem_p99_ms"] = _ms(percentile(same.seconds, 0.99)) if same else None
        out["same_load_failed"] = same.tally.failed if same else None
        phases = {name: _phase_json(t) for name, t in self.phases.items()}
        out["server_cpu_us_per_item"] = {n: p["server_cpu_us_per_item"]
                                         for n, p in phases.items()}
        out["db_cpu_us_per_item"] = {n: p["db_cpu_us_per_item"] for n, p in phases.items()}
        out["failed"] = {name: t.failed for name, t in self.phases.items()}
        consume = self.phases.get("consume")
        out["consume_per_s"] = consume.per_s if consume is not None and consume.ok else None
        out["store"], out["server_processes"] = self.store, self.server_processes
        return out

    def _storm_figures(self) -> dict[str, Any]:
        storm = self.storm
        if storm is None:
            return {"storm_tickets": None, "storm_seconds": None, "storm_per_s": None,
                    "storm_failures": None, "peak_rss_mb": None, "server_vmhwm_mb": None,
                    "store_bytes_per_ticket": None, "consumed_entries": None}
        return {"storm_tickets": storm.tickets, "storm_seconds": storm.storm.seconds,
                "storm_per_s": storm.storm.per_s,
                "storm_failures": storm.storm.failed + storm.issued.failed,
                "peak_rss_mb": storm.peak_rss_mb, "server_vmhwm_mb": storm.vmhwm_mb,
                "store_bytes_per_ticket": storm.store_bytes_per_ticket,
                "consumed_entries": storm.consume.ok if storm.consume else None}

    def _latency_figures(self) -> dict[str, Any]:
        lat = self.latency
        if lat is None:
            return {"redeem_p50_ms": None, "redeem_p99_ms": None, "redeem_p999_ms": None,
                    "latency_offered_per_s": None, "latency_achieved_per_s": None,
                    "latency_send_lag_p99_ms": None, **self._echo_latency()}
        return {"redeem_p50_ms": _ms(percentile(lat.seconds, 0.50)),
                "redeem_p99_ms": _ms(percentile(lat.seconds, 0.99)),
                "redeem_p999_ms": _ms(percentile(lat.seconds, 0.999)),
                "latency_offered_per_s": lat.offered_per_s,
                "latency_achieved_per_s": lat.tally.per_s,
                "latency_send_lag_p99_ms": _ms(percentile(lat.lag, 0.99)),
                **self._echo_latency()}

    def _echo_latency(self) -> dict[str, Any]:
        echo = self.echo_latency.seconds if self.echo_latency else []
        return {"echo_p50_ms": _ms(percentile(echo, 0.50)),
                "echo_p99_ms": _ms(percentile(echo, 0.99)),
                "echo_p999_ms": _ms(percentile(echo, 0.999))}


def ceiling(echo: float | None, one_session: float | None, issue: float | None,
            redeem: float | None) -> dict[str, float | None]:
    """``unary_ceiling_per_s``: what an echo call plus one device operation allow,
    1 / (1/echo + 1/one-session device rate); and unary issue and redeem as shares of it
    (None where a figure is missing). Never raises."""
    bound = 1 / (1 / echo + 1 / one_session) if echo and one_session else None
    return {"unary_ceiling_per_s": bound,
            "unary_issue_ratio_ceiling": ratio(issue, bound),
            "unary_redeem_ratio_ceiling": ratio(redeem, bound)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _phase_json(tally: Tally) -> dict[str, Any]:
    busy = tally.seconds or 1.0
    items = (tally.ok + tally.failed) or 1
    server, db = tally.server_cpu, tally.db_cpu
    return {"ok": tally.ok, "failed": tally.failed, "calls": tally.calls,
            "seconds": tally.seconds, "per_s": tally.per_s,
            "client_cpu_pct": 100 * tally.client_cpu / busy,
            "server_cpu_pct": None if server is None else 100 * server / busy,
            "db_cpu_pct": None if db is None else 100 * db / busy,
            "client_cpu_us_per_item": 1e6 * tally.client_cpu / items,
            "server_cpu_us_per_item": None if server is None else 1e6 * server / items,
            "db_cpu_us_per_item": None if db is None else 1e6 * db / items,
            "call_p99_ms": _ms(percentile(tally.latencies, 0.99)),
            "first_error": tally.first_error or None}


def _settings(options: Options) -> dict[str, Any]:
    return {"address": options.address, "own_server": options.own_server,
            "concurrency": options.concurrency, "batch_size": options.batch_size,
            "storm_tickets": options.storm_tickets, "duration_s": options.duration,
            "quick": options.quick, "client": _client(options),
            "server_mode": options.server_mode,
            "server_processes": list(options.server_processes) or None,
            "stores": list(options.stores)}


def _client(options: Options) -> str:
    channels = options.client_channels
    if channels == 1:
        return CLIENT
    return (f"one grpc.aio client process, {channels} channels (own connections, spread "
            "evenly over the replicas)")
