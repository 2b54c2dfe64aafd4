"""monitoring/: the alert rules pass ``promtool check rules`` and fire on synthetic series
(``promtool test rules``), each points to its playbook in docs/operations.md, and every metric
the rules and the dashboard name is exported by a running server (with TLS, so the
certificate gauge exists); the metrics added for them report what happens."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.certs import DevPki, init_dev_pki, issue_certificate, server_san
from authority.client import ClientTls
from authority.cluster import MAINTENANCE
from authority.keys import KeyState
from tests.conftest import Harness, issue, make_config, redeem, wait_until
from tests.test_tls_roles import SERVER_NAME, _load_key, _rotate_server_cert, tls_settings

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTS = MONITORING / "alerts.yml"
RULES_TEST = MONITORING / "rules_test.yml"
DASHBOARD = MONITORING / "dashboard.json"
#: the docs/operations.md sections the alerts point to (their GitHub anchors)
PLAYBOOKS = {"device-lost", "no-sealing-key", "key-rotation-overdue", "consume-failures",
             "lease-flapping", "certificate-expiry"}
#: PromQL words that are not metric names
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` in monitoring/ (Debian's prometheus package: scripts/bootstrap)."""
    program = shutil.which("promtool")
    assert program, "promtool is missing: run scripts/bootstrap (Debian package prometheus)"
    return subprocess.run([program, *args], cwd=MONITORING, capture_output=True, text=True,
                          timeout=60, check=False)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: its identifiers once strings, label
    matchers, ranges, grouping clauses and Grafana variables are removed, less functions
    (followed by '(') and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\{[^}]*\}|\$\w+", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def dashboard_names() -> set[str]:
    """Metric names of the dashboard's panel targets and template variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no targets"
    names = set().union(*(metric_names(e) for e in exprs))
    for variable in board["templating"]["list"]:
        query = variable.get("definition", "")
        names.update(re.findall(r"label_values\((\w+)", query))
    return names


def test_the_metric_name_parser() -> None:
    assert metric_names('sum without (op) (rate(a_total{x=~"b|c"}[5m])) / on (i) '
                        'group_left () b_seconds > bool 3 and c == 0') == {
        "a_total", "b_seconds", "c"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket"
                        "[$__rate_interval]))) - time()") == {"h_bucket"}


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", ALERTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_each_alert_fires_on_synthetic_series() -> None:
    """rules_test.yml fires every alert (and holds some back: before ``for:``, below the
    threshold); promtool fails it if one fires with other labels or annotations."""
    done = promtool("test", "rules", RULES_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr
    fired = {case["alertname"] for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
             for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_each_alert_says_what_to_do_and_where() -> None:
    used = set()
    for rule in alert_rules():
        notes = rule["annotations"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert notes["summary"] and len(notes["description"]) > 80, rule["alert"]
        page, _, anchor = notes["runbook"].partition("#")
        assert page == "docs/operations.md" and anchor in PLAYBOOKS, rule["alert"]
        used.add(anchor)
    assert used == PLAYBOOKS


# -- a real server ----------------------------------------------------------------------------


def scrape(port: int) -> tuple[set[str], Samples]:
    """(every sample name, every sample) of the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families for s in family.samples}
    return {name for name, _ in samples}, samples


@pytest.fixture(name="tls_server")
def tls_server_fixture(tmp_path: Path) -> Iterator[tuple[Harness, DevPki]]:
    """An mTLS server with its metrics on a free port."""
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11", "aio")
    config = make_config(h.state_dir, mode="aio")
    h.start(replace(config, tls=tls_settings(pki),
                    server=replace(config.server, metrics_listen="127.0.0.1:0")))
    yield h, pki
    h.stop()


def gateway(h: Harness, pki: DevPki) -> authority_pb2_grpc.TicketAuthorityStub:
    credentials = ClientTls(pki.ca_cert, pki.gateway_cert, pki.gateway_key).credentials()
    assert h.running is not None
    channel = grpc.secure_channel(h.running.address, credentials,
                                  options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    h._channels.append(channel)
    return authority_pb2_grpc.TicketAuthorityStub(channel)


def metrics_port(h: Harness) -> int:
    assert h.running is not None and h.running.metrics_port
    return h.running.metrics_port


def test_every_metric_the_rules_and_dashboard_name_is_exported(
        tls_server: tuple[Harness, DevPki]) -> None:
    h, pki = tls_server
    stub = gateway(h, pki)
    handle = redeem(stub, issue(stub).ticket).ticket_id
    stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=handle), timeout=10)
    h.authority.heartbeat()     # takes the maintenance lease
    exported, _ = scrape(metrics_port(h))
    rules = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    board = dashboard_names()
    assert len(rules) >= 10 and len(board) >= 20
    assert rules - exported == set()
    assert board - exported == set()


def test_the_certificate_gauge_follows_the_files(tls_server: tuple[Harness, DevPki]) -> None:
    """notAfter of the server's chain and of the client CA as on disk, re-read once the file
    changes (a rotated certificate, served without restart)."""
    h, pki = tls_server
    port = metrics_port(h)

    def not_after(path: Path) -> float:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
        return min(c.not_valid_after_utc.timestamp() for c in certs)

    _, m = scrape(port)
    gauge = "ticket_authority_tls_certificate_not_after_seconds"
    assert m[(gauge, (("file", "server"),))] == not_after(pki.server_cert)
    assert m[(gauge, (("file", "client_ca"),))] == not_after(pki.ca_cert)
    before = not_after(pki.server_cert)
    _rotate_server_cert(pki, SERVER_NAME)     # valid 2 days, not 365
    assert not_after(pki.server_cert) != before
    _, m = scrape(port)
    assert m[(gauge, (("file", "server"),))] == not_after(pki.server_cert)


def test_an_unreadable_certificate_file_is_left_out(tls_server: tuple[Harness, DevPki]) -> None:
    h, pki = tls_server
    pki.server_cert.write_text("not a certificate\n")
    _, m = scrape(metrics_port(h))
    gauge = "ticket_authority_tls_certificate_not_after_seconds"
    assert (gauge, (("file", "server"),)) not in m
    assert (gauge, (("file", "client_ca"),)) in m


def test_a_certificate_expiring_in_10_days_reads_10_days(tls_server: tuple[Harness, DevPki]
                                                          ) -> None:
    """What the expiry alerts compute (not_after - time()) from a real short certificate."""
    h, pki = tls_server
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = _load_key(pki.server_key)
    cert = issue_certificate(SERVER_NAME, key, ca, _load_key(pki.ca_key),
                             server_san(SERVER_NAME), server=True,
                             validity=datetime.timedelta(days=10))
    from authority.certs import cert_pem

    pki.server_cert.write_bytes(cert_pem(cert))
    _, m = scrape(metrics_port(h))
    left = m[("ticket_authority_tls_certificate_not_after_seconds", (("file", "server"),))]
    assert abs(left - time.time() - 10 * 86400) < 60


# -- the metrics added for the rules, on a plaintext server -------------------------------------


@pytest.fixture(name="plain")
def plain_fixture(tmp_path: Path) -> Iterator[tuple[Harness, int]]:
    """A plaintext server on SoftHSM2 with its metrics on a free port, and that port."""
    h = Harness(tmp_path / "state", "pkcs11", "aio")
    h.start(replace(h.config, server=replace(h.config.server, metrics_listen="127.0.0.1:0")))
    yield h, metrics_port(h)
    h.stop()


def test_health_device_up_and_device_errors_follow_a_lost_token(
        plain: tuple[Harness, int]) -> None:
    """The token's directory moved away: device errors counted, device_up and serving 0; put
    back: 1 again (the heartbeat probes the idle device)."""
    h, port = plain
    h.authority.start_maintenance()
    _, m = scrape(port)
    assert m[("ticket_authority_device_up", ())] == 1
    assert m[("ticket_authority_serving", ())] == 1
    assert m[("ticket_authority_device_errors_total", (("op", "seal"),))] == 0
    tokens = h.state_dir / "hsm" / "tokens"
    away = tokens.with_name("tokens.away")
    tokens.rename(away)
    try:
        wait_until(lambda: scrape(port)[1][("ticket_authority_device_up", ())] == 0, timeout=15)
        _, m = scrape(port)
        assert m[("ticket_authority_serving", ())] == 0
        assert sum(v for (name, _), v in m.items()
                   if name == "ticket_authority_device_errors_total") >= 2
    finally:
        away.rename(tokens)
    wait_until(lambda: scrape(port)[1][("ticket_authority_serving", ())] == 1, timeout=15)
    assert scrape(port)[1][("ticket_authority_device_up", ())] == 1


def test_lease_epoch_and_holder(plain: tuple[Harness, int]) -> None:
    """Held after a heartbeat (epoch 1); another replica taking it over after it lapsed:
    epoch 2, no longer held here."""
    h, port = plain
    _, m = scrape(port)
    assert m[("ticket_authority_maintenance_lease_held", ())] == 0
    assert ("ticket_authority_maintenance_lease_epoch", ()) not in m   # nobody took it yet
    assert h.authority.heartbeat()
    _, m = scrape(port)
    assert m[("ticket_authority_maintenance_lease_held", ())] == 1
    assert m[("ticket_authority_maintenance_lease_epoch", ())] == 1
    store = h.authority.store
    store.release_lease(MAINTENANCE, h.authority.replica.replica_id)
    assert store.acquire_lease(MAINTENANCE, "other", h.authority.clock.now(), 60) == 2
    assert not h.authority.heartbeat()
    _, m = scrape(port)
    assert m[("ticket_authority_maintenance_lease_held", ())] == 0
    assert m[("ticket_authority_maintenance_lease_epoch", ())] == 2


def test_sealing_key_present_and_rotation_period(plain: tuple[Harness, int]) -> None:
    """1 with an ACTIVE key; 0 once the ring has none (its key ended sealing in the store, no
    successor yet); the rotation period is the config's."""
    h, port = plain
    _, m = scrape(port)
    assert m[("ticket_authority_sealing_key_present", ())] == 1
    assert m[("ticket_authority_key_rotation_period_seconds", ())] == \
        h.config.keys.rotation_period
    store = h.authority.store
    version, records = store.load_ring()
    now = h.authority.clock.now()
    ended = [replace(r, state=KeyState.DECRYPT_ONLY, sealing_ended_at=now, opens_until=now + 60)
             for r in records if r.state == KeyState.ACTIVE]
    assert len(ended) == 1
    assert store.commit_ring(version, ended) == version + 1
    h.authority.ring.sync()
    _, m = scrape(port)
    assert m[("ticket_authority_sealing_key_present", ())] == 0


def test_consumes_and_what_a_store_failure_shows(plain: tuple[Harness, int]) -> None:
    """Consumes by result; with the store gone: the consume is a failed ConsumeTicket call
    (what the ConsumeFailures alert counts), store_up 0, the lease epoch left out, the
    heartbeat's failures counted."""
    h, port = plain
    stub = h.tickets
    handle = redeem(stub, issue(stub).ticket).ticket_id
    for _ in range(2):
        stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=handle), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=b"\x00" * 40),
                           timeout=10)
    h.authority.heartbeat()
    _, m = scrape(port)
    for result, count in (("ok", 1), ("replayed", 1), ("refused", 1)):
        assert m[("ticket_authority_consumes_total", (("result", result),))] == count
    assert m[("ticket_authority_maintenance_errors_total", (("task", "heartbeat"),))] == 0
    fresh = redeem(stub, issue(stub, 1).ticket).ticket_id
    h.authority.store.close()
    with pytest.raises(grpc.RpcError) as failed:
        stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=fresh), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    h.authority.start_maintenance()
    wait_until(lambda: scrape(port)[1][("ticket_authority_maintenance_errors_total",
                                        (("task", "heartbeat"),))] > 0, timeout=15)
    _, m = scrape(port)
    assert m[("ticket_authority_rpc_seconds_count",
              (("code", "UNAVAILABLE"), ("method", "ConsumeTicket")))] == 1
    assert m[("ticket_authority_store_up", ())] == 0
    assert ("ticket_authority_maintenance_lease_epoch", ()) not in m
