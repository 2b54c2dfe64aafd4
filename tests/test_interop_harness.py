"""The libreswan interop harness (issue 18) checked on its own: network namespaces joined by a
veth, a UDP socket this process opens inside one of them, libreswan 5.2 built from the vendored
tarball, and two plutos -- a client and a libreswan gateway -- doing a full IKE_SA_INIT +
IKE_AUTH with a ticket, then IKE_SESSION_RESUME, captured with dumpcap and read with tshark.

The libreswan-to-libreswan run is the reference our gateway must match (the same client, the
same assertions); its round trips and times are printed (pytest -s, or on failure).

Skipped only where network namespaces cannot be created; anything else missing fails.
"""

from __future__ import annotations

import errno
import io
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.capture_fixtures import Capture
from tests.libreswan_fixtures import (
    CHILDLESS,
    CLIENT_ID,
    ESTABLISHED_PSK,
    ESTABLISHED_RESUMED,
    GATEWAY_ID,
    TICKET_RECEIVED,
    LibreswanError,
    LibreswanPrefix,
    Pluto,
    build_libreswan,
    conn_text,
    secrets_text,
    sha256_of,
)
from tests.netns_fixtures import NetnsPair, can_create_netns, ip, udp_socket_in

PSK = "interop-test-only-psk-0f1e2d3c4b5a69788796a5b4"   # a test value, in no other place
CONN = "lab"
ENCR_AES_GCM_16, PRF_HMAC_SHA2_256, DH_19 = 20, 5, 19
N_TICKET_OPAQUE = 16413
FULL = [(34, False), (34, True), (35, False), (35, True)]
RESUMED = [(38, False), (38, True), (35, False), (35, True)]


@pytest.fixture(scope="module")
def netns_allowed() -> None:
    allowed, why = can_create_netns()
    if not allowed:
        pytest.skip(why)


@pytest.fixture(scope="module")
def libreswan(netns_allowed: None) -> LibreswanPrefix:
    """libreswan 5.2, built on first use (about a minute on 2 cores), cached afterwards."""
    return build_libreswan()


@pytest.fixture
def pair(netns_allowed: None) -> Iterator[NetnsPair]:
    with NetnsPair() as created:
        yield created


def namespaces() -> str:
    return ip("netns", "list")


def test_a_datagram_from_the_client_namespace_reaches_a_socket_opened_in_the_gateway_one(
        pair: NetnsPair) -> None:
    gateway = udp_socket_in(pair.gateway, pair.gateway_address, 500)
    client = udp_socket_in(pair.client, pair.client_address, 0)
    with gateway, client:
        gateway.settimeout(5)
        client.sendto(b"ike?", (pair.gateway_address, 500))
        data, source = gateway.recvfrom(64)
        assert (data, source[0]) == (b"ike?", pair.client_address)

    # inside, not here: its loopback port is free in this namespace (a second bind to the same
    # address and port in one namespace is EADDRINUSE). 192.0.2.2 cannot tell: a machine may
    # have it too (this one has, on eth0)
    inside = udp_socket_in(pair.gateway, "127.0.0.1", 0)
    with inside, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as here:
        here.bind(inside.getsockname())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again, \
                pytest.raises(OSError) as taken:
            again.bind(inside.getsockname())
        assert taken.value.errno == errno.EADDRINUSE


def test_the_capture_keeps_a_message_sent_just_before_it_stops(pair: NetnsPair,
                                                              tmp_path: Path) -> None:
    # an IKE_SA_INIT request header alone: SPIi, SPIr 0, next payload 0, 2.0, 34, I, mid 0
    header = bytes(range(1, 9)) + bytes(8) + bytes([0, 0x20, 34, 0x08]) + bytes(4) + \
        (28).to_bytes(4, "big")
    sink = udp_socket_in(pair.gateway, pair.gateway_address, 500)
    client = udp_socket_in(pair.client, pair.client_address, 500)
    with sink, client, Capture(pair.gateway, pair.gateway_if, tmp_path / "c.pcapng") as capture:
        client.sendto(header, (pair.gateway_address, 500))
    [message] = capture.exchanges()          # lost before stop() let dumpcap receive it
    assert (message.exchange, message.is_response, message.spi_i, message.length) == (
        34, False, "0102030405060708", 28)


def test_the_namespaces_are_removed_even_after_a_failure(netns_allowed: None) -> None:
    with pytest.raises(RuntimeError, match="inside"), NetnsPair() as pair:
        assert pair.client in namespaces() and pair.gateway in namespaces()
        raise RuntimeError("inside")
    assert pair.client not in namespaces() and pair.gateway not in namespaces()


def test_the_build_checks_the_tarball_and_is_cached(libreswan: LibreswanPrefix,
                                                    tmp_path: Path) -> None:
    version = subprocess.run([str(libreswan.pluto), "--version"], capture_output=True,
                             text=True, timeout=30, check=False)
    assert "Libreswan 5.2" in version.stdout + version.stderr
    assert build_libreswan() == libreswan               # the cached prefix, no second build
    with pytest.raises(LibreswanError, match="sha256"):
        build_libreswan(expected_sha256="0" * 64, cache=tmp_path)
    assert not any(tmp_path.iterdir())                  # nothing built from a wrong tarball


def test_a_failed_build_says_why_and_leaves_no_prefix(netns_allowed: None,
                                                      tmp_path: Path) -> None:
    makefile = b"base:\n\t@echo 'cc: internal compiler error (a test)'; exit 2\n"
    tarball = tmp_path / "libreswan-5.2.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        member = tarfile.TarInfo("libreswan-5.2/Makefile")
        member.size = len(makefile)
        archive.addfile(member, io.BytesIO(makefile))
    cache = tmp_path / "cache"
    with pytest.raises(LibreswanError, match="internal compiler error"):
        build_libreswan(tarball, sha256_of(tarball), cache)
    # neither a prefix nor the temporary build directory is left; the log is kept
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []
    assert [p.suffix for p in cache.iterdir() if p.name.endswith(".log")] == [".log"]


def test_pluto_runs_from_a_directory_too_deep_for_its_control_socket(
        libreswan: LibreswanPrefix, pair: NetnsPair, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    conn = conn_text(CONN, local=pair.client_address, remote=pair.gateway_address)
    with Pluto(libreswan, pair.client, deep, [conn],
               secrets_text(CLIENT_ID, GATEWAY_ID, PSK)) as pluto:
        assert len(bytes(deep / "run" / "pluto.ctl")) > 107
        assert "added IKEv2 connection" in pluto.add(CONN)
        rundir = pluto.rundir
        assert rundir.is_dir() and deep not in rundir.parents
    assert not rundir.exists()
    assert "Pluto is shutting down" in pluto.log_text()


def _pluto(libreswan: LibreswanPrefix, pair: NetnsPair, side: str, work: Path) -> Pluto:
    """The client's or the libreswan gateway's pluto for the test connection."""
    if side == "client":
        local, remote, ids = pair.client_address, pair.gateway_address, (CLIENT_ID, GATEWAY_ID)
        namespace = pair.client
    else:
        local, remote, ids = pair.gateway_address, pair.client_address, (GATEWAY_ID, CLIENT_ID)
        namespace = pair.gateway
    conn = conn_text(CONN, local=local, remote=remote, local_id=ids[0], remote_id=ids[1])
    return Pluto(libreswan, namespace, work / side, [conn], secrets_text(*ids, PSK))


def test_libreswan_resumes_a_session_with_a_libreswan_gateway(
        libreswan: LibreswanPrefix, pair: NetnsPair, tmp_path: Path) -> None:
    capture_path = tmp_path / "ike.pcapng"
    print(f"capture and pluto logs: {tmp_path}")          # shown when the test fails
    with Capture(pair.gateway, pair.gateway_if, capture_path) as capture, \
            _pluto(libreswan, pair, "gateway", tmp_path) as gateway, \
            _pluto(libreswan, pair, "client", tmp_path) as client:
        for pluto in (gateway, client):
            assert "added IKEv2 connection" in pluto.add(CONN)
        client.impair("suppress-retransmits", CHILDLESS)
        gateway.impair("suppress-retransmits")
        assert "session resume ticket: none" in client.connectionstatus()

        first = client.initiate(CONN, expect=(ESTABLISHED_PSK, TICKET_RECEIVED))
        assert "asking for session resume ticket" in first
        assert "session resume ticket: length:" in client.connectionstatus()
        assert "ESTABLISHED_IKE_SA" in client.showstates()
        assert client.trafficstatus().strip() == ""      # childless: no IPsec SA

        client.suspend(CONN)
        assert "ESTABLISHED_IKE_SA" not in client.showstates()
        assert "session resume ticket: length:" in client.connectionstatus()
        # pluto 5.2 proposes a Child SA in the resumed IKE_AUTH despite CHILDLESS, and takes
        # an answer with one as fatal. A libreswan gateway answers with the Child SA where the
        # kernel has ESP, with N(TEMPORARY_FAILURE) and none where it has not (here); so that
        # this test does not depend on the kernel, it ignores the proposal (not settable
        # earlier: with it a childless IKE_AUTH request is fatal)
        gateway.impair("ignore-v2-ike-auth-child")
        mark = gateway.mark()
        resumed = client.initiate(CONN, expect=(ESTABLISHED_RESUMED, TICKET_RECEIVED))
        assert "sent IKE_SESSION_RESUME request" in resumed
        gateway.wait_for(["responder established IKE SA; authenticated peer using "
                          "authby=session-resume"], mark, timeout=5)
        assert "ESTABLISHED_IKE_SA" in client.showstates()
        full, resume = capture.handshake(34), capture.handshake(38)
    table = capture.table()
    assert (full.exchanges, resume.exchanges) == (FULL, RESUMED), table
    offer = full.messages[0]
    assert (offer.proposals, offer.transforms, offer.key_lengths, offer.ke_group) == (
        1, ((1, ENCR_AES_GCM_16), (2, PRF_HMAC_SHA2_256), (4, DH_19)), (256,), DH_19), table
    assert resume.messages[0].notifies == (N_TICKET_OPAQUE,), table
    print(f"libreswan 5.2 <-> libreswan 5.2: full IKE_SA_INIT + IKE_AUTH {full.round_trips} "
          f"round trips {full.seconds * 1000:.1f} ms; IKE_SESSION_RESUME + IKE_AUTH "
          f"{resume.round_trips} round trips {resume.seconds * 1000:.1f} ms")
