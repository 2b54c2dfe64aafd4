"""monitoring/: the alert rules pass ``promtool check rules`` and fire on synthetic series
(``promtool test rules``), each points to its playbook in docs/operations.md, and every metric
the rules and the dashboard name is exported by a running server (with TLS, so the
certificate gauge exists); the metrics added for them report what happens: every consume,
whichever RPC carried it, is counted where it happens, and the consume alert, evaluated by
promtool on a real server's counters, fires for a halted PostgreSQL under redeems with
consume=true alone."""

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
from authority.config import ClusterSettings, PostgresSettings, Secret, StoreSettings
from authority.keys import KeyState
from tests.conftest import Harness, issue, make_config, redeem, sample_state, wait_until
from tests.postgres_fixtures import PostgresServer, private_server
from tests.test_tls_roles import SERVER_NAME, _load_key, _rotate_server_cert, tls_settings

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTS = MONITORING / "alerts.yml"
RULES_TEST = MONITORING / "rules_test.yml"
DASHBOARD = MONITORING / "dashboard.json"
#: the docs/operations.md sections the alerts point to (their GitHub anchors)
PLAYBOOKS = {"device-lost", "no-sealing-key", "key-rotation-overdue", "key-missing",
             "consume-failures", "lease-flapping", "certificate-expiry"}
#: PromQL words that are not metric names
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}

Sample = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Sample, float]


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
    """Consumes by result; with the store gone: the consume is a failed attempt (what the
    ConsumeFailures alert counts) and a failed ConsumeTicket call, store_up 0, the lease epoch
    left out, the heartbeat's failures counted."""
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
    assert m[("ticket_authority_consume_attempts_total", (("via", "consume"),))] == 3
    assert m[FAILED["consume", "unavailable"]] == 1
    assert m[("ticket_authority_store_up", ())] == 0
    assert ("ticket_authority_maintenance_lease_epoch", ()) not in m


# -- every consume, whichever RPC carried it (TicketAuthorityConsumeFailures) -------------------

#: the sample of each (via, cause) of ticket_authority_consume_failures_total
FAILED: dict[tuple[str, str], Sample] = {
    (via, cause): ("ticket_authority_consume_failures_total", (("cause", cause), ("via", via)))
    for via in ("consume", "redeem") for cause in ("unavailable", "error")}
ATTEMPTS: dict[str, Sample] = {
    via: ("ticket_authority_consume_attempts_total", (("via", via),))
    for via in ("consume", "redeem")}


#: no consume counter moved
NONE = {**{f"attempts.{via}": 0.0 for via in ATTEMPTS},
        **{f"failures.{via}.{cause}": 0.0 for via, cause in FAILED}}
OK, INVALID, EXPIRED = (authority_pb2.REDEEM_RESULT_OK, authority_pb2.REDEEM_RESULT_INVALID,
                        authority_pb2.REDEEM_RESULT_EXPIRED)


def moved(before: Samples, after: Samples) -> dict[str, float]:
    """How far each consume counter moved: "attempts.VIA" and "failures.VIA.CAUSE"."""
    keys = {f"attempts.{via}": key for via, key in ATTEMPTS.items()}
    keys.update({f"failures.{via}.{cause}": key for (via, cause), key in FAILED.items()})
    return {name: after[key] - before[key] for name, key in keys.items()}


def assert_consume_alert(before: Samples, after: Samples, directory: Path,
                         fires_at: str | None) -> None:
    """TicketAuthorityConsumeFailures, as alerts.yml has it, on a replica whose counters move
    every minute as this server's moved from ``before`` to ``after`` (the series of every
    metric its expression names, for 20 minutes): at 15 minutes it fires with the summary's
    percentage ``fires_at``, or (None) it is silent. promtool evaluates it."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "TicketAuthorityConsumeFailures"]
    names = metric_names(rule["expr"])
    series = []
    for (name, labels), value in after.items():
        if name in names:
            start = before.get((name, labels), 0.0)
            text = ", ".join(f'{k}="{v}"'
                             for k, v in (*labels, ("job", "ta"), ("instance", "r")))
            series.append({"series": f"{name}{{{text}}}",
                           "values": f"{start:g}+{value - start:g}x20"})
    assert series, f"the server exports none of {names}"
    expected = []
    if fires_at is not None:
        notes = {k: v.replace("{{ $labels.instance }}", "r")
                 .replace("{{ $value | humanizePercentage }}", fires_at)
                 for k, v in rule["annotations"].items()}
        assert not any("{{" in v for v in notes.values()), notes
        expected = [{"exp_labels": {**rule["labels"], "job": "ta", "instance": "r"},
                     "exp_annotations": notes}]
    test = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
                {"eval_time": "15m", "alertname": rule["alert"], "exp_alerts": expected}]}]}
    path = directory / "consume_alert_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def batch(tickets: list[bytes], consume: bool = True) -> authority_pb2.RedeemTicketsRequest:
    return authority_pb2.RedeemTicketsRequest(items=[
        authority_pb2.RedeemTicketRequest(ticket=t, consume=consume) for t in tickets])


def consumes(handles: list[bytes]) -> authority_pb2.ConsumeTicketsRequest:
    return authority_pb2.ConsumeTicketsRequest(items=[
        authority_pb2.ConsumeTicketRequest(ticket_id=h) for h in handles])


def calls_to(prefix: str, samples: Samples) -> Samples:
    """The call counts (by method and code) of the methods whose names start with
    ``prefix``."""
    return {key: value for key, value in samples.items()
            if key[0] == "ticket_authority_rpc_seconds_count"
            and dict(key[1])["method"].startswith(prefix)}


def unavailable(call: Any) -> None:
    """``call()`` fails UNAVAILABLE."""
    with pytest.raises(grpc.RpcError) as failed:
        call()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value


@pytest.fixture(name="on_postgres", params=["threads", "aio"])
def on_postgres_fixture(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> Iterator[tuple[Harness, PostgresServer, int]]:
    """A server on SoftHSM2 and a PostgreSQL server of the test's own (it is halted), its
    metrics on a free port, its maintenance running (the change feed marks the store down
    once the database is gone: calls then fail at once); store.max_staleness 2 s."""
    for postgres in private_server():
        h = Harness(tmp_path / "state", "pkcs11", request.param)
        dsn = postgres.dsn(postgres.create_database())
        h.start(replace(h.config, server=replace(h.config.server, metrics_listen="127.0.0.1:0"),
                        cluster=ClusterSettings(heartbeat_interval=0.25, replica_timeout=1.0,
                                                lease_duration=1.0),
                        store=StoreSettings(max_staleness=2.0),
                        postgresql=PostgresSettings(dsn=Secret(dsn), pool_size=4,
                                                    connect_timeout=1.0)))
        h.authority.start_maintenance()
        try:
            yield h, postgres, metrics_port(h)
        finally:
            h.stop()


def test_every_consume_counts_whichever_rpc_carried_it(
        on_postgres: tuple[Harness, PostgresServer, int], tmp_path: Path) -> None:
    """Bad tickets and handles are no attempt (the alert stays silent); then, the database
    halted, redeems with consume=true alone (unary, a batch of 100, a stream, a batch with bad
    tickets beside 2 good ones; within store.max_staleness and past it) are failed attempts,
    one per item, and fire the alert (the rule on ConsumeTicket(s) calls never saw them);
    then ConsumeTicket(s) failures fire it too."""
    h, postgres, port = on_postgres
    stub = h.tickets
    tickets = [item.ticket.ticket for item in stub.IssueTickets(
        authority_pb2.IssueTicketsRequest(items=[
            authority_pb2.IssueTicketRequest(state=sample_state(n)) for n in range(170)])).items]
    handles = [item.redeemed.ticket_id
               for item in stub.RedeemTickets(batch(tickets[110:], consume=False)).items]
    other_realm = stub.IssueTicket(authority_pb2.IssueTicketRequest(
        state=sample_state(900), realm="east")).ticket
    short = issue(stub, 901, lifetime=60).ticket
    tampered = tickets[0][:-1] + bytes([tickets[0][-1] ^ 1])
    bad = [b"\x01" * 80, tampered, other_realm, short, b""]
    h.clock.advance(61)                   # ``short`` has expired

    start = scrape(port)[1]
    assert redeem(stub, tickets[1], consume=True).result == OK
    answers = stub.RedeemTickets(batch([*bad, tickets[2]])).items
    assert [a.redeemed.result if a.HasField("redeemed") else a.error.code for a in answers] \
        == [INVALID, INVALID, INVALID, EXPIRED, grpc.StatusCode.INVALID_ARGUMENT.value[0], OK]
    assert stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=handles[0])
                              ).result == OK
    answers = stub.ConsumeTickets(consumes([b"\x00" * 40, b"short", handles[1]])).items
    assert [a.WhichOneof("outcome") for a in answers] == ["error", "error", "consumed"]
    with pytest.raises(grpc.RpcError):
        stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=b"\x00" * 40))
    up = scrape(port)[1]
    assert moved(start, up) == {**NONE, "attempts.consume": 2, "attempts.redeem": 2}
    assert_consume_alert(start, up, tmp_path, None)

    postgres.halt()
    wait_until(lambda: h.authority.store.down_since is not None, timeout=15)
    halted = scrape(port)[1]
    assert h.authority.policy.fresh(), "the store was marked down after max_staleness"
    unavailable(lambda: redeem(stub, tickets[3], consume=True))
    unavailable(lambda: stub.RedeemTickets(batch(tickets[4:104])))
    unavailable(lambda: list(stub.RedeemTicketStream(iter([batch(tickets[104:107])]))))
    wait_until(lambda: not h.authority.policy.fresh(), timeout=15)
    unavailable(lambda: stub.RedeemTickets(batch([*bad, tickets[107], tickets[108]])))
    redeemed = scrape(port)[1]
    assert moved(halted, redeemed) == {**NONE, "attempts.redeem": 106,
                                       "failures.redeem.unavailable": 106}
    assert calls_to("Consume", redeemed) == calls_to("Consume", halted)
    assert_consume_alert(halted, redeemed, tmp_path, "100%")

    unavailable(lambda: stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(
        ticket_id=handles[2])))
    unavailable(lambda: stub.ConsumeTickets(consumes([*handles[3:53], b"\x00" * 40])))
    consumed = scrape(port)[1]
    assert moved(redeemed, consumed) == {**NONE, "attempts.consume": 51,
                                         "failures.consume.unavailable": 51}
    assert_consume_alert(redeemed, consumed, tmp_path, "100%")


def test_an_unexpected_error_in_a_consume_is_a_failure(
        plain: tuple[Harness, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect in the store's consume (any exception but DeviceUnavailable: answered
    UNKNOWN) is a failure of cause "error", by either RPC."""
    h, port = plain
    stub = h.tickets
    ticket, other = issue(stub).ticket, issue(stub, 1).ticket
    handle = redeem(stub, other).ticket_id
    before = scrape(port)[1]

    def defect(entries: object, now: float) -> list[bool]:
        raise RuntimeError("a defect")

    monkeypatch.setattr(h.authority.store, "consume_many", defect)
    with pytest.raises(grpc.RpcError) as failed:
        redeem(stub, ticket, consume=True)
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.RpcError) as failed:
        stub.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=handle))
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert moved(before, scrape(port)[1]) == {
        **NONE, "attempts.consume": 1, "attempts.redeem": 1, "failures.consume.error": 1,
        "failures.redeem.error": 1}
