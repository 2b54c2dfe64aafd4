"""Both server modes (``server.mode``: grpc.aio and the thread pool; ``auto`` picks aio for
PKCS#11 and threads for the TPM) and the aio server's ``device_calls`` options behave the same
on a real channel: request decoding, error mapping, unexpected errors, offloaded calls,
metrics, graceful stop."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.app import inline_device_calls, server_mode
from authority.config import Config
from authority.errors import ConfigError
from authority.settings_loader import load_config
from tests.conftest import Harness, issue, load_toml, make_config, redeem, sample_state

MODES = ["aio", "threads"]
OK = authority_pb2.REDEEM_RESULT_OK


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "state", "pkcs11", request.param)
    h.start()
    yield h
    h.stop()


def _code(call: object, *args: object) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, timeout=10)  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code(), str(err.details())
    return grpc.StatusCode.OK, ""


def test_an_undecodable_body_is_invalid_argument(server: Harness) -> None:
    call = server.channel().unary_unary("/ticketauthority.v1.TicketAuthority/RedeemTicket")
    code, details = _code(call, b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(r"request: not a valid message \(request id [0-9a-f]{16}\)", details)


def test_an_undecodable_stream_message_is_invalid_argument(server: Harness) -> None:
    call = server.channel().stream_stream("/ticketauthority.v1.TicketAuthority/"
                                          "RedeemTicketStream")
    code, details = _code(lambda timeout: list(call(iter([b"\xff\xff\xff"]), timeout=timeout)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(r"request: not a valid message \(request id [0-9a-f]{16}\)", details)


def test_an_unexpected_error_is_unknown_with_an_incident_and_logged(
        server: Harness, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: object, **_kw: object) -> None:
        raise RuntimeError("secret internals")

    stub = server.tickets
    ticket = issue(stub).ticket
    monkeypatch.setattr(server.authority.sealer, "redeem", broken)
    code, details = _code(stub.RedeemTicket, authority_pb2.RedeemTicketRequest(ticket=ticket))
    assert code == grpc.StatusCode.UNKNOWN
    assert details.startswith("unexpected server error (incident ")
    assert "secret" not in details
    incident = details.split("incident ")[1][:12]
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert redeem(stub, ticket).result == OK   # the server keeps serving


def test_errors_reach_the_rpc_latency_metric_with_their_code(server: Harness) -> None:
    stub = server.tickets
    _code(stub.IssueTicket, authority_pb2.IssueTicketRequest(state=sample_state(sk_d=b"x")))
    issue(stub)
    samples = {(s.labels.get("method"), s.labels.get("code")): s.value
               for metric in server.authority.metrics.registry.collect()
               for s in metric.samples if s.name.endswith("rpc_seconds_count")}
    assert samples[("IssueTicket", "INVALID_ARGUMENT")] == 1
    assert samples[("IssueTicket", "OK")] == 1


@pytest.mark.parametrize(("backend", "device_calls"), [
    ("pkcs11", "inline"), ("pkcs11", "offload"), ("tpm", "offload")])
def test_device_calls_inline_or_offloaded_serve_the_same(tmp_path: Path, backend: str,
                                                         device_calls: str) -> None:
    h = Harness(tmp_path / "state", backend, "aio")
    config = make_config(h.state_dir, backend, "aio")
    h.start(replace(config, server=replace(config.server, device_calls=device_calls)))
    try:
        stub = h.tickets
        tickets = [issue(stub, n).ticket for n in range(3)]
        batch = stub.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
            authority_pb2.RedeemTicketRequest(ticket=t) for t in tickets]), timeout=10)
        assert [i.redeemed.result for i in batch.items] == [OK] * 3
        streamed = list(stub.RedeemTicketStream(iter([authority_pb2.RedeemTicketsRequest(
            items=[authority_pb2.RedeemTicketRequest(ticket=tickets[0])], batch_id=7)]),
            timeout=10))
        assert [(r.batch_id, r.items[0].redeemed.result) for r in streamed] == [(7, OK)]
        status = h.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)  # offloaded
        assert status.backend == backend
    finally:
        h.stop()


@pytest.mark.parametrize(("backend", "mode", "device_calls", "resolved", "inline"), [
    ("pkcs11", "auto", "auto", "aio", True), ("tpm", "auto", "auto", "threads", False),
    ("tpm", "aio", "auto", "aio", False), ("tpm", "aio", "inline", "aio", True),
    ("pkcs11", "aio", "offload", "aio", False), ("pkcs11", "threads", "inline", "threads", False),
])
def test_auto_picks_the_measured_faster_server(tmp_path: Path, backend: str, mode: str,
                                               device_calls: str, resolved: str,
                                               inline: bool) -> None:
    config = Config(state_dir=tmp_path, backend=backend)
    config = replace(config, server=replace(config.server, mode=mode,
                                            device_calls=device_calls))
    assert server_mode(config) == resolved
    assert inline_device_calls(config) is inline


@pytest.mark.parametrize(("text", "setting"), [
    ('mode = "fast"', "server.mode"),
    ('device_calls = "sometimes"', "server.device_calls"),
])
def test_server_mode_settings_are_validated(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting}:"):
        load_toml(tmp_path, f"[server]\n{text}\n")
    server = load_toml(tmp_path, '[server]\nmode = "threads"\ndevice_calls = "offload"\n').server
    assert (server.mode, server.device_calls) == ("threads", "offload")


def test_the_default_mode_is_auto(tmp_path: Path) -> None:
    assert load_config(state_dir=tmp_path).server.mode == "auto"


def test_stop_drains_and_releases_the_port(server: Harness) -> None:
    assert server.running is not None
    address = server.running.address
    assert redeem(server.tickets, issue(server.tickets).ticket).result == OK
    server.stop()
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
