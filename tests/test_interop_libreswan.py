"""Interoperability with a real IKEv2 client: libreswan 5.2's pluto, built from
../shared/vendor, establishes an IKE SA with our gateway kit (authority/gateway) in a network
namespace, receives a ticket the authority issued, loses that gateway and resumes on a second
one at the same address with IKE_SESSION_RESUME (RFC 5723).

Two namespaces joined by a veth pair (192.0.2.1 pluto, 192.0.2.2 our gateways); our gateways
run in this process, their UDP sockets opened inside the gateway namespace, and talk to a real
``ticket-authority serve`` on 127.0.0.1. Every message is captured (dumpcap) and the capture is
kept when the test fails. Findings about libreswan that this test shows: docs/interop.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authority.bench.serveproc import ServeProcess
from authority.chaos.servers import single
from authority.client import TicketClient
from authority.gateway import GatewaySettings, Responder
from authority.ikev2.auth import MESSAGE_ONLY, RFC5723
from authority.ikev2.bodies import ID_FQDN, id_body, random_spi
from authority.ikev2.notify import TICKET_NACK
from authority.ikev2.payloads import (
    ResumeRequest,
    decode_resume_request,
    decode_resume_response,
    encode_resume_request,
)
from tests.capture_fixtures import Capture, Handshake, Message, handshake
from tests.libreswan_fixtures import (
    CHILDLESS,
    CLIENT_ID,
    ESTABLISHED_PSK,
    ESTABLISHED_RESUMED,
    GATEWAY_ID,
    TICKET_RECEIVED,
    LibreswanPrefix,
    Pluto,
    build_libreswan,
    conn_text,
    secrets_text,
)
from tests.netns_fixtures import NetnsPair, can_create_netns, udp_socket_in

PSK = "interop-psk-0123456789abcdef0123"
CONN = "resume"
IKE_PORT = 500
NACK_FALLBACK = "received TICKET_NACK notification response to IKE_SESSION_RESUME request, " \
                "retrying using IKE_SA_INIT"
REJECTED = "IKE SA authentication request rejected by peer: AUTHENTICATION_FAILED"
IKE_SA_INIT, IKE_SESSION_RESUME = 34, 38

pytestmark = pytest.mark.skipif(not can_create_netns()[0],
                                reason=f"network namespaces: {can_create_netns()[1]}")


@pytest.fixture(scope="module")
def libreswan() -> LibreswanPrefix:
    return build_libreswan()


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[ServeProcess]:
    server = single(tmp_path, "authority")
    try:
        yield server
    finally:
        server.stop()


@dataclass
class World:
    """Everything one run holds: the namespaces, pluto, the capture, the authority."""

    net: NetnsPair
    pluto: Pluto
    capture: Capture
    authority: ServeProcess
    client: TicketClient

    def gateway(self, name: str, reading: str) -> Responder:
        """A gateway of ours on 192.0.2.2:500 in the gateway namespace, started."""
        settings = GatewaySettings(local_id=id_body(ID_FQDN, GATEWAY_ID[1:].encode()),
                                   psk=PSK.encode(), resumed_auth=reading)
        sock = udp_socket_in(self.net.gateway, self.net.gateway_address, IKE_PORT)
        return Responder(settings, self.client, sock, name).start()

    def messages(self) -> list[Message]:
        return self.capture.exchanges()


@pytest.fixture
def world(libreswan: LibreswanPrefix, authority: ServeProcess, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[World]:
    with NetnsPair() as net:
        conn = conn_text(CONN, local=net.client_address, remote=net.gateway_address)
        pcap = tmp_path / "ike.pcapng"
        with Capture(net.gateway, net.gateway_if, pcap) as capture, \
                Pluto(libreswan, net.client, tmp_path / "pluto", [conn],
                      secrets_text(CLIENT_ID, GATEWAY_ID, PSK)) as pluto, \
                TicketClient(authority.address) as client:
            pluto.add(CONN)
            failed_before = request.session.testsfailed
            yield World(net, pluto, capture, authority, client)
        if request.session.testsfailed > failed_before:   # the call's report came first
            _keep(tmp_path, pcap)


def _keep(tmp_path: Path, pcap: Path) -> None:
    """Copy the capture and pluto's files (config, log) where a failed run can be studied."""
    kept = Path(os.environ.get("ITA_INTEROP_KEEP", "/tmp")) / f"ita-interop-{os.getpid()}"
    kept.mkdir(parents=True, exist_ok=True)
    if pcap.exists():
        shutil.copy(pcap, kept / pcap.name)
    shutil.copytree(tmp_path / "pluto", kept / "pluto", dirs_exist_ok=True)
    print(f"capture and pluto's files kept in {kept}")


def _fallbacks(messages: list[Message]) -> list[Message]:
    """The N(TICKET_NACK) answers to pluto (port 500) that an IKE_SA_INIT request follows."""
    out = []
    for index, message in enumerate(messages):
        if message.exchange == IKE_SESSION_RESUME and message.is_response and \
                message.dport == IKE_PORT and TICKET_NACK in message.notifies and \
                any(m.exchange == IKE_SA_INIT and not m.is_response
                    for m in messages[index + 1:]):
            out.append(message)
    return out


def _replay(world: World, ticket: bytes) -> bytes:
    """Send an IKE_SESSION_RESUME with ``ticket`` from the client namespace (a port of our
    own, not pluto's) and return the gateway's answer."""
    sock = udp_socket_in(world.net.client, world.net.client_address, 0)
    with sock:
        sock.settimeout(5)
        request = encode_resume_request(ResumeRequest(random_spi(), os.urandom(32), ticket))
        sock.sendto(request, (world.net.gateway_address, IKE_PORT))
        return sock.recvfrom(65535)[0]


def _kinds(gateway: Responder) -> list[str]:
    return [f"{kind}:{detail}" for kind, detail in gateway.events]


def test_libreswan_resumes_through_a_second_gateway_and_falls_back_on_a_nack(
        world: World) -> None:
    pluto = world.pluto
    pluto.impair(CHILDLESS)          # no Child SA in IKE_AUTH: these kernels have no ESP
    # 1. Full IKE_SA_INIT + IKE_AUTH with gateway A; libreswan asks for and gets a ticket.
    gateway_a = world.gateway("A", MESSAGE_ONLY)
    out = pluto.initiate(CONN)
    assert ESTABLISHED_PSK in out and TICKET_RECEIVED in out, out
    assert "ticket-issued" in " ".join(_kinds(gateway_a))
    assert "session resume ticket: length:" in pluto.status()
    gateway_a.stop()                                          # A dies
    # 2. Gateway B on the same address; libreswan resumes (IKE_SESSION_RESUME, then IKE_AUTH).
    gateway_b = world.gateway("B", MESSAGE_ONLY)
    pluto.suspend(CONN)
    out = pluto.initiate(CONN)
    assert ESTABLISHED_RESUMED in out, out
    states = pluto.showstates()
    assert "ESTABLISHED_IKE_SA" in states or "established IKE SA" in states, states
    assert {"redeem:OK", "consume:OK"} <= set(_kinds(gateway_b)), _kinds(gateway_b)
    assert any(k.startswith("resumed-auth:") for k in _kinds(gateway_b))
    # 3. The ticket libreswan just used is consumed: replayed, it gets N(TICKET_NACK).
    (sa,) = gateway_b.engine.sas.values()              # the resumed SA: its first request
    used = decode_resume_request(sa.first_request).ticket  # is what pluto sent
    answer = decode_resume_response(_replay(world, used))
    assert answer.nacked and not answer.accepted
    assert "redeem:REPLAYED" in _kinds(gateway_b)
    gateway_b.stop()
    # 4. Our default reading of the resumed AUTH (RFC 5723 with RFC 7296 §2.15's octets) does
    #    not verify libreswan 5.2's AUTH: gateway C refuses it with AUTHENTICATION_FAILED and
    #    does not consume the ticket; libreswan then revives the connection with a full
    #    IKE_SA_INIT + IKE_AUTH with C (a new ticket).
    gateway_c = world.gateway("C", RFC5723)
    try:
        assert REJECTED in _resume_until_full_handshake(world)
        refused = [k for k in _kinds(gateway_c) if k.startswith("refused:")]
        assert refused == ["refused:the resumed AUTH does not verify (reading rfc5723)"]
        assert "consume:OK" not in _kinds(gateway_c)
        assert "ticket-issued" in " ".join(_kinds(gateway_c))
    finally:
        gateway_c.stop()
    # 5. Revoked at the authority: the ticket libreswan holds gets N(TICKET_NACK) from gateway
    #    D, and libreswan falls back to IKE_SA_INIT with it.
    revoke = world.authority.cli("tickets", "revoke", "--id-i",
                                 id_body(ID_FQDN, CLIENT_ID[1:].encode()).hex(),
                                 "--reason", "interop test")
    assert revoke.returncode == 0, revoke.stderr
    gateway_d = world.gateway("D", MESSAGE_ONLY)
    try:
        assert NACK_FALLBACK in _resume_until_full_handshake(world)
        assert "redeem:REVOKED" in _kinds(gateway_d)
    finally:
        gateway_d.stop()
    world.capture.stop()
    messages = world.messages()
    table = world.capture.table()
    full = handshake(messages, IKE_SA_INIT)
    resumed = handshake(messages, IKE_SESSION_RESUME)      # step 2's, which B accepted
    assert full.round_trips == resumed.round_trips == 2, table
    assert _fallbacks(messages), table                     # step 5, seen on the wire
    print(f"\nfull IKE_SA_INIT + IKE_AUTH: {_ms(full)}; IKE_SESSION_RESUME + IKE_AUTH: "
          f"{_ms(resumed)} (libreswan 5.2 <-> gateway kit over veth, authority on loopback)")


def _ms(shake: Handshake) -> str:
    each = " + ".join(f"{t * 1000:.1f}" for t in shake.round_trip_seconds)
    return f"{shake.round_trips} round trips, {shake.seconds * 1000:.1f} ms ({each})"


def _resume_until_full_handshake(world: World) -> str:
    """Suspend, initiate (a resumption attempt) and wait until libreswan has fallen back to a
    full handshake (its failure on the way expected); pluto's console lines from then on."""
    world.pluto.suspend(CONN)
    mark = world.pluto.mark()
    world.pluto.whack("--name", CONN, "--initiate", "--asynchronous")
    return world.pluto.wait_for([ESTABLISHED_PSK], mark, failures=())


def test_a_child_sa_request_is_answered_with_a_clear_notify(world: World) -> None:
    """Without the impairment libreswan asks for a Child SA in IKE_AUTH; the kit makes IKE SAs
    only: it answers N(NO_PROPOSAL_CHOSEN) beside IDr, AUTH and the ticket, and libreswan keeps
    the IKE SA (RFC 7296 §1.2) and its ticket; the Child SA libreswan then asks for with
    CREATE_CHILD_SA gets N(NO_ADDITIONAL_SAS)."""
    gateway = world.gateway("A", MESSAGE_ONLY)
    try:
        mark = world.pluto.mark()
        world.pluto.whack("--name", CONN, "--initiate", "--asynchronous")
        world.pluto.wait_for([ESTABLISHED_PSK, TICKET_RECEIVED,
                              "IKE_AUTH response rejected Child SA with NO_PROPOSAL_CHOSEN",
                              "CREATE_CHILD_SA failed with error notification NO_ADDITIONAL_SAS"],
                             mark)
        assert "ESTABLISHED_IKE_SA" in world.pluto.showstates()
        assert "session resume ticket: length:" in world.pluto.status()
        assert "create-child-sa:refused: NO_ADDITIONAL_SAS (IKE SAs only)" in _kinds(gateway)
    finally:
        gateway.stop()


ROUNDS = 8


def test_round_trips_and_time_of_full_and_resumed_handshakes(world: World) -> None:
    """The figures of docs/benchmarks.md: ROUNDS times, a full IKE_SA_INIT + IKE_AUTH (the
    connection re-added first, so that libreswan holds no ticket; it asks for one) and then a
    resumption of it (IKE_SESSION_RESUME + IKE_AUTH, which consumes the ticket and asks for a new
    one), both with the same gateway; times from the capture, medians printed."""
    pluto = world.pluto
    pluto.impair(CHILDLESS)
    gateway = world.gateway("B", MESSAGE_ONLY)
    try:
        for _ in range(ROUNDS):
            pluto.whack("--delete", "--name", CONN)
            pluto.add(CONN)
            pluto.initiate(CONN, expect=(ESTABLISHED_PSK, TICKET_RECEIVED))
            pluto.suspend(CONN)
            pluto.initiate(CONN, expect=(ESTABLISHED_RESUMED, TICKET_RECEIVED))
            pluto.suspend(CONN)
    finally:
        gateway.stop()
    world.capture.stop()
    messages = world.messages()
    starts = [m.exchange for m in messages if not m.is_response]
    assert starts.count(IKE_SA_INIT) == starts.count(IKE_SESSION_RESUME) == ROUNDS, \
        world.capture.table()
    fulls = [handshake(messages, IKE_SA_INIT, n) for n in range(ROUNDS)]
    resumes = [handshake(messages, IKE_SESSION_RESUME, n) for n in range(ROUNDS)]
    assert {s.round_trips for s in fulls} == {s.round_trips for s in resumes} == {2}, \
        world.capture.table()
    assert _kinds(gateway).count("consume:OK") == ROUNDS
    print(f"\n{ROUNDS} rounds, libreswan 5.2 <-> gateway kit over veth, authority on loopback; "
          f"median (min-max) ms:\n  full IKE_SA_INIT + IKE_AUTH:      {_summary(fulls)}\n"
          f"  IKE_SESSION_RESUME + IKE_AUTH:    {_summary(resumes)}")


def _summary(shakes: list[Handshake]) -> str:
    def one(values: list[float]) -> str:
        ms = sorted(v * 1000 for v in values)
        return f"{statistics.median(ms):.1f} ({ms[0]:.1f}-{ms[-1]:.1f})"

    firsts = [s.round_trip_seconds[0] for s in shakes]
    seconds = [s.round_trip_seconds[1] for s in shakes]
    return (f"{one([s.seconds for s in shakes])}; first round trip {one(firsts)}, "
            f"IKE_AUTH round trip {one(seconds)}")
