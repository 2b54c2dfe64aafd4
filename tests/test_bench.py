"""``ticket-authority bench`` with tiny settings: every required JSON key, sane values, no failed
item. Real SoftHSM2 token and a real server subprocess; no timing assertions (the machine is
shared and noisy)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest

from authority.app import pkcs11_settings
from authority.backends.pkcs11 import Pkcs11Backend
from authority.bench import gateway, main
from authority.bench.device import OneSession
from authority.bench.loops import percentile
from authority.bench.options import add_arguments, options_from
from authority.bench.progress import Progress
from authority.bench.report import render
from authority.bench.results import Results, ceiling
from authority.bench.runner import gateway_phase
from authority.bench.targets import evaluate
from authority.config import Config
from authority.service.server import RunningServer, build_server
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--duration", "0.5", "--storm-tickets", "500", "--concurrency", "4",
        "--batch-size", "50", "--json", "--no-progress"]
RATES = ["echo_calls_per_s", "unary_issue_per_s", "unary_redeem_per_s", "batch_redeem_per_s",
         "stream_redeem_per_s"]
REQUIRED = [*RATES, "raw_device_per_s", "storm_tickets", "storm_seconds", "redeem_p99_ms",
            "peak_rss_mb", "backend", "targets", "machine", "savings"]
#: issue 14's keys: always numbers in a run with the bench's own SoftHSM2 server
CEILING_KEYS = ["raw_device_one_session_per_s", "unary_ceiling_per_s",
                "unary_issue_ratio_ceiling", "unary_redeem_ratio_ceiling"]
GATEWAY_KEYS = ["gateway_cpu_us_at_1", "gateway_cpu_us_at_8", "gateway_cpu_us_at_64",
                "gateway_aio_cpu_us_at_1", "gateway_aio_cpu_us_at_8", "gateway_aio_cpu_us_at_64"]
#: numbers with a coalescing client, null (with a note) without
COALESCED_KEYS = ["gateway_cpu_us_at_8_coalesced", "gateway_cpu_us_at_64_coalesced",
                  "gateway_aio_cpu_us_at_8_coalesced", "gateway_aio_cpu_us_at_64_coalesced"]
CHAIN_KEYS = ["rsa2048_chain_verify_us", "ecdsa_p256_chain_verify_us",
              "handshake_modp_rsa_chain_us", "handshake_ecdh_ecdsa_chain_us",
              "ratio_modp_rsa_chain", "ratio_ecdh_ecdsa_chain"]


@pytest.fixture(scope="module")
def own_server_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run that starts its own server, once per server mode (the slow part, shared by
    the tests below)."""
    state = tmp_path_factory.mktemp("bench") / "state"
    done = subprocess.run([sys.executable, "-m", "authority.bench", *TINY, "--state-dir",
                           str(state), "--server-mode", "both"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(done.stdout)  # stdout is only JSON
    return figures


def test_json_has_every_required_key_with_sane_values(own_server_run: dict[str, Any]) -> None:
    f = own_server_run
    missing = [k for k in REQUIRED if k not in f]
    assert not missing
    assert f["backend"] == "pkcs11"
    for key in [*RATES, "raw_device_per_s"]:
        assert f[key] > 0, key
    assert f["storm_tickets"] == 500
    assert f["storm_seconds"] > 0
    assert f["storm_failures"] == 0
    assert f["failures"] == 0 and not f["errors"]
    assert 0 < f["redeem_p50_ms"] <= f["redeem_p99_ms"] <= f["redeem_p999_ms"]
    assert f["peak_rss_mb"] > 10
    assert f["consumed_entries"] == 500 and f["store_bytes_per_ticket"] > 0
    assert f["machine"]["cores"] >= 1 and f["machine"]["cpu_model"]


def test_targets_and_savings_are_reported(own_server_run: dict[str, Any]) -> None:
    targets = own_server_run["targets"]
    assert set(targets) == {"unary_issue_vs_echo", "unary_redeem_vs_echo",
                            "batch_vs_raw_device", "batch_redeem_rate", "storm_seconds",
                            "redeem_p99_ms", "storm_rss_mb", "store_bytes_per_ticket",
                            "unary_issue_vs_ceiling", "unary_redeem_vs_ceiling",
                            "gateway_cpu_vs_modp_rsa", "gateway_cpu_vs_ecdh_ecdsa"}
    for entry in targets.values():
        assert entry["met"] in (True, False), entry  # everything measurable was measured
    savings = own_server_run["savings"]
    assert savings["handshake_modp_rsa_us"] > savings["handshake_ecdh_ecdsa_us"] > 0
    assert savings["resumption_us"] > savings["derive_resumed_keys_us"] > 0


def test_table_has_a_row_per_figure(own_server_run: dict[str, Any]) -> None:
    table = render(own_server_run)
    for label in ("(a) echo", "(b) unary IssueTicket", "(b) unary RedeemTicket",
                  "(c) batched", "(c) RedeemTicketStream", "(d) raw device", "(e) failover",
                  "server RSS", "consumed-ticket store", "(f) unary redeem", "(g) handshake",
                  "(g) resumption", "(d) raw device, one session", "(b) unary ceiling",
                  "IssueTicket / ceiling", "RedeemTicket / ceiling",
                  "(g) handshake + 2-cert chain: ECDH + ECDSA",
                  "(g) handshake + 2-cert chain: MODP + RSA",
                  "(h) gateway CPU/resumption: TicketClient, threads, 64 at once",
                  "(h) gateway CPU/resumption: AsyncTicketClient, tasks, 8 at once",
                  "worst of 8 and 64"):
        assert label in table
    assert "machine  " in table and "backend  pkcs11" in table


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_issue14_keys_are_numbers_or_documented_nulls(own_server_run: dict[str, Any]) -> None:
    f = own_server_run
    assert all(_number(f[k]) for k in CEILING_KEYS + GATEWAY_KEYS), \
        {k: f.get(k) for k in CEILING_KEYS + GATEWAY_KEYS}
    assert f["unary_ceiling_per_s"] == pytest.approx(
        1 / (1 / f["echo_calls_per_s"] + 1 / f["raw_device_one_session_per_s"]))
    assert f["unary_ceiling_per_s"] < min(f["echo_calls_per_s"],
                                          f["raw_device_one_session_per_s"])
    assert f["unary_redeem_ratio_ceiling"] == pytest.approx(
        f["unary_redeem_per_s"] / f["unary_ceiling_per_s"])
    windows = f["gateway"]["coalesce_window_s"]
    for key in COALESCED_KEYS:   # a number exactly when that client has coalescing
        client = "aio" if "_aio_" in key else "sync"
        assert _number(f[key]) == (windows[client] is not None), (key, windows)
        if f[key] is None:
            assert any(n.startswith(f"{client} client has no coalesce_window")
                       for n in f["gateway"]["notes"])
    assert "gateway_cpu_us_at_1_coalesced" not in f       # nothing to coalesce one at a time
    runs = f["gateway"]["runs"]
    assert all(r["failed"] == 0 and r["resumptions"] >= 10 * r["concurrency"] for r in runs)
    savings = f["savings"]
    assert all(_number(savings[k]) for k in CHAIN_KEYS)
    assert savings["handshake_modp_rsa_chain_us"] > savings["handshake_modp_rsa_us"]
    assert savings["handshake_ecdh_ecdsa_chain_us"] > savings["handshake_ecdh_ecdsa_us"]
    for mode in f["server_modes"].values():
        assert _number(mode["unary_ceiling_per_s"]) and _number(mode["unary_issue_ratio_ceiling"])


def test_ceiling_and_gateway_figures_without_measurements() -> None:
    assert ceiling(None, 100.0, 10.0, 10.0) == {"unary_ceiling_per_s": None,
                                                "unary_issue_ratio_ceiling": None,
                                                "unary_redeem_ratio_ceiling": None}
    bound = ceiling(300.0, 600.0, 100.0, 150.0)
    assert bound["unary_ceiling_per_s"] == pytest.approx(200.0)
    assert bound["unary_redeem_ratio_ceiling"] == pytest.approx(0.75)
    flat = gateway.figures(None, "the server went away")
    assert all(flat[k] is None for k in GATEWAY_KEYS + COALESCED_KEYS)
    assert flat["gateway"]["notes"] == ["not measured: the server went away"]


def test_gateway_targets_judge_coalesced_figures_else_uncoalesced_with_a_note() -> None:
    figures: dict[str, Any] = {
        "backend": "pkcs11", "gateway_cpu_us_at_8": 300.0, "gateway_cpu_us_at_64": 200.0,
        "savings": {"handshake_modp_rsa_chain_us": 1000.0, "handshake_ecdh_ecdsa_chain_us": 250.0}}
    by = {t.name: t for t in evaluate(figures)}
    modp, ec = by["gateway_cpu_vs_modp_rsa"], by["gateway_cpu_vs_ecdh_ecdsa"]
    assert modp.value == pytest.approx(0.3) and modp.met is False   # the worse of 8 and 64
    assert ec.value == pytest.approx(1.2) and ec.met is False
    assert "without coalescing" in modp.note
    figures.update(gateway_cpu_us_at_8_coalesced=90.0, gateway_cpu_us_at_64_coalesced=60.0)
    by = {t.name: t for t in evaluate(figures)}
    modp, ec = by["gateway_cpu_vs_modp_rsa"], by["gateway_cpu_vs_ecdh_ecdsa"]
    assert modp.value == pytest.approx(0.09) and modp.met is True and modp.note == "coalesced"
    assert ec.value == pytest.approx(0.36) and ec.met is True


def test_gateway_phase_is_skipped_for_a_server_off_loopback() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = options_from(parser.parse_args(["--address", "192.0.2.1:50051", "--quick"]))
    results = Results(opts, {})
    gateway_phase("192.0.2.1:50051", opts, results, Progress(False))
    assert results.gateway is None and not results.errors
    assert "loopback" in results.skipped["gateway"]
    flat = gateway.figures(results.gateway, results.skipped["gateway"])
    assert flat["gateway_cpu_us_at_8"] is None and "loopback" in flat["gateway"]["notes"][0]


def _secret_key_labels(config: Config) -> list[str]:
    settings = pkcs11_settings(config)
    backend = Pkcs11Backend.open(settings)
    try:
        token = pkcs11.lib(os.path.realpath(settings.module)).get_token(
            token_label=settings.token_label)
        with token.open() as session:
            return [str(key[pkcs11.Attribute.LABEL]) for key in session.get_objects(
                {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})]
    finally:
        backend.close()


def test_one_session_loop_decrypts_on_a_token_key_it_removes(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state")
    device = OneSession(config)
    try:
        labels = _secret_key_labels(config)
        assert len(labels) == 1 and labels[0].startswith("bench-one-session-")  # not "ita-"
        tally = device.run(0.05)
    finally:
        device.close()
    assert tally.ok >= 50 and tally.failed == 0 and tally.seconds >= 0.05
    assert tally.client_cpu > 0
    assert _secret_key_labels(config) == []   # nothing left on the token


def test_coalesce_window_is_read_from_the_constructor() -> None:
    class Plain:
        def __init__(self, address: str) -> None: ...

    class Coalescing:
        def __init__(self, address: str, *, coalesce_window: float = 0.0003) -> None: ...

    assert gateway.coalesce_window(Plain) is None
    assert gateway.coalesce_window(Coalescing) == pytest.approx(0.0003)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningServer]:
    """An in-process server on a fresh SoftHSM2 token (the bench only talks gRPC to it)."""
    server = build_server(make_config(tmp_path / "state"))
    yield server
    server.stop(grace=1.0)


def test_both_server_modes_are_measured_side_by_side(own_server_run: dict[str, Any]) -> None:
    f = own_server_run
    assert f["server_mode"] == "aio" and set(f["server_modes"]) == {"aio", "threads"}
    assert f["server_modes"]["aio"]["unary_redeem_per_s"] == f["unary_redeem_per_s"]
    for mode in f["server_modes"].values():
        assert all(mode[k] > 0 for k in RATES)
        assert mode["unary_redeem_vs_echo"] > 0 and mode["batch_vs_raw_device"] > 0
        assert mode["storm_seconds"] > 0 and mode["server_cpu_us_per_item"]["echo"] > 0
    table = render(f)
    assert "server modes" in table and "threads" in table.split("server modes")[1]


def test_against_a_running_server_skips_the_raw_device(
        running: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*TINY, "--address", running.address, "--storm-tickets", "200",
                 "--state-dir", str(tmp_path / "state")])
    f = json.loads(capsys.readouterr().out)
    assert code == 0
    assert f["raw_device_per_s"] is None and "raw_device" in f["skipped"]
    assert f["targets"]["batch_vs_raw_device"]["met"] is None
    assert f["storm_tickets"] == 200 and f["storm_failures"] == 0
    assert f["consumed_entries"] == 200 and f["store_bytes_per_ticket"] > 0
    assert f["unary_ceiling_per_s"] is None
    assert f["targets"]["unary_issue_vs_ceiling"]["met"] is None
    assert all(_number(f[k]) for k in GATEWAY_KEYS)   # (h) runs against any server


def test_unreachable_address_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", "127.0.0.1:1", "--no-progress", "--json"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 0.5) == 500
    assert percentile(values, 0.99) == 990
    assert percentile(values, 0.999) == 999
    assert percentile([], 0.5) is None


def test_storm_target_is_projected_from_a_smaller_storm() -> None:
    figures = {"backend": "pkcs11", "storm_tickets": 20_000, "storm_seconds": 1.0}
    storm = next(t for t in evaluate(figures) if t.name == "storm_seconds")
    assert storm.value == pytest.approx(5.0) and storm.met is True
    assert "projected" in storm.note
    figures["backend"] = "tpm"
    assert next(t for t in evaluate(figures) if t.name == "storm_seconds").met is None
