"""The human table printed at the end of a run, made from the JSON figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from authority.bench.machine import machine_lines
from authority.bench.targets import Target, evaluate, store_targets

Row = tuple[str, str, str, str, str]


def _n(value: Any, unit: str = "", digits: int = 0) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _pct(a: Any, b: Any) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return f"{100 * a / b:.0f}%"
    return "-"


def _cpu(f: Mapping[str, Any], phase: str) -> str:
    """Server / client CPU microseconds per item of a phase."""
    p = f.get("phases", {}).get(phase)
    if not p:
        return "-"
    return f"{_n(p.get('server_cpu_us_per_item'))} / {_n(p.get('client_cpu_us_per_item'))}"


def _judged(targets: Sequence[Target]) -> tuple[str, str]:
    wants = "; ".join(t.short for t in targets)
    status = "; ".join(t.status + (f" ({t.note})" if t.note else "") for t in targets)
    return wants, status


def _rate_rows(f: Mapping[str, Any], by: Mapping[str, Target]) -> list[Row]:
    echo = f.get("echo_calls_per_s")
    conc = f["settings"]["concurrency"]
    batch = f["settings"]["batch_size"]
    raw = f.get("raw_device_per_s")
    threads = f.get("raw_device_threads")
    procs = f.get("raw_device_processes")
    via = f", {procs} device processes" if procs else ""
    return [
        (f"(a) echo Health/Check, {conc} in flight", _n(echo, " calls/s"), _cpu(f, "echo"),
         "-", "-"),
        ("(b) unary IssueTicket",
         f"{_n(f.get('unary_issue_per_s'), ' calls/s')} = "
         f"{_pct(f.get('unary_issue_per_s'), echo)} of echo", _cpu(f, "unary_issue"),
         *_judged([by["unary_issue_vs_echo"]])),
        ("(b) unary RedeemTicket",
         f"{_n(f.get('unary_redeem_per_s'), ' calls/s')} = "
         f"{_pct(f.get('unary_redeem_per_s'), echo)} of echo", _cpu(f, "unary_redeem"),
         *_judged([by["unary_redeem_vs_echo"]])),
        (f"(c) batched RedeemTickets x{batch}",
         f"{_n(f.get('batch_redeem_per_s'), ' tickets/s')} = "
         f"{_pct(f.get('batch_redeem_per_s'), raw)} of raw", _cpu(f, "batch_redeem"),
         *_judged([by["batch_vs_raw_device"], by["batch_redeem_rate"]])),
        (f"(c) RedeemTicketStream x{batch}", _n(f.get("stream_redeem_per_s"), " tickets/s"),
         _cpu(f, "stream_redeem"), "-", "-"),
        (f"(d) raw device unseal_many, {threads or '-'} thread(s){via}",
         _n(raw, " tickets/s"), f"- / {_n(_raw_cpu(f))}", "-",
         "-" if raw else f.get("skipped", {}).get("raw_device", "-")),
        ("(d) raw device, one session (python-pkcs11 decrypt)",
         _n(f.get("raw_device_one_session_per_s"), " decrypts/s"),
         f"- / {_n(_raw_cpu(f, 'raw_device_one_session'))}", "-",
         "-" if f.get("raw_device_one_session_per_s") else
         f.get("skipped", {}).get("raw_device_one_session", "-")),
        ("(b) unary ceiling 1/(1/echo + 1/one session)",
         _n(f.get("unary_ceiling_per_s"), " calls/s"), "-", "-", "-"),
        ("    unary IssueTicket / ceiling", _pct(f.get("unary_issue_ratio_ceiling"), 1), "-",
         *_judged([by["unary_issue_vs_ceiling"]])),
        ("    unary RedeemTicket / ceiling", _pct(f.get("unary_redeem_ratio_ceiling"), 1), "-",
         *_judged([by["unary_redeem_vs_ceiling"]])),
    ]


def _raw_cpu(f: Mapping[str, Any], phase: str = "raw_device") -> float | None:
    p = f.get("phases", {}).get(phase)
    return p.get("client_cpu_us_per_item") if p else None


def _storm_rows(f: Mapping[str, Any], by: Mapping[str, Target]) -> list[Row]:
    return [
        ("(e) failover storm (streams)",
         f"{_n(f.get('storm_tickets'), ' tickets')} in {_n(f.get('storm_seconds'), ' s', 2)}"
         f" = {_n(f.get('storm_per_s'), '/s')}, {_n(f.get('storm_failures'))} failed",
         _cpu(f, "storm"), *_judged([by["storm_seconds"]])),
        ("    server RSS during the storm",
         f"{_n(f.get('peak_rss_mb'), ' MB', 1)} (VmHWM {_n(f.get('server_vmhwm_mb'), ' MB', 1)})",
         "-", *_judged([by["storm_rss_mb"]])),
        ("    consumed-ticket store",
         f"{_n(f.get('store_bytes_per_ticket'), ' B/ticket', 1)} over "
         f"{_n(f.get('consumed_entries'))} entries", _cpu(f, "consume"),
         *_judged([by["store_bytes_per_ticket"]])),
        (f"(f) unary redeem at {_n(f.get('latency_offered_per_s'), '/s')} (open loop)",
         f"p50 {_n(f.get('redeem_p50_ms'), '', 2)} / p99 {_n(f.get('redeem_p99_ms'), '', 2)} / "
         f"p99.9 {_n(f.get('redeem_p999_ms'), ' ms', 2)}", _cpu(f, "latency"),
         *_judged([by["redeem_p99_ms"]])),
        ("    echo at the same rate (baseline)",
         f"p50 {_n(f.get('echo_p50_ms'), '', 2)} / p99 {_n(f.get('echo_p99_ms'), '', 2)} / "
         f"p99.9 {_n(f.get('echo_p999_ms'), ' ms', 2)}", _cpu(f, "latency_echo"), "-", "-"),
    ]


def _savings_rows(f: Mapping[str, Any]) -> list[Row]:
    s = f.get("savings")
    if not isinstance(s, dict):
        return [("(g) resumption savings", "-", "-", "-", "not measured")]
    us = " µs CPU"
    return [
        ("(g) handshake: ECDH P-256 + ECDSA sign+verify", _n(s["handshake_ecdh_ecdsa_us"], us),
         "-", "-", "-"),
        ("(g) handshake: MODP-2048 + RSA-2048 sign+verify",
         _n(s["handshake_modp_rsa_us"], us), "-", "-", "-"),
        ("(g) resumption: redeem call + derive keys",
         f"{_n(s['resumption_us'], us)} ({_n(s['redeem_client_us'])} + "
         f"{_n(s['derive_resumed_keys_us'])})", "-", "-", "-"),
        ("    handshake / resumption",
         f"{_n(s['ratio_ecdh_ecdsa'], 'x', 1)} (EC), {_n(s['ratio_modp_rsa'], 'x', 1)} "
         f"(MODP/RSA)", "-", "-", "-"),
        ("(g) handshake + 2-cert chain: ECDH + ECDSA",
         f"{_n(s.get('handshake_ecdh_ecdsa_chain_us'), us)} (chain "
         f"{_n(s.get('ecdsa_p256_chain_verify_us'))})", "-", "-", "-"),
        ("(g) handshake + 2-cert chain: MODP + RSA",
         f"{_n(s.get('handshake_modp_rsa_chain_us'), us)} (chain "
         f"{_n(s.get('rsa2048_chain_verify_us'))})", "-", "-", "-"),
    ]


def _gateway_rows(f: Mapping[str, Any], by: Mapping[str, Target]) -> list[Row]:
    """(h) the gateway's CPU per resumption at each concurrency, without / with coalescing,
    each as shares of the handshakes with chain; then the targets (the worst at 8 and 64)."""
    savings = f.get("savings")
    s: Mapping[str, Any] = savings if isinstance(savings, dict) else {}
    modp, ec = s.get("handshake_modp_rsa_chain_us"), s.get("handshake_ecdh_ecdsa_chain_us")
    rows: list[Row] = []
    for client, prefix in (("TicketClient, threads", "gateway_cpu_us_at_"),
                           ("AsyncTicketClient, tasks", "gateway_aio_cpu_us_at_")):
        for level in (1, 8, 64):
            value = _shares(f.get(f"{prefix}{level}"), modp, ec)
            if level > 1:
                value += f"; coalesced {_shares(f.get(f'{prefix}{level}_coalesced'), modp, ec)}"
            rows.append((f"(h) gateway CPU/resumption: {client}, {level} at once", value, "-",
                         "-", "-"))
    modp_t, ec_t = by["gateway_cpu_vs_modp_rsa"], by["gateway_cpu_vs_ecdh_ecdsa"]
    rows.append(("    threads, worst of 8 and 64 / handshake with chain",
                 f"{_n(modp_t.value, 'x', 2)} MODP/RSA, {_n(ec_t.value, 'x', 2)} EC", "-",
                 *_judged([modp_t, ec_t])))
    notes = (f.get("gateway") or {}).get("notes") or []
    return rows + [("    note", note, "-", "-", "-") for note in notes]


def _shares(us: Any, modp: Any, ec: Any) -> str:
    """``N µs (x% MODP/RSA, y% EC)``."""
    if not isinstance(us, int | float):
        return "-"
    return f"{_n(us, ' µs')} ({_pct(us, modp)} MODP/RSA, {_pct(us, ec)} EC)"


def render(figures: Mapping[str, Any]) -> str:
    """Machine lines, then one row per figure with its target and status."""
    by = {t.name: t for t in evaluate(figures)}
    rows: list[Row] = [("figure", "value", "CPU µs/item srv / cli", "target", "status")]
    rows += _rate_rows(figures, by) + _storm_rows(figures, by) + _savings_rows(figures)
    rows += _gateway_rows(figures, by)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = machine_lines(figures["machine"], figures.get("backend_info") or {})
    lines.append("")
    for index, row in enumerate(rows):
        cells = [row[i].ljust(widths[i]) for i in range(4)] + [row[4]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in [*widths, 6]))
    met = [t for t in by.values() if t.met is True]
    unmet = [t for t in by.values() if t.met is False]
    lines += ["", f"targets: {len(met)} met, {len(unmet)} not met, "
                  f"{len(by) - len(met) - len(unmet)} n/a; failed items: "
                  f"{figures.get('failures', 0)}"]
    lines += _modes_table(figures.get("server_modes") or {})
    lines += _modes_table(figures.get("by_server_processes") or {}, "server.processes",
                          "server processes (the same phases against each count, the client "
                          f"on {figures['settings'].get('client', '-')}; the top table is the "
                          "first):")
    lines += _store_table(figures)
    lines += [f"error: {e}" for e in figures.get("errors", [])]
    return "\n".join(lines)


_MODE_ROWS = (
    ("echo calls/s", "echo_calls_per_s", 0, 1),
    ("unary issue calls/s", "unary_issue_per_s", 0, 1),
    ("  = of echo", "unary_issue_vs_echo", 0, 100),
    ("unary redeem calls/s", "unary_redeem_per_s", 0, 1),
    ("  = of echo", "unary_redeem_vs_echo", 0, 100),
    ("batched redeem tickets/s", "batch_redeem_per_s", 0, 1),
    ("  = of raw device", "batch_vs_raw_device", 0, 100),
    ("streamed redeem tickets/s", "stream_redeem_per_s", 0, 1),
    ("storm seconds", "storm_seconds", 2, 1),
    ("redeem p99 ms (open loop)", "redeem_p99_ms", 2, 1),
)


_STORE_NAMES = {"sqlite": "SQLite, 1 replica", "pg": "PostgreSQL, 1 replica",
                "pg2": "PostgreSQL, 2 replicas"}
_STORE_ROWS = (
    ("storm seconds", "storm_seconds", 2, 1),
    ("storm tickets/s", "storm_per_s", 0, 1),
    ("batched redeem tickets/s", "batch_redeem_per_s", 0, 1),
    ("batched redeem p99 ms per call", "batch_redeem_p99_ms", 2, 1),
    ("unary redeem calls/s (saturated)", "unary_redeem_per_s", 0, 1),
    ("unary redeem p99 ms (open loop)", "redeem_p99_ms", 2, 1),
    ("unary redeem p50 ms (open loop)", "redeem_p50_ms", 2, 1),
    ("  offered calls/s (half its own rate)", "latency_offered_per_s", 0, 1),
    ("unary redeem p99 ms at SQLite's load", "same_load_redeem_p99_ms", 2, 1),
    ("  offered calls/s (half SQLite's rate)", "same_load_offered_per_s", 0, 1),
    ("  failed calls (overload)", "same_load_failed", 0, 1),
    ("echo calls/s", "echo_calls_per_s", 0, 1),
    ("unary issue calls/s", "unary_issue_per_s", 0, 1),
    ("consume tickets/s", "consume_per_s", 0, 1),
    ("consumed store B/ticket", "store_bytes_per_ticket", 1, 1),
)


def _store_table(figures: Mapping[str, Any]) -> list[str]:
    """``--store postgresql``: the figures of one SQLite replica and one and two PostgreSQL
    replicas side by side, the CPU per item of server and database, and the two targets."""
    stores = figures.get("by_store") or {}
    if not stores:
        return []
    names = list(stores)
    rows = [("store", *[_STORE_NAMES.get(n, n) for n in names])]
    for label, key, digits, _ in _STORE_ROWS:
        rows.append((label, *[_n(stores[n].get(key), "", digits) for n in names]))
    for who, field in (("server", "server_cpu_us_per_item"),
                       ("PostgreSQL", "db_cpu_us_per_item")):
        for phase in ("storm", "batch_redeem", "unary_redeem", "consume"):
            rows.append((f"{who} CPU µs/item, {phase}",
                         *[_n((stores[n].get(field) or {}).get(phase)) for n in names]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["", "stores (the same phases against each, the client on "
               f"{figures['settings'].get('client', '-')}; the top table is SQLite's):"]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for target in store_targets(figures, stores):
        value = _n(target.value, "x", 2)
        out.append(f"target: {target.wants}: {value} -> {target.status}"
                   + (f" ({target.note})" if target.note else ""))
    return out


def _modes_table(modes: Mapping[str, Mapping[str, Any]], heading: str = "server mode",
                 title: str = "server modes (the same phases against each; the top table is "
                              "the first):") -> list[str]:
    """``--server-mode both`` (or ``--server-processes 1,2``): the same figures side by
    side, one column per server mode (process count)."""
    if len(modes) < 2:
        return []
    names = list(modes)
    rows = [(heading, *names)]
    for label, key, digits, scale in _MODE_ROWS:
        cells = []
        for name in names:
            value = modes[name].get(key)
            value = value * scale if isinstance(value, int | float) else value
            cells.append(_n(value, "%" if scale == 100 else "", digits))
        rows.append((label, *cells))
    for phase in ("echo", "unary_redeem", "batch_redeem"):
        rows.append((f"server CPU µs/item, {phase}",
                     *[_n(modes[n]["server_cpu_us_per_item"].get(phase)) for n in names]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["", title]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out
