"""One caller never takes more than its share of the server (issue 12, point 1).

A client with a certificate from the client CA -- one whose URI maps to no role, and a
gateway -- opens many calls that hold the server without doing anything: ``IssueTicket``
calls that send headers and never a body, ``IssueTicketStream``s that never send a message,
``Health/Watch``es. Meanwhile a well-behaved gateway (its own certificate) must keep getting
answers within its deadline, on both server modes, over real mTLS.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.certs import init_dev_pki
from authority.errors import ConfigError
from authority.service.admission import calls_per_client, transport_options
from tests.conftest import Harness, load_toml, make_config, sample_state
from tests.test_tls_roles import SERVER_NAME, Tls, tls_settings

ISSUE = "/ticketauthority.v1.TicketAuthority/IssueTicket"
ISSUE_STREAM = "/ticketauthority.v1.TicketAuthority/IssueTicketStream"
WATCH = "/grpc.health.v1.Health/Watch"
MAX_RPCS = 64          # server.max_concurrent_rpcs of the aio server here (default 1024)
#: calls the attacker opens per trick: more than the aio server's max_concurrent_rpcs, more
#: than the thread-pool server's 16 workers
CALLS = {"aio": MAX_RPCS + 6, "threads": 20}
ANSWER_WITHIN = 5.0    # the well-behaved gateway's deadline per call
SETTLE = 0.5           # seconds for the attacker's calls to reach the server
OK = authority_pb2.REDEEM_RESULT_OK


def start(tmp_path: Path, mode: str, **server: Any) -> Tls:
    """An mTLS server on ``mode`` with these ``[server]`` settings (stop its harness)."""
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11", mode)
    config = make_config(h.state_dir, mode=mode)
    config = replace(config, tls=tls_settings(pki), server=replace(config.server, **server))
    running = h.start(config)
    return Tls(h, pki, running.address)


@pytest.fixture(params=["aio", "threads"])
def tls(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tls]:
    """An mTLS server with the default limits: aio with max_concurrent_rpcs 64, or threads
    with 16 workers."""
    server = {"max_concurrent_rpcs": MAX_RPCS} if request.param == "aio" else {}
    t = start(tmp_path, request.param, **server)
    yield t
    t.harness.stop()


@pytest.fixture(params=["aio", "threads"])
def quick(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tls]:
    """An mTLS server with short request and stream deadlines and 2 calls per client."""
    t = start(tmp_path, request.param, request_timeout=0.5, stream_idle_timeout=0.5,
              max_calls_per_client=2)
    yield t
    t.harness.stop()


@dataclass
class Attacker:
    """Calls that hold the server and never finish until ``stop``."""

    channel: grpc.Channel
    n: int                                  # calls per trick
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[Any] = field(default_factory=list)

    def _stalled(self) -> Iterator[bytes]:
        """A request iterator that sends nothing until released."""
        self.release.wait(60)
        yield from ()

    def bodiless_issues(self) -> None:
        """``IssueTicket`` calls that send their headers and never a request body."""
        call = self.channel.stream_unary(ISSUE)
        self.calls += [call.future(self._stalled()) for _ in range(self.n)]

    def idle_streams(self) -> None:
        """``IssueTicketStream``s that never send a message."""
        call = self.channel.stream_stream(ISSUE_STREAM)
        self.calls += [call(self._stalled()) for _ in range(self.n)]

    def watches(self) -> None:
        """``Health/Watch``es, which stay open for as long as the client wants."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.calls += [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(self.n)]

    def everything(self) -> None:
        self.bodiless_issues()
        self.idle_streams()
        self.watches()

    def stop(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def attacker_channel(tls: Tls, tmp_path: Path, role: str) -> grpc.Channel:
    """A channel with a certificate from the client CA: a URI with no role, or a gateway's
    (another than the well-behaved gateway's). The connection is up when it returns."""
    uri = {"none": "spiffe://example.org/printer/p1",
           "gateway": "spiffe://example.org/gateway/mallory"}[role]
    cert, key = tls.client_cert(tmp_path, f"mallory-{role}", [x509.UniformResourceIdentifier(uri)])
    channel = tls.channel(cert, key)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return channel


def served(tls: Tls, channel: grpc.Channel | None = None) -> None:
    """The well-behaved gateway issues and redeems (on ``channel``, else a new one), each call
    within ``ANSWER_WITHIN``."""
    stub = authority_pb2_grpc.TicketAuthorityStub(channel or tls.gateway())
    for n in range(3):
        reply = stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state(n)),
                                 timeout=ANSWER_WITHIN)
        redeemed = stub.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=reply.ticket),
                                     timeout=ANSWER_WITHIN)
        assert redeemed.result == OK


TRICKS: dict[str, Callable[[Attacker], None]] = {
    "bodiless IssueTicket": Attacker.bodiless_issues,
    "idle IssueTicketStream": Attacker.idle_streams,
    "Health/Watch": Attacker.watches,
    "all at once": Attacker.everything,
}


@pytest.mark.parametrize("role", ["none", "gateway"])
def test_a_client_holding_calls_open_never_starves_a_gateway(tls: Tls, tmp_path: Path,
                                                             role: str) -> None:
    channel = attacker_channel(tls, tmp_path, role)
    starved: dict[str, str] = {}
    for trick, open_calls in TRICKS.items():
        attacker = Attacker(channel, CALLS[tls.harness.mode])
        open_calls(attacker)
        try:
            time.sleep(SETTLE)
            served(tls)
        except grpc.RpcError as err:
            starved[trick] = f"{err.code().name}: {err.details()}"
        finally:
            attacker.stop()
    assert starved == {}, f"the gateway got errors while a client with role {role} held calls"


# -- each bound on its own ---------------------------------------------------------------------

#: how a call the server ended for want of a request looks: the aio server sends
#: DEADLINE_EXCEEDED; the thread-pool server can only cancel it (authority/service/admission.py)
ENDED = {"aio": grpc.StatusCode.DEADLINE_EXCEEDED, "threads": grpc.StatusCode.CANCELLED}


def bodiless(tls: Tls, tmp_path: Path, role: str, n: int) -> Attacker:
    """An attacker with ``role`` (``attacker_channel``) that opened ``n`` bodiless
    ``IssueTicket`` calls (stop it)."""
    attacker = Attacker(attacker_channel(tls, tmp_path, role), n)
    attacker.bodiless_issues()
    return attacker


def code_of(future: Any, within: float = 10.0) -> tuple[grpc.StatusCode, str]:
    """The status a call future ends with (fails the test if it does not end ``within``)."""
    try:
        future.result(timeout=within)
    except grpc.FutureTimeoutError:
        pytest.fail(f"the call did not end within {within} s")
    except grpc.RpcError as err:
        return err.code(), bare(str(err.details()))
    return grpc.StatusCode.OK, ""


def bare(details: str) -> str:
    """``details`` without the request id the server's errors end with (tests/test_logs.py;
    not a status the gRPC core made, such as CANCELLED)."""
    found = re.fullmatch(r"(.*) \(request id [0-9a-f]{16}\)", details, re.DOTALL)
    return found.group(1) if found else details


def test_a_roleless_client_is_refused_before_its_request_is_read(tls: Tls,
                                                                 tmp_path: Path) -> None:
    attacker = bodiless(tls, tmp_path, "none", 3)
    try:
        for call in attacker.calls:
            code, details = code_of(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert details.endswith("may not call " + ISSUE)
    finally:
        attacker.stop()


def test_a_bodiless_call_is_ended_after_the_request_timeout(quick: Tls,
                                                            tmp_path: Path) -> None:
    attacker = bodiless(quick, tmp_path, "gateway", 2)
    try:
        for call in attacker.calls:
            code, details = code_of(call)
            assert code == ENDED[quick.harness.mode]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                assert details == "request: not received within 0.5 s (server.request_timeout)"
        served(quick)   # and the slots are free again
        attacker.bodiless_issues()
        assert code_of(attacker.calls[-1])[0] == ENDED[quick.harness.mode]
    finally:
        attacker.stop()


def test_an_idle_stream_is_ended_after_the_stream_idle_timeout(quick: Tls) -> None:
    release = threading.Event()

    def one_then_idle() -> Iterator[authority_pb2.IssueTicketsRequest]:
        yield authority_pb2.IssueTicketsRequest(
            items=[authority_pb2.IssueTicketRequest(state=sample_state())], batch_id=1)
        release.wait(30)

    stub = authority_pb2_grpc.TicketAuthorityStub(quick.gateway())
    replies = stub.IssueTicketStream(one_then_idle(), timeout=20)
    try:
        assert next(replies).batch_id == 1
        with pytest.raises(grpc.RpcError) as ended:
            next(replies)
        assert ended.value.code() == ENDED[quick.harness.mode]
        if ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            assert ended.value.details().startswith(
                "request stream: no message within 0.5 s (server.stream_idle_timeout) "
                "(request id "), ended.value.details()
    finally:
        release.set()
        replies.cancel()


def test_streams_and_watches_beyond_the_per_client_cap_are_refused(quick: Tls,
                                                                  tmp_path: Path) -> None:
    channel = attacker_channel(quick, tmp_path, "gateway")
    held = Attacker(channel, 2)
    held.watches()      # each stays open as long as the client wants: it holds a slot
    stub = authority_pb2_grpc.TicketAuthorityStub(channel)
    try:
        for call in held.calls:
            assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        full = ("spiffe://example.org/gateway/mallory already has 2 calls open "
                "(server.max_calls_per_client); retry when one has ended")
        with pytest.raises(grpc.RpcError) as refused:
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()))
        assert (refused.value.code(), bare(refused.value.details())) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, full)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.IssueTicketStream(iter([]), timeout=5))
        assert (refused.value.code(), bare(refused.value.details())) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, full)
        # a unary call that sends its request holds no slot: the client is still served
        stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state()), timeout=5)
        served(quick)      # and so is another gateway
    finally:
        held.stop()
    for attempt in range(100):   # the server frees the slots just after the client cancels
        try:
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                           timeout=5))
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 99
            time.sleep(0.05)


def test_a_client_stalling_its_requests_is_held_to_its_cap(tmp_path: Path) -> None:
    """Unary calls whose request is late take a slot; beyond the cap they are ended."""
    for mode in ("aio", "threads"):
        t = start(tmp_path / mode, mode, request_timeout=1.0, max_calls_per_client=2)
        stalled = bodiless(t, tmp_path / mode, "gateway", 5)
        try:
            ends = [code_of(call) for call in stalled.calls]
            if mode == "aio":
                late = "request late, and spiffe://example.org/gateway/mallory already has 2"
                assert sorted(code.name for code, _ in ends) == [
                    "DEADLINE_EXCEEDED"] * 2 + ["RESOURCE_EXHAUSTED"] * 3
                assert all(details.startswith(late) for code, details in ends
                           if code == grpc.StatusCode.RESOURCE_EXHAUSTED)
            else:
                assert [code for code, _ in ends] == [grpc.StatusCode.CANCELLED] * 5
            stub = authority_pb2_grpc.TicketAuthorityStub(stalled.channel)
            assert stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state()),
                                    timeout=5).ticket   # its late calls ended: served again
        finally:
            stalled.stop()
            t.harness.stop()


def test_a_suspect_client_at_its_cap_is_refused_at_once(tmp_path: Path) -> None:
    """A client whose late calls fill its cap gets no new call waiting for a request."""
    t = start(tmp_path, "aio", request_timeout=30.0, max_calls_per_client=2)
    stalled = bodiless(t, tmp_path, "gateway", 4)
    try:
        deadline = time.monotonic() + 10
        while sum(call.done() for call in stalled.calls) < 2:   # the two past the cap
            assert time.monotonic() < deadline, "the calls past the cap were not ended"
            time.sleep(0.05)
        ended = [code_of(call)[0] for call in stalled.calls if call.done()]
        assert ended == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        stub = authority_pb2_grpc.TicketAuthorityStub(stalled.channel)
        with pytest.raises(grpc.RpcError) as err:   # two late calls held: no more waiting
            stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state()), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(server.max_calls_per_client)" in str(err.value.details())
        served(t)   # another gateway is served
    finally:
        stalled.stop()
        t.harness.stop()


def test_a_call_without_a_request_message_is_invalid_argument(tls: Tls) -> None:
    call = tls.gateway().stream_unary(ISSUE)
    code, details = code_of(call.future(iter(())))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "request: no request message")


def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    t = start(tmp_path, "aio", connection_idle_timeout=0.3)
    try:
        channel = t.gateway()
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=False)
        served(t, channel)
        ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
        deadline = time.monotonic() + 10
        while ready not in states or states[-1] != idle:   # then the server sent GOAWAY
            assert time.monotonic() < deadline, f"the connection stayed open: {states}"
            time.sleep(0.05)
        served(t, channel)   # the client reconnects
    finally:
        t.harness.stop()


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "setting"), [
    ("request_timeout = 0", "server.request_timeout"),
    ("stream_idle_timeout = -1", "server.stream_idle_timeout"),
    ("max_calls_per_client = 0", "server.max_calls_per_client"),
    ('max_calls_per_client = "many"', "server.max_calls_per_client"),
    ('mode = "threads"\nworkers = 8\nmax_calls_per_client = 8', "server.max_calls_per_client"),
    ("max_streams_per_connection = 0", "server.max_streams_per_connection"),
    ("connection_idle_timeout = -1", "server.connection_idle_timeout"),
    ("connection_max_age = -5", "server.connection_max_age"),
    ("connection_age_grace = -1", "server.connection_age_grace"),
])
def test_call_limits_are_validated(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting}:"):
        load_toml(tmp_path, f"[server]\n{text}\n")


def test_call_limit_defaults_and_what_auto_means(tmp_path: Path) -> None:
    server = load_toml(tmp_path, "").server
    assert (server.request_timeout, server.stream_idle_timeout, server.max_calls_per_client,
            server.max_streams_per_connection, server.connection_idle_timeout,
            server.connection_max_age, server.connection_age_grace) == (
        5.0, 60.0, "auto", 1024, 300.0, 3600.0, 30.0)
    config = load_toml(tmp_path, "[server]\nworkers = 10\nmax_concurrent_rpcs = 800\n")
    assert calls_per_client(config, threads=True) == 2     # well below the workers
    assert calls_per_client(config, threads=False) == 100
    config = load_toml(tmp_path, '[server]\nmode = "aio"\nworkers = 4\n'
                                 'max_calls_per_client = 32\n')  # aio: not bound by workers
    assert calls_per_client(config, threads=False) == 32
    options = dict(transport_options(config))
    assert options["grpc.max_concurrent_streams"] == 1024
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 3_600_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    off = load_toml(tmp_path, "[server]\nconnection_idle_timeout = 0\nconnection_max_age = 0\n")
    assert not {"grpc.max_connection_idle_ms", "grpc.max_connection_age_ms"} & set(
        dict(transport_options(off)))
