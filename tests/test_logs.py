"""Structured logs and request ids (authority/logs.py, authority/service/interceptors.py):
over real gRPC on both servers, every call's request id is in its trailing metadata, at the
end of its error details and in the log lines written for it; a caller's well-formed
``x-request-id`` is kept, a malformed one replaced; JSON lines parse and carry the stable
keys; a real ``serve`` with ``log_format = "json"`` writes nothing but JSON lines and never a
PIN or a DSN's password."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.config import Secret
from authority.errors import ConfigError
from authority.logs import REQUEST_ID, JsonFormatter, RequestContext, rfc3339, setup
from tests.conftest import Harness, load_toml

ROOT = Path(__file__).resolve().parent.parent
STABLE = {"time", "level", "logger", "message", "pid", "replica_id"}
GENERATED = re.compile(r"[0-9a-f]{16}")


@pytest.fixture(params=["aio", "threads"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A real server on a fresh SoftHSM2 token, on each server mode."""
    harness = Harness(tmp_path / "state", "pkcs11", request.param)
    harness.start()
    yield harness
    harness.stop()


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The server's log lines (the ``authority`` loggers, INFO and up) as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContext())
    logger = logging.getLogger("authority")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def _events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _request_id(call: grpc.Call | grpc.RpcError) -> str:
    ids = [value for key, value in call.trailing_metadata() or () if key == "x-request-id"]
    assert len(ids) == 1, call.trailing_metadata()
    return str(ids[0])


def _refused(harness: Harness, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    """The error of an issue of a state with no keys (INVALID_ARGUMENT)."""
    with pytest.raises(grpc.RpcError) as refused:
        harness.tickets.IssueTicket(authority_pb2.IssueTicketRequest(), metadata=metadata,
                                    timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    return refused.value


def test_an_error_carries_its_request_id_in_details_and_trailing_metadata(
        served: Harness) -> None:
    err = _refused(served)
    request = _request_id(err)
    assert GENERATED.fullmatch(request), request
    assert err.details().endswith(f" (request id {request})"), err.details()
    assert _request_id(_refused(served)) != request   # one per call


def test_a_calls_log_lines_carry_its_request_id(served: Harness,
                                                captured: io.StringIO) -> None:
    reply, call = served.admin.RotateKey.with_call(admin_pb2.RotateKeyRequest(), timeout=30)
    request = _request_id(call)
    new_key = reply.new_key.key_id
    lines = [e for e in _events(captured) if f"key {new_key}" in str(e["message"])
             and "created" in str(e["message"])]
    assert lines, captured.getvalue()
    for event in lines:
        assert event["request_id"] == request
        assert event["replica_id"] == served.authority.replica.replica_id
        assert set(event) >= STABLE
    # a line written outside a call has no request id
    logging.getLogger("authority.test").warning("outside any call")
    outside = [e for e in _events(captured) if e["message"] == "outside any call"]
    assert outside and "request_id" not in outside[0]


def test_a_well_formed_request_id_is_kept_and_a_malformed_one_replaced(
        served: Harness) -> None:
    given = "gw-a.7f3e:0042_X"
    err = _refused(served, (("x-request-id", given),))
    assert _request_id(err) == given
    assert err.details().endswith(f"(request id {given})")
    _reply, call = served.tickets.IssueTicket.with_call(
        authority_pb2.IssueTicketRequest(state=_state()),
        metadata=(("x-request-id", given),), timeout=10)
    assert _request_id(call) == given   # a call that succeeds has one too
    for bad in ("", "has spaces", "x" * 65, "semi;colon", "<b>", "a/b"):
        err = _refused(served, (("x-request-id", bad),))
        replaced = _request_id(err)
        assert GENERATED.fullmatch(replaced), (bad, replaced)
        assert not bad or bad not in err.details()


def _state() -> authority_pb2.ResumptionState:
    from tests.conftest import sample_state

    return sample_state()


def test_json_lines_have_the_stable_keys_and_keep_extra_fields() -> None:
    stream = io.StringIO()
    handler = setup("DEBUG", "json", stream=stream)
    log = logging.getLogger("authority.test.json")
    token = REQUEST_ID.set("req-1")
    try:
        log.info("two\nlines", extra={"key_id": "ab12", "pin": "1234", "dsn_text": "pw=x",
                                      "owner_auth": Secret("hunter2")})
    finally:
        REQUEST_ID.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines   # one event per line, a newline in a message escaped
    first, second = (json.loads(line) for line in lines)
    assert set(first) >= STABLE and set(second) >= STABLE
    assert first["message"] == "two\nlines" and first["level"] == "INFO"
    assert first["logger"] == "authority.test.json" and first["request_id"] == "req-1"
    assert first["key_id"] == "ab12"   # an extra field kept
    assert first["pin"] == first["dsn_text"] == first["owner_auth"] == "********"
    assert "1234" not in lines[0] and "hunter2" not in lines[0] and "pw=x" not in lines[0]
    assert "request_id" not in second and "ValueError: boom" in str(second["exc"])
    moment = datetime.fromisoformat(str(first["time"]).replace("Z", "+00:00"))
    assert moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000Z"


def test_text_lines_name_the_request_id_during_a_call() -> None:
    stream = io.StringIO()
    handler = setup("INFO", "text", stream=stream)
    log = logging.getLogger("authority.test.text")
    token = REQUEST_ID.set("req-2")
    try:
        log.info("inside")
    finally:
        REQUEST_ID.reset(token)
    log.info("outside")
    logging.getLogger().removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(" INFO authority.test.text: inside (request id req-2)")
    assert outside.endswith(" INFO authority.test.text: outside")


def test_log_format_is_text_json_or_refused(tmp_path: Path) -> None:
    assert load_toml(tmp_path, "").log_format == "text"
    assert load_toml(tmp_path, 'log_format = "json"\n').log_format == "json"
    for bad in ('"JSON"', '"xml"', "1"):
        with pytest.raises(ConfigError, match="log_format"):
            load_toml(tmp_path, f"log_format = {bad}\n")


def _serve(tmp_path: Path, toml: str) -> subprocess.Popen[str]:
    config = tmp_path / "authority.toml"
    config.write_text(toml)
    return subprocess.Popen(
        [sys.executable, "-m", "authority.cli", "serve", "--config", str(config),
         "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
         "--metrics-listen", "", "--log-level", "DEBUG"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _json_lines(text: str) -> list[dict[str, object]]:
    events = []
    for line in text.splitlines():
        event = json.loads(line)   # every line is one JSON event
        assert set(event) >= STABLE, line
        events.append(event)
    return events


def test_a_json_serve_writes_only_json_lines_and_no_pin(tmp_path: Path) -> None:
    proc = _serve(tmp_path, 'log_format = "json"\n[server]\ndevice_processes = 1\n')
    assert proc.stdout is not None
    address = None
    for line in proc.stdout:
        found = re.search(r"listening on (\S+)", line)
        if found:
            address = found.group(1)
            break
    assert address, proc.stdout.read()
    with grpc.insecure_channel(address) as channel:
        from authority._proto.ticketauthority.v1 import authority_pb2_grpc

        stub = authority_pb2_grpc.TicketAuthorityStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.IssueTicket(authority_pb2.IssueTicketRequest(), timeout=10)
        assert re.search(r"\(request id [0-9a-f]{16}\)$", refused.value.details())
    proc.terminate()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    events = _json_lines(err)
    assert any(e["message"] == "stopped" for e in events), err
    replicas = {e["replica_id"] for e in events} - {None}
    assert len(replicas) == 1, replicas
    pins = [p.read_text().strip() for p in (tmp_path / "state").rglob("*pin*") if p.is_file()]
    assert pins, sorted(str(p) for p in (tmp_path / "state").rglob("*"))
    for pin in pins:
        assert pin and pin not in err


def test_a_json_serve_that_cannot_reach_postgresql_names_no_password(tmp_path: Path) -> None:
    secret = "s3cret-Passw0rd"
    proc = _serve(tmp_path, 'log_format = "json"\n[postgresql]\n'
                            f'dsn = "postgresql://ta:{secret}@127.0.0.1:1/ta"\n'
                            "connect_timeout = 1\n")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "postgresql" in (out + err).lower(), out + err   # it said why it stopped
    assert secret not in out + err
