"""The gateway-side client against real servers: the authority of the conftest Harness (real
SoftHSM2 token), the same servicer behind a late-starting or mTLS gRPC server, and a stand-alone
slow server for deadlines. Attempts are counted with real client interceptors."""

from __future__ import annotations

import asyncio
import collections
import datetime
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.client import (
    AsyncTicketClient,
    AuthorityDeadlineExceeded,
    AuthorityRejected,
    AuthorityUnavailable,
    Backoff,
    ClientTls,
    IssuedTicket,
    ItemError,
    PlaintextRefused,
    Redeemed,
    RedeemResult,
    TicketClient,
    is_loopback,
    ticket_nack_payload,
)
from authority.client.transport import RetryLoop
from authority.config import Config
from authority.ikev2.notify import (
    TICKET_NACK,
    TicketLtOpaque,
    TicketSignal,
    decode_notify_payload,
    ticket_from_notify,
)
from authority.metrics import Metrics
from authority.service.admission import Gate, Limits
from authority.service.guard import ThreadGuard
from authority.service.servicers import TicketAuthorityServicer
from tests.conftest import START, Harness, sample_state

FAST = Backoff(base=0.01, cap=0.02)


# -- helpers -------------------------------------------------------------------------------------


class Counting(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the requests the client sends, per method."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls[_method(details.method)] += 1
        return continuation(details, request)


class AsyncCounting(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the requests an AsyncTicketClient sends, per method."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def intercept_unary_unary(self, continuation: Any, details: Any,
                                    request: Any) -> Any:
        self.calls[_method(details.method)] += 1
        return await continuation(details, request)


def _method(name: str | bytes) -> str:
    text = name.decode() if isinstance(name, bytes) else name
    return text.rsplit("/", 1)[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grpc_server(servicer: Any, port: int = 0,
                credentials: Any = None) -> tuple[grpc.Server, int]:
    """A started server for ``servicer`` on 127.0.0.1 (plaintext unless ``credentials``)."""
    guard = ThreadGuard(Gate(Metrics(), Limits.of(Config(state_dir=Path(".")), threads=True)))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[guard], options=[("grpc.so_reuseport", 0)])
    authority_pb2_grpc.add_TicketAuthorityServicer_to_server(servicer, server)
    address = f"127.0.0.1:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials is not None
             else server.add_insecure_port(address))
    assert bound
    server.start()
    return server, bound


class LateServer:
    """The real authority's servicer on a fixed port, started only after ``delay`` seconds."""

    def __init__(self, harness: Harness, delay: float) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.started_at: float | None = None
        self._server: grpc.Server | None = None
        self._cancel = threading.Event()
        self._servicer = TicketAuthorityServicer(harness.authority)
        self._thread = threading.Thread(target=self._run, args=(delay,), daemon=True)
        self._thread.start()

    def _run(self, delay: float) -> None:
        if self._cancel.wait(delay):
            return
        self._server, _ = grpc_server(self._servicer, self.port)
        self.started_at = time.monotonic()

    def stop(self) -> None:
        self._cancel.set()
        self._thread.join()
        if self._server is not None:
            self._server.stop(None).wait()


@pytest.fixture
def late_server(pkcs11_harness: Harness) -> Iterator[Callable[[float], LateServer]]:
    made: list[LateServer] = []

    def make(delay: float) -> LateServer:
        made.append(LateServer(pkcs11_harness, delay))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def decode_payload(payload: bytes) -> Any:
    header, notify = decode_notify_payload(payload)
    assert header.next_payload == 0
    return ticket_from_notify(notify)


# -- round trips ---------------------------------------------------------------------------------


def test_sync_round_trip(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    with TicketClient(harness.running.address if harness.running else "") as client:
        issued = client.issue(sample_state(3), lifetime=600)
        assert isinstance(issued, IssuedTicket)
        assert issued.lifetime == 600
        assert issued.expires_at == START + 600
        assert issued.key_id == harness.authority.ring.primary_id.hex()
        assert "octets" in repr(issued) and issued.ticket.hex() not in repr(issued)

        redeemed = client.redeem(issued.ticket)
        assert redeemed.result is RedeemResult.OK and redeemed.ok
        assert redeemed.state is not None
        assert redeemed.state.sk_d == sample_state(3).sk_d
        assert redeemed.state.id_i == sample_state(3).id_i
        assert redeemed.state.gateway_data == b"session=3"
        assert redeemed.key_id == issued.key_id
        assert redeemed.expires_at == issued.expires_at
        assert redeemed.issued_at == START
        with pytest.raises(ValueError, match="OK"):
            redeemed.nack_payload()

        assert client.consume(redeemed.ticket_id) is RedeemResult.OK
        assert client.consume(redeemed.ticket_id) is RedeemResult.REPLAYED
        replayed = client.redeem(issued.ticket)
        assert replayed.result is RedeemResult.REPLAYED
        assert replayed.state is None and replayed.ticket_id == b""
        assert decode_payload(replayed.nack_payload()) == TicketSignal(TICKET_NACK)
        assert client.redeem(b"\x01" + bytes(60)).result is RedeemResult.INVALID


def test_notify_payload_decodes_to_the_ticket_and_lifetime(pkcs11_harness: Harness) -> None:
    assert pkcs11_harness.running is not None
    with TicketClient(pkcs11_harness.running.address) as client:
        issued = client.issue(sample_state(), lifetime=0)
    assert issued.lifetime == pkcs11_harness.config.tickets.default_lifetime
    payload = issued.notify_payload()
    assert decode_payload(payload) == TicketLtOpaque(issued.lifetime, issued.ticket)
    assert issued.notify().data == issued.lt_opaque  # the same octets the authority sent
    assert payload[0] == 0 and int.from_bytes(payload[2:4], "big") == len(payload)
    assert issued.notify_payload(next_payload=41)[0] == 41
    assert decode_payload(ticket_nack_payload()) == TicketSignal(TICKET_NACK)


def test_issue_takes_the_domain_state_or_the_message(pkcs11_harness: Harness) -> None:
    from authority.state import ResumptionState

    assert pkcs11_harness.running is not None
    message = sample_state(5)
    domain = ResumptionState(**{f.name: getattr(message, f.name)
                                for f in message.DESCRIPTOR.fields})
    with TicketClient(pkcs11_harness.running.address) as client:
        for state in (message, domain):
            redeemed = client.redeem(client.issue(state).ticket)
            assert redeemed.state == domain


def test_realm_binding_and_reissue_reach_the_caller(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    assert harness.running is not None
    with TicketClient(harness.running.address) as client:
        issued = client.issue(sample_state(4), realm="east")
        batch = client.issue_many([sample_state(5)], realm="east")
        assert isinstance(batch[0], IssuedTicket)
        home = client.redeem(issued.ticket, realm="east")
        assert home.ok and home.realm == "east" and home.policy_epoch == 0
        assert not home.reissue
        assert client.redeem(issued.ticket).result is RedeemResult.INVALID
        assert client.redeem(issued.ticket, realm="west").result is RedeemResult.INVALID
        harness.authority.ring.rotate(reason="test")
        after = client.redeem_many([issued.ticket, batch[0].ticket], realm="east")
        assert all(isinstance(r, Redeemed) and r.ok and r.reissue for r in after)

    async def aio() -> Redeemed:
        async with AsyncTicketClient(harness.running.address if harness.running else "") as ac:
            sealed = await ac.issue(sample_state(6), realm="west")
            return (await ac.redeem_many([sealed.ticket], realm="west"))[0]  # type: ignore

    redeemed = run(aio())
    assert redeemed.ok and redeemed.realm == "west" and not redeemed.reissue


def test_async_round_trip(pkcs11_harness: Harness) -> None:
    assert pkcs11_harness.running is not None
    address = pkcs11_harness.running.address

    async def main() -> tuple[IssuedTicket, Redeemed, RedeemResult, RedeemResult, Redeemed]:
        async with AsyncTicketClient(address) as client:
            issued = await client.issue(sample_state(9), lifetime=300)
            redeemed = await client.redeem(issued.ticket)
            first = await client.consume(redeemed.ticket_id)
            second = await client.consume(redeemed.ticket_id)
            replay = await client.redeem(issued.ticket, consume=True)
            return issued, redeemed, first, second, replay

    issued, redeemed, first, second, replay = run(main())
    assert issued.lifetime == 300
    assert decode_payload(issued.notify_payload()) == TicketLtOpaque(300, issued.ticket)
    assert redeemed.ok and redeemed.state is not None
    assert redeemed.state.sk_d == sample_state(9).sk_d
    assert (first, second) == (RedeemResult.OK, RedeemResult.REPLAYED)
    assert replay.result is RedeemResult.REPLAYED


def test_batches_keep_order_and_item_errors(pkcs11_harness: Harness) -> None:
    assert pkcs11_harness.running is not None
    counting = Counting()
    states = [sample_state(0), sample_state(1, sk_d=b"short"), sample_state(2),
              sample_state(3), sample_state(4)]
    with TicketClient(pkcs11_harness.running.address, max_batch_items=2,
                      interceptors=[counting]) as client:
        issued = client.issue_many(states, lifetime=120)
        assert counting.calls["IssueTickets"] == 3  # 2 + 2 + 1
        assert isinstance(issued[1], ItemError)
        assert issued[1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert issued[1].message.startswith("items[1].state.sk_d")
        tickets = [i.ticket for i in issued if isinstance(i, IssuedTicket)]
        assert len(tickets) == 4
        redeemed = client.redeem_many([*tickets, b""], consume=True)
        assert [r.result for r in redeemed if isinstance(r, Redeemed)] == [RedeemResult.OK] * 4
        assert isinstance(redeemed[4], ItemError)
        assert [r.state.gateway_data for r in redeemed  # type: ignore[union-attr]
                if isinstance(r, Redeemed)] == [b"session=0", b"session=2", b"session=3",
                                                b"session=4"]
        again = client.redeem_many(tickets)
        assert [r.result for r in again] == [RedeemResult.REPLAYED] * 4  # type: ignore[union-attr]
        assert client.issue_many([]) == [] and client.redeem_many([]) == []

    async def batches() -> list[Redeemed | ItemError]:
        async with AsyncTicketClient(pkcs11_harness.running.address,  # type: ignore[union-attr]
                                     max_batch_items=3) as client:
            fresh = await client.issue_many(states[2:])
            return await client.redeem_many([i.ticket for i in fresh  # type: ignore[union-attr]
                                             ])

    assert [r.result for r in run(batches())] == [RedeemResult.OK] * 3  # type: ignore[union-attr]


# -- retries ---------------------------------------------------------------------------------------


def test_retries_reach_a_server_that_starts_late(late_server: Callable[[float], LateServer]
                                                 ) -> None:
    server = late_server(0.3)
    counting = Counting()
    begun = time.monotonic()
    with TicketClient(server.address, timeout=5.0, retries=40,
                      backoff=Backoff(base=0.05, cap=0.1), interceptors=[counting]) as client:
        issued = client.issue(sample_state())
        assert client.redeem(issued.ticket).ok
    assert server.started_at is not None and server.started_at - begun >= 0.25
    assert counting.calls["IssueTicket"] > 1  # refused while the server was not up, then served


def test_without_retries_a_server_that_starts_late_is_unavailable(
        late_server: Callable[[float], LateServer]) -> None:
    server = late_server(0.3)
    counting = Counting()
    with TicketClient(server.address, retries=0, interceptors=[counting]) as client, \
            pytest.raises(AuthorityUnavailable) as caught:
        client.issue(sample_state())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == 1
    assert counting.calls["IssueTicket"] == 1


def test_consume_is_sent_once_when_the_connection_comes_late(
        pkcs11_harness: Harness, late_server: Callable[[float], LateServer]) -> None:
    """A non-idempotent call is retried while nothing could be sent, then sent exactly once."""
    assert pkcs11_harness.running is not None
    with TicketClient(pkcs11_harness.running.address) as direct:
        handle = direct.redeem(direct.issue(sample_state()).ticket).ticket_id
    server = late_server(0.3)
    counting = Counting()
    with TicketClient(server.address, timeout=5.0, retries=40,
                      backoff=Backoff(base=0.05, cap=0.1), interceptors=[counting]) as client:
        assert client.consume(handle) is RedeemResult.OK
    assert counting.calls["ConsumeTicket"] == 1


def test_consume_without_a_server_fails_unsent() -> None:
    counting = Counting()
    with TicketClient(f"127.0.0.1:{free_port()}", retries=2, backoff=FAST,
                      interceptors=[counting]) as client, \
            pytest.raises(AuthorityUnavailable) as caught:
        client.consume(bytes(24))
    assert caught.value.attempts == 3
    assert caught.value.maybe_sent is False
    assert counting.calls["ConsumeTicket"] == 0


def test_server_unavailable_is_retried_only_for_idempotent_calls(
        pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    assert harness.running is not None
    counting = Counting()
    with TicketClient(harness.running.address, retries=2, backoff=FAST,
                      interceptors=[counting]) as client:
        issued = client.issue(sample_state())
        handle = client.redeem(issued.ticket).ticket_id
        # consumed, so its id is in the server's consumed index and each redeem of it reads
        # the store (an id the index lacks needs no query, and would still be answered)
        assert client.consume(handle) is RedeemResult.OK
        counting.calls.clear()
        harness.authority.store.close()  # every store query now fails: UNAVAILABLE

        with pytest.raises(AuthorityUnavailable) as idempotent:
            client.redeem(issued.ticket)
        assert counting.calls["RedeemTicket"] == 3  # 1 + 2 retries
        assert idempotent.value.attempts == 3

        with pytest.raises(AuthorityUnavailable) as consume:
            client.consume(handle)
        assert counting.calls["ConsumeTicket"] == 1
        assert consume.value.maybe_sent is True
        assert "not retried" in consume.value.details

        with pytest.raises(AuthorityUnavailable):
            client.redeem(issued.ticket, consume=True)
        assert counting.calls["RedeemTicket"] == 4  # one more, not three

        with pytest.raises(AuthorityUnavailable):
            client.redeem_many([issued.ticket], consume=True)
        assert counting.calls["RedeemTickets"] == 1
        with pytest.raises(AuthorityUnavailable):
            client.redeem_many([issued.ticket])
        assert counting.calls["RedeemTickets"] == 4


def test_async_server_unavailable_is_retried_only_for_idempotent_calls(
        pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    assert harness.running is not None
    address = harness.running.address
    counting = AsyncCounting()

    async def main() -> tuple[AuthorityUnavailable, AuthorityUnavailable]:
        async with AsyncTicketClient(address, retries=3, backoff=FAST,
                                     interceptors=[counting]) as client:
            issued = await client.issue(sample_state())
            handle = (await client.redeem(issued.ticket)).ticket_id
            assert await client.consume(handle) is RedeemResult.OK   # see the sync test
            harness.authority.store.close()
            try:
                await client.redeem(issued.ticket)
            except AuthorityUnavailable as exc:
                redeem_error = exc
            try:
                await client.consume(handle)
            except AuthorityUnavailable as exc:
                consume_error = exc
            return redeem_error, consume_error

    redeem_error, consume_error = run(main())
    assert counting.calls["RedeemTicket"] == 1 + 4
    assert redeem_error.attempts == 4
    assert counting.calls["ConsumeTicket"] == 1 + 1   # the consume before, then one sending
    assert consume_error.attempts == 1 and consume_error.maybe_sent


def test_invalid_argument_is_not_retried(pkcs11_harness: Harness) -> None:
    assert pkcs11_harness.running is not None
    counting = Counting()
    with TicketClient(pkcs11_harness.running.address, retries=5, backoff=FAST,
                      interceptors=[counting]) as client:
        with pytest.raises(AuthorityRejected) as caught:
            client.issue(sample_state(sk_d=b"\x00" * 20))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details.startswith(   # then " (request id ...)"
            "state.sk_d: must be 32 octets for PRF 5, got 20 (request id ")
        assert counting.calls["IssueTicket"] == 1
        with pytest.raises(AuthorityRejected) as empty:
            client.redeem(b"")
        assert empty.value.details.startswith("ticket:")
        with pytest.raises(AuthorityRejected):
            client.consume(b"short")
        assert counting.calls["RedeemTicket"] == 1 and counting.calls["ConsumeTicket"] == 1


class Slow(authority_pb2_grpc.TicketAuthorityServicer):  # type: ignore[misc]
    """Answers IssueTicket only after a second."""

    def IssueTicket(self, request: Any, context: Any) -> Any:  # noqa: N802
        threading.Event().wait(1.0)
        return authority_pb2.IssueTicketResponse(ticket=b"late")


def test_deadline_exceeded_is_not_retried() -> None:
    server, port = grpc_server(Slow())
    counting = Counting()
    try:
        with TicketClient(f"127.0.0.1:{port}", timeout=0.2, retries=5,
                          interceptors=[counting]) as client:
            begun = time.monotonic()
            with pytest.raises(AuthorityDeadlineExceeded) as caught:
                client.issue(sample_state())
            assert time.monotonic() - begun < 0.8
        assert isinstance(caught.value, AuthorityUnavailable)  # a gateway NACKs either way
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert counting.calls["IssueTicket"] == 1

        async def main() -> None:
            async with AsyncTicketClient(f"127.0.0.1:{port}", timeout=0.2) as aclient:
                await aclient.issue(sample_state(), timeout=0.1)

        with pytest.raises(AuthorityDeadlineExceeded):
            run(main())
    finally:
        server.stop(None)


def test_retry_loop_gives_up_when_the_deadline_leaves_no_room() -> None:
    now = [0.0]
    loop = RetryLoop("RedeemTicket", True, retries=10, backoff=Backoff(base=1.0, cap=1.0),
                     budget=1.5, clock=lambda: now[0], rand=lambda: 0.99)

    class Err:
        def code(self) -> Any:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "down"

    loop.sending()
    assert loop.failed(Err()) == pytest.approx(0.99)
    now[0] = 1.0
    loop.sending()
    with pytest.raises(AuthorityUnavailable, match="no time left"):
        loop.failed(Err())
    now[0] = 2.0
    with pytest.raises(AuthorityDeadlineExceeded):
        loop.remaining()


def test_backoff_is_exponential_capped_full_jitter() -> None:
    backoff = Backoff()
    assert [backoff.ceiling(n) for n in range(1, 7)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.0])
    assert backoff.delay(3, 0.0) == 0.0
    assert backoff.delay(3, 0.5) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Backoff(base=0)


# -- plaintext and TLS -----------------------------------------------------------------------------


def test_plaintext_only_to_loopback() -> None:
    for address in ("10.1.2.3:50051", "authority.example.net:50051", "[2001:db8::1]:50051",
                    "dns:///authority.example.net:443", "0.0.0.0:50051"):
        assert not is_loopback(address)
        with pytest.raises(PlaintextRefused, match="not a loopback address"):
            TicketClient(address)
        with pytest.raises(PlaintextRefused):
            AsyncTicketClient(address)
    for address in ("127.0.0.1:1", "127.8.9.10:1", "localhost:1", "[::1]:1", "::1",
                    "ipv4:127.0.0.1:1", "unix:/run/ticket-authority.sock"):
        assert is_loopback(address)
    TicketClient("localhost:1").close()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TicketClient("10.0.0.1:1", tls=ClientTls(cert_file=tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="timeout"):
        TicketClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="retries"):
        TicketClient("127.0.0.1:1", retries=-1)


@dataclass
class Pki:
    ca: Path
    server_cert: bytes
    server_key: bytes
    client_cert: Path
    client_key: Path
    ca_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool,
          san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test ticket CA", ca_key, "test ticket CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert("authority.test", server_key, "test ticket CA", ca_key, ca=False,
                   san=[x509.DNSName("authority.test")])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert("gateway-a", client_key, "test ticket CA", ca_key, ca=False)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "gw.pem").write_bytes(client.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "gw.key").write_bytes(_pem_key(client_key))
    return Pki(tmp_path / "ca.pem", server.public_bytes(serialization.Encoding.PEM),
               _pem_key(server_key), tmp_path / "gw.pem", tmp_path / "gw.key", ca_pem)


def test_mtls_to_the_authority(pkcs11_harness: Harness, pki: Pki) -> None:
    credentials = grpc.ssl_server_credentials([(pki.server_key, pki.server_cert)],
                                              root_certificates=pki.ca_pem,
                                              require_client_auth=True)
    server, port = grpc_server(TicketAuthorityServicer(pkcs11_harness.authority),
                               credentials=credentials)
    address = f"127.0.0.1:{port}"
    full = ClientTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key,
                     server_name="authority.test")
    try:
        with TicketClient(address, tls=full) as client:
            assert "mTLS" in repr(client)
            assert client.redeem(client.issue(sample_state()).ticket).ok

        async def async_round_trip() -> bool:
            async with AsyncTicketClient(address, tls=full) as aclient:
                issued = await aclient.issue(sample_state())
                return (await aclient.redeem(issued.ticket)).ok

        assert run(async_round_trip())

        no_cert = ClientTls(ca_file=pki.ca, server_name="authority.test")
        with TicketClient(address, tls=no_cert, retries=1, backoff=FAST) as client, \
                pytest.raises(AuthorityUnavailable):
            client.issue(sample_state())
        wrong_name = ClientTls(ca_file=pki.ca, cert_file=pki.client_cert,
                               key_file=pki.client_key)  # 127.0.0.1 is not in the cert
        with TicketClient(address, tls=wrong_name, retries=0) as client, \
                pytest.raises(AuthorityUnavailable):
            client.issue(sample_state())
        # TLS lifts the loopback rule: the name is checked, not the address
        TicketClient("authority.example.net:50051", tls=full).close()
    finally:
        server.stop(None)


def test_redeemed_from_proto_maps_every_field() -> None:
    """The reply conversion the client makes per call: every state field to its own field (no
    two alike, so a swapped pair fails), the timestamps as ToNanoseconds() / 1e9 to the last
    bit, an unknown result number as UNSPECIFIED, and the result of a state-less reply."""
    from authority.client import models

    fields = {"id_i": b"\x02\x00\x00\x00i", "id_r": b"\x02\x00\x00\x00r",
              "spi_i": b"\x01" * 8, "spi_r": b"\x02" * 8, "sk_d": bytes(range(32)),
              "encr_id": 20, "encr_key_bits": 256, "prf_id": 5, "integ_id": 0,
              "dh_group": 19, "auth_method": 14, "gateway_data": b"gw"}
    msg = authority_pb2.RedeemTicketResponse(
        result=1, state=authority_pb2.ResumptionState(**fields), ticket_id=b"t" * 16,
        key_id="00000000000000ab", reissue=True, realm="east", policy_epoch=7)
    msg.expires_at.FromNanoseconds(1_765_000_000_123_456_789)
    msg.issued_at.FromNanoseconds(1_764_999_000_000_000_001)
    redeemed = models.redeemed_from_proto(msg)
    assert redeemed.state is not None
    assert {name: getattr(redeemed.state, name) for name in fields} == fields
    assert redeemed.expires_at == float(msg.expires_at.ToNanoseconds()) / 1e9
    assert redeemed.issued_at == float(msg.issued_at.ToNanoseconds()) / 1e9
    assert (redeemed.result, redeemed.ticket_id, redeemed.key_id, redeemed.reissue,
            redeemed.realm, redeemed.policy_epoch) == (
        RedeemResult.OK, b"t" * 16, "00000000000000ab", True, "east", 7)
    assert models.redeemed_from_proto(authority_pb2.RedeemTicketResponse(result=99)).result \
        is RedeemResult.UNSPECIFIED
    bare = models.redeemed_from_proto(authority_pb2.RedeemTicketResponse(result=4))
    assert (bare.result, bare.state, bare.expires_at) == (RedeemResult.REPLAYED, None, None)
    assert models.result_from_number(5) is RedeemResult.REVOKED
    assert models.result_from_number(-1) is RedeemResult.UNSPECIFIED
