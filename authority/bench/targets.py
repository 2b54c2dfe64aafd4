"""The issue's targets, judged from a run's figures (the flat JSON keys)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STORM_TARGET_TICKETS = 100_000
#: issue 14: unary issue and redeem against 1 / (1/echo + 1/one-session device rate)
CEILING_SHARE = 0.85
#: issue 14: the gateway's CPU per resumption at these concurrencies (and above) ...
GATEWAY_LEVELS = (8, 64)
#: ... at most this share of a MODP-2048 + RSA-2048 handshake (with chain), and below an
#: ECDH P-256 + ECDSA P-256 one (with chain)
GATEWAY_MODP_SHARE = 0.10


@dataclass(frozen=True)
class Target:
    """One target: what it asks, the value measured, and whether it was met (None: n/a)."""

    name: str
    wants: str
    short: str
    value: float | None
    limit: float
    at_most: bool
    met: bool | None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        """The JSON form (``met`` is true, false or null for not applicable / not measured)."""
        return {"target": self.wants, "value": self.value, "limit": self.limit,
                "met": self.met, "note": self.note}

    @property
    def status(self) -> str:
        """"met", "NOT MET" or "n/a"."""
        return "n/a" if self.met is None else ("met" if self.met else "NOT MET")


def _num(figures: Mapping[str, Any], key: str) -> float | None:
    value = figures.get(key)
    return float(value) if isinstance(value, int | float) else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (or b is 0). Never raises."""
    return a / b if a is not None and b else None


def _judge(name: str, wants: str, short: str, value: float | None, limit: float, at_most: bool,
           applies: bool = True, failures: int = 0, note: str = "") -> Target:
    if not applies:
        return Target(name, wants, short, value, limit, at_most, None, "SoftHSM2 only")
    if value is None:
        return Target(name, wants, short, value, limit, at_most, None, note or "not measured")
    met = value <= limit if at_most else value >= limit
    if failures:
        met, note = False, f"{failures:,} failed items; {note}".rstrip("; ")
    return Target(name, wants, short, value, limit, at_most, met, note)


def _phase_failures(figures: Mapping[str, Any], *names: str) -> int:
    phases = figures.get("phases", {})
    return sum(int(phases.get(n, {}).get("failed", 0)) for n in names)


def evaluate(figures: Mapping[str, Any]) -> list[Target]:
    """Every target of the issues, in table order (the PostgreSQL ones only when the run
    compared stores)."""
    by_store = figures.get("by_store")
    extra = store_targets(figures, by_store) if isinstance(by_store, Mapping) else []
    return _targets(figures) + extra


def _targets(figures: Mapping[str, Any]) -> list[Target]:
    softhsm = figures.get("backend") == "pkcs11"
    device = "SoftHSM2" if softhsm else "swtpm"
    echo = _num(figures, "echo_calls_per_s")
    fail = _phase_failures
    storm_n = int(figures.get("storm_tickets") or 0)
    storm_s = _num(figures, "storm_seconds")
    projected = storm_s * STORM_TARGET_TICKETS / storm_n if storm_s and storm_n else None
    storm_note = "" if storm_n == STORM_TARGET_TICKETS else (
        f"projected from {storm_n:,}" if storm_n else "")
    return [
        _judge("unary_issue_vs_echo", "unary issue >= 90% of echo", ">= 90% of echo", ratio(
            _num(figures, "unary_issue_per_s"), echo), 0.90, False,
            failures=fail(figures, "echo", "unary_issue")),
        _judge("unary_redeem_vs_echo", "unary redeem >= 90% of echo", ">= 90% of echo", ratio(
            _num(figures, "unary_redeem_per_s"), echo), 0.90, False,
            failures=fail(figures, "echo", "unary_redeem")),
        _judge("batch_vs_raw_device", f"{device} batched redeem >= 80% of raw device",
            ">= 80% of raw", ratio(
            _num(figures, "batch_redeem_per_s"), _num(figures, "raw_device_per_s")), 0.80,
            False, failures=fail(figures, "batch_redeem", "raw_device")),
        _judge("batch_redeem_rate", "SoftHSM2 batched redeem >= 12,000 tickets/s",
               ">= 12,000/s",
               _num(figures, "batch_redeem_per_s"), 12_000, False, applies=softhsm,
               failures=fail(figures, "batch_redeem")),
        _judge("storm_seconds", "SoftHSM2 storm of 100,000 tickets <= 8 s",
               "100k in <= 8 s", projected, 8.0,
               True, applies=softhsm, failures=fail(figures, "storm_issue", "storm"),
               note=storm_note),
        _judge("redeem_p99_ms", "p99 unary redeem <= 3 ms at half the saturated rate",
               "p99 <= 3 ms",
               _num(figures, "redeem_p99_ms"), 3.0, True, failures=fail(figures, "latency")),
        _judge("storm_rss_mb", "server RSS <= 150 MB during the storm", "<= 150 MB",
               _num(figures, "peak_rss_mb"), 150.0, True),
        _judge("store_bytes_per_ticket", "consumed-ticket store <= 100 bytes per live ticket",
               "<= 100 B/ticket",
               _num(figures, "store_bytes_per_ticket"), 100.0, True,
               failures=fail(figures, "consume")),
        *ceiling_targets(figures),
        *gateway_targets(figures),
    ]


def ceiling_targets(figures: Mapping[str, Any]) -> list[Target]:
    """Issue 14: unary issue and redeem >= 0.85 of ``unary_ceiling_per_s`` (PKCS#11: the
    ceiling's device rate is a python-pkcs11 loop)."""
    pkcs11 = figures.get("backend") == "pkcs11"
    out = []
    for rpc in ("issue", "redeem"):
        out.append(_judge(
            f"unary_{rpc}_vs_ceiling",
            f"unary {rpc} >= {CEILING_SHARE:g} of 1 / (1/echo + 1/one-session device rate)",
            f">= {CEILING_SHARE:.0%} of ceiling",
            _num(figures, f"unary_{rpc}_ratio_ceiling"), CEILING_SHARE, False,
            applies=pkcs11, failures=_phase_failures(figures, "echo", f"unary_{rpc}")))
    return out


def gateway_judged(figures: Mapping[str, Any]) -> tuple[float | None, str]:
    """The gateway CPU per resumption the targets judge: the worst of the coalesced figures at
    GATEWAY_LEVELS, or of the uncoalesced ones when the client has no coalescing (then said in
    the note); None when any is missing."""
    for suffix, note in (("_coalesced", "coalesced"), ("", "without coalescing: the client "
                                                          "has none")):
        values = [_num(figures, f"gateway_cpu_us_at_{n}{suffix}") for n in GATEWAY_LEVELS]
        if all(v is not None for v in values):
            return max(v for v in values if v is not None), note
    return None, ""


def gateway_targets(figures: Mapping[str, Any]) -> list[Target]:
    """Issue 14: at 8 and 64 concurrent resumptions, the gateway's CPU per resumption <= 1/10
    of a MODP-2048 + RSA-2048 handshake and below an ECDH + ECDSA one, both with their
    certificate chain (the ratio is judged)."""
    worst, note = gateway_judged(figures)
    savings = figures.get("savings")
    savings = savings if isinstance(savings, Mapping) else {}
    gateway = figures.get("gateway")
    runs = gateway.get("runs", []) if isinstance(gateway, Mapping) else []
    failed = sum(int(r.get("failed", 0)) for r in runs if r.get("client") == "sync"
                 and r.get("concurrency") in GATEWAY_LEVELS)
    levels = " and ".join(map(str, GATEWAY_LEVELS))
    modp = ratio(worst, _num(savings, "handshake_modp_rsa_chain_us"))
    ec = ratio(worst, _num(savings, "handshake_ecdh_ecdsa_chain_us"))
    return [
        _judge("gateway_cpu_vs_modp_rsa",
               f"gateway CPU per resumption at {levels} concurrent <= "
               f"{GATEWAY_MODP_SHARE:g} of a MODP-2048 + RSA-2048 handshake (with chain)",
               f"<= {GATEWAY_MODP_SHARE:g}x MODP/RSA", modp, GATEWAY_MODP_SHARE, True,
               failures=failed, note=note if modp is not None else ""),
        _judge("gateway_cpu_vs_ecdh_ecdsa",
               f"gateway CPU per resumption at {levels} concurrent below an ECDH P-256 + "
               "ECDSA P-256 handshake (with chain)", "< 1x ECDH/ECDSA", ec, 1.0, True,
               failures=failed, note=note if ec is not None else ""),
    ]


#: ``--store postgresql``: the JSON prefix of each PostgreSQL configuration's figures
STORE_PREFIXES = (("pg", "pg_"), ("pg2", "pg2_"))
#: the PostgreSQL targets of issue 13 (relative to one SQLite replica in the same run)
PG2_STORM_RATIO = 0.8
PG_P99_RATIO = 2.0


def store_comparison(by_store: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The flat keys of ``--store postgresql``: every scalar figure of each PostgreSQL
    configuration under its prefix (``pg_storm_seconds``, ``pg2_batch_redeem_per_s``...),
    ``unary_redeem_p99_ms`` of each (the open-loop p99 at half its own saturated rate,
    ``redeem_p99_ms``: what the target judges), the ratios to one SQLite replica (also of
    the p99 at SQLite's load, ``same_load_redeem_p99_ms``) and whether each target was met
    (None: not measured)."""
    sqlite = by_store.get("sqlite", {})
    out: dict[str, Any] = {"unary_redeem_p99_ms": _num(sqlite, "redeem_p99_ms")}
    for label, prefix in STORE_PREFIXES:
        pg = by_store.get(label, {})
        out.update((prefix + key, value) for key, value in pg.items()
                   if value is None or isinstance(value, int | float | str))
        out[prefix + "unary_redeem_p99_ms"] = _num(pg, "redeem_p99_ms")
        for key in ("storm_per_s", "batch_redeem_per_s", "unary_redeem_per_s"):
            name = key.removesuffix("_per_s")
            out[f"{prefix}{name}_ratio_sqlite"] = ratio(_num(pg, key), _num(sqlite, key))
        for key, name in (("redeem_p99_ms", "unary_redeem_p99"),
                          ("same_load_redeem_p99_ms", "same_load_unary_redeem_p99"),
                          ("batch_redeem_p99_ms", "batch_redeem_p99")):
            out[f"{prefix}{name}_ratio_sqlite"] = ratio(_num(pg, key), _num(sqlite, key))
    for target in store_targets(out, by_store):
        out[target.name.replace("_vs_sqlite", "_target_met")] = target.met
    return out


def store_targets(figures: Mapping[str, Any],
                  by_store: Mapping[str, Mapping[str, Any]]) -> list[Target]:
    """The issue's PostgreSQL targets, judged from the ratios of ``store_comparison``."""
    def failed(label: str, *phases: str) -> int:
        counts = by_store.get(label, {}).get("failed") or {}
        sqlite = by_store.get("sqlite", {}).get("failed") or {}
        return sum(int(counts.get(p, 0)) + int(sqlite.get(p, 0)) for p in phases)

    targets = [_judge("pg2_storm_vs_sqlite",
                      f"storm through 2 PostgreSQL replicas >= {PG2_STORM_RATIO:g} of 1 "
                      "SQLite replica's rate", f">= {PG2_STORM_RATIO:g}x SQLite",
                      _num(figures, "pg2_storm_ratio_sqlite"), PG2_STORM_RATIO, False,
                      failures=failed("pg2", "storm_issue", "storm"))]
    for label, prefix in STORE_PREFIXES:
        replicas = "1 PostgreSQL replica" if label == "pg" else "2 PostgreSQL replicas"
        targets.append(_judge(
            f"{prefix}unary_redeem_p99_vs_sqlite",
            f"unary redeem p99 on {replicas} <= {PG_P99_RATIO:g}x 1 SQLite replica's",
            f"<= {PG_P99_RATIO:g}x SQLite", _num(figures, f"{prefix}unary_redeem_p99_ratio_sqlite"),
            PG_P99_RATIO, True, failures=failed(label, "latency")))
    return targets
