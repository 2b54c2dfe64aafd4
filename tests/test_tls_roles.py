"""mTLS on the real listener: the role matrix over real TLS channels, what a caller without a
usable certificate sees, and certificate rotation without a restart.

What a client sees when it is refused:
- no client certificate, or one from another CA: the TLS handshake itself fails (the server
  requires and verifies client certificates), so grpc reports UNAVAILABLE and no RPC runs;
- a certificate from the client CA whose identity is unusable (no URI SAN, another trust
  domain): UNAUTHENTICATED;
- a usable identity with the wrong role (or none): PERMISSION_DENIED.
Health answers every caller that completed the handshake (it needs a certificate, too).
"""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.certs import (
    DevPki,
    cert_pem,
    init_dev_pki,
    issue_certificate,
    key_pem,
    make_ca,
    server_san,
    write_private,
    write_public,
)
from authority.cli import main
from authority.client import AuthorityRejected, AuthorityUnavailable, ClientTls, TicketClient
from authority.config import TlsSettings
from authority.errors import ConfigError
from authority.service.server import build_server
from authority.settings_loader import load_config
from tests.conftest import Harness, make_config, sample_state

SERVER_NAME = "authority.test"


@dataclass
class Tls:
    harness: Harness
    pki: DevPki
    address: str

    def credentials(self, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
        return ClientTls(self.pki.ca_cert, cert, key).credentials()

    def channel(self, cert: Path | None, key: Path | None) -> grpc.Channel:
        channel = grpc.secure_channel(self.address, self.credentials(cert, key),
                                      options=[("grpc.ssl_target_name_override", SERVER_NAME),
                                               ("grpc.use_local_subchannel_pool", 1)])
        self.harness._channels.append(channel)
        return channel

    def gateway(self) -> grpc.Channel:
        return self.channel(self.pki.gateway_cert, self.pki.gateway_key)

    def admin(self) -> grpc.Channel:
        return self.channel(self.pki.admin_cert, self.pki.admin_key)

    def client_tls(self, cert: Path, key: Path) -> ClientTls:
        return ClientTls(self.pki.ca_cert, cert, key, SERVER_NAME)

    def client_cert(self, tmp: Path, name: str, san: list[x509.GeneralName],
                    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
                    ) -> tuple[Path, Path]:
        """A client certificate signed by the dev CA (or ``ca``)."""
        if ca is None:
            ca = (x509.load_pem_x509_certificate(self.pki.ca_cert.read_bytes()),
                  _load_key(self.pki.ca_key))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_certificate(name, key, ca[0], ca[1], san, server=False)
        write_public(tmp / f"{name}.pem", cert_pem(cert))
        write_private(tmp / f"{name}.key", key_pem(key))
        return tmp / f"{name}.pem", tmp / f"{name}.key"


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def tls_settings(pki: DevPki, **changes: Any) -> TlsSettings:
    return replace(TlsSettings(pki.server_cert, pki.server_key, pki.ca_cert, pki.trust_domain),
                   **changes)


@pytest.fixture(name="tls", params=["aio", "threads"])
def tls_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tls]:
    """An mTLS server on each server mode (the role check is an interceptor in both); named
    ``tls_fixture`` so that other modules import it without shadowing (ruff F811)."""
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11", request.param)
    running = h.start(replace(make_config(h.state_dir, mode=request.param),
                              tls=tls_settings(pki)))
    yield Tls(h, pki, running.address)
    h.stop()


def code_of(call: Any, *args: Any) -> grpc.StatusCode:
    try:
        call(*args, timeout=10)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def admin_calls(channel: grpc.Channel) -> dict[str, grpc.StatusCode]:
    stub = admin_pb2_grpc.TicketAdminStub(channel)
    return {"GetStatus": code_of(stub.GetStatus, admin_pb2.GetStatusRequest()),
            "ListKeys": code_of(stub.ListKeys, admin_pb2.ListKeysRequest()),
            "RetireKey": code_of(stub.RetireKey, admin_pb2.RetireKeyRequest(key_id="00" * 8))}


def ticket_calls(channel: grpc.Channel) -> dict[str, grpc.StatusCode]:
    stub = authority_pb2_grpc.TicketAuthorityStub(channel)
    request = authority_pb2.IssueTicketRequest(state=sample_state())

    def stream(**kw: Any) -> Any:
        return list(stub.IssueTicketStream(iter([authority_pb2.IssueTicketsRequest(
            items=[request], batch_id=1)]), **kw))

    return {"IssueTicket": code_of(stub.IssueTicket, request),
            "RedeemTicket": code_of(stub.RedeemTicket,
                                    authority_pb2.RedeemTicketRequest(ticket=b"x" * 40)),
            "IssueTicketStream": code_of(stream)}


def reflection_code(channel: grpc.Channel) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kw: Any) -> Any:
        return list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), **kw))

    return code_of(ask)


def health_code(channel: grpc.Channel) -> grpc.StatusCode:
    return code_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())


OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_gateway_calls_tickets_only(tls: Tls) -> None:
    channel = tls.gateway()
    assert ticket_calls(channel) == {"IssueTicket": OK, "RedeemTicket": OK,
                                     "IssueTicketStream": OK}
    assert admin_calls(channel) == {"GetStatus": DENIED, "ListKeys": DENIED,
                                    "RetireKey": DENIED}
    assert reflection_code(channel) == DENIED
    assert health_code(channel) == OK
    gateway = tls.client_tls(tls.pki.gateway_cert, tls.pki.gateway_key)
    with TicketClient(tls.address, tls=gateway) as client:
        assert client.redeem(client.issue(sample_state()).ticket).ok


def test_admin_calls_admin_and_status_only(tls: Tls, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    channel = tls.admin()
    with caplog.at_level(logging.INFO, logger="authority.service.auth"):
        calls = admin_calls(channel)
    # RetireKey of an unknown key passes the role check and fails in the key ring
    assert calls == {"GetStatus": OK, "ListKeys": OK, "RetireKey": grpc.StatusCode.NOT_FOUND}
    assert "by spiffe://example.org/admin/ops" in caplog.text
    assert ticket_calls(channel) == {"IssueTicket": DENIED, "RedeemTicket": DENIED,
                                     "IssueTicketStream": DENIED}
    assert reflection_code(channel) == OK
    assert health_code(channel) == OK
    admin = tls.client_tls(tls.pki.admin_cert, tls.pki.admin_key)
    with TicketClient(tls.address, tls=admin) as client, \
            pytest.raises(AuthorityRejected) as rejected:
        client.issue(sample_state())
    assert rejected.value.code == DENIED
    # denials are counted like any other outcome
    sample = tls.harness.authority.metrics.registry.get_sample_value(
        "ticket_authority_rpc_seconds_count", {"method": "IssueTicket",
                                               "code": "PERMISSION_DENIED"})
    assert sample is not None and sample >= 1


def test_no_client_certificate_fails_the_handshake(tls: Tls) -> None:
    channel = tls.channel(None, None)
    assert ticket_calls(channel)["IssueTicket"] == UNAVAILABLE
    assert admin_calls(channel)["GetStatus"] == UNAVAILABLE
    assert health_code(channel) == UNAVAILABLE
    with TicketClient(tls.address, tls=ClientTls(tls.pki.ca_cert, server_name=SERVER_NAME),
                      retries=0) as client, pytest.raises(AuthorityUnavailable):
        client.issue(sample_state())


def test_a_certificate_from_another_ca_fails_the_handshake(tls: Tls, tmp_path: Path) -> None:
    other_ca = make_ca("another CA")
    cert, key = tls.client_cert(tmp_path, "rogue-admin",
                                [x509.UniformResourceIdentifier(tls.pki.admin_uri)], other_ca)
    channel = tls.channel(cert, key)
    assert admin_calls(channel)["GetStatus"] == UNAVAILABLE
    assert health_code(channel) == UNAVAILABLE


def test_unusable_identities_are_unauthenticated_and_roleless_ones_denied(
        tls: Tls, tmp_path: Path) -> None:
    cases: dict[str, tuple[list[x509.GeneralName], grpc.StatusCode]] = {
        "no-uri": ([x509.DNSName("gw.example.org")], UNAUTH),
        "foreign-domain": ([x509.UniformResourceIdentifier(
            "spiffe://evil.test/admin/ops")], UNAUTH),
        "two-uris": ([x509.UniformResourceIdentifier("spiffe://example.org/gateway/a"),
                      x509.UniformResourceIdentifier("spiffe://example.org/admin/b")], UNAUTH),
        "no-role": ([x509.UniformResourceIdentifier("spiffe://example.org/printer/p1")],
                    DENIED),
        "nested": ([x509.UniformResourceIdentifier("spiffe://example.org/admin/a/b")],
                   DENIED),
    }
    for name, (san, expected) in cases.items():
        channel = tls.channel(*tls.client_cert(tmp_path, name, san))
        assert admin_calls(channel)["GetStatus"] == expected, name
        assert ticket_calls(channel)["IssueTicket"] == expected, name
        assert health_code(channel) == OK, name


def test_the_role_map_is_configurable(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11")
    role_map = (("spiffe://{trust_domain}/gateway/*", "admin"),
                ("spiffe://{trust_domain}/admin/*", "gateway"))
    running = h.start(replace(make_config(h.state_dir),
                              tls=tls_settings(pki, role_map=role_map)))
    try:
        t = Tls(h, pki, running.address)
        assert admin_calls(t.gateway())["GetStatus"] == OK
        assert ticket_calls(t.gateway())["IssueTicket"] == DENIED
        assert ticket_calls(t.admin())["IssueTicket"] == OK
    finally:
        h.stop()


def test_admin_cli_talks_mtls(tls: Tls, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--listen", tls.address, "--tls-ca", str(tls.pki.ca_cert),
             "--tls-server-name", SERVER_NAME]
    admin = ["--tls-cert", str(tls.pki.admin_cert), "--tls-key", str(tls.pki.admin_key)]
    assert main(["status", *flags, *admin]) == 0
    assert "sealing key" in capsys.readouterr().out
    assert main(["keys", "list", "--json", *flags, *admin]) == 0
    gateway = ["--tls-cert", str(tls.pki.gateway_cert), "--tls-key", str(tls.pki.gateway_key)]
    assert main(["keys", "rotate", *flags, *gateway]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert main(["status", *flags, "--tls-cert", str(tls.pki.admin_cert)]) == 2
    assert "--tls-key" in capsys.readouterr().err


# -- the listener: TLS version, loopback rule, rotation --------------------------------------


def handshake(tls: Tls) -> tuple[x509.Certificate, str]:
    """A raw TLS handshake (ALPN h2, gateway certificate): the served certificate and the
    negotiated version."""
    context = ssl.create_default_context(cafile=str(tls.pki.ca_cert))
    context.load_cert_chain(tls.pki.gateway_cert, tls.pki.gateway_key)
    context.set_alpn_protocols(["h2"])
    host, _, port = tls.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as conn:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der), str(conn.version())


def _old_tls_handshake(tls: Tls, version: ssl.TLSVersion) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(tls.pki.ca_cert)
    context.load_cert_chain(tls.pki.gateway_cert, tls.pki.gateway_key)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")   # let this client offer what the server refuses
    context.minimum_version = version
    context.maximum_version = version
    host, _, port = tls.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as conn:
        return str(conn.version())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_3_is_preferred_1_2_accepted_older_refused(tls: Tls) -> None:
    assert handshake(tls)[1] == "TLSv1.3"
    assert _old_tls_handshake(tls, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    # the server answers a TLS 1.1 ClientHello by closing (its log: UNSUPPORTED_PROTOCOL)
    with pytest.raises(ssl.SSLError, match=r"(?i)EOF|protocol"):
        _old_tls_handshake(tls, ssl.TLSVersion.TLSv1_1)


def test_plaintext_listener_stays_on_loopback(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path / "state"),
                     server=replace(make_config(tmp_path).server, listen="0.0.0.0:0"))
    with pytest.raises(ConfigError, match=r"configure \[tls\]"):
        build_server(config)
    pki = init_dev_pki(tmp_path / "pki")
    loose = replace(config, tls=tls_settings(pki, require_client_cert=False))
    with pytest.raises(ConfigError, match=r"^server\.listen:"):
        build_server(loose)


def test_tls_without_client_certs_on_loopback_has_no_roles(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11")
    running = h.start(replace(make_config(h.state_dir),
                              tls=tls_settings(pki, require_client_cert=False)))
    try:
        t = Tls(h, pki, running.address)
        anonymous = t.channel(None, None)
        assert admin_calls(anonymous)["GetStatus"] == OK
        assert ticket_calls(anonymous)["IssueTicket"] == OK
    finally:
        h.stop()


def _rotate_server_cert(pki: DevPki, name: str) -> x509.Certificate:
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_certificate(name, key, ca, _load_key(pki.ca_key), server_san(SERVER_NAME),
                             server=True, validity=datetime.timedelta(days=2))
    write_private(pki.server_key, key_pem(key))   # key first: a handshake in between keeps
    write_public(pki.server_cert, cert_pem(cert))  # the old pair (the pair must match)
    return cert


def test_rotated_server_certificate_is_served_without_restart(tls: Tls) -> None:
    before, _ = handshake(tls)
    old_channel = tls.gateway()
    assert health_code(old_channel) == OK
    rotated = _rotate_server_cert(tls.pki, "rotated")
    after, _ = handshake(tls)
    assert after.serial_number == rotated.serial_number != before.serial_number
    running = tls.harness.running
    assert running is not None and running.tls is not None
    assert running.tls.reloads == 1
    # new and existing channels keep working
    assert ticket_calls(tls.gateway())["IssueTicket"] == OK
    assert health_code(old_channel) == OK


def test_a_broken_rotation_keeps_the_previous_certificate(tls: Tls) -> None:
    before, _ = handshake(tls)
    tls.pki.server_key.write_bytes(tls.pki.gateway_key.read_bytes())  # not the server's key
    assert handshake(tls)[0].serial_number == before.serial_number
    tls.pki.server_cert.write_text("garbage")
    assert handshake(tls)[0].serial_number == before.serial_number
    rotated = _rotate_server_cert(tls.pki, "fixed")
    assert handshake(tls)[0].serial_number == rotated.serial_number


def test_sighup_rereads_unchanged_looking_files(tls: Tls) -> None:
    running = tls.harness.running
    assert running is not None and running.tls is not None
    before, _ = handshake(tls)
    rotated = _rotate_server_cert(tls.pki, "unnoticed")
    running.tls._stamp = running.tls._stat()   # as if the change were invisible to stat()
    assert handshake(tls)[0].serial_number == before.serial_number
    running.tls.reload()       # what serve() does on SIGHUP
    assert handshake(tls)[0].serial_number == rotated.serial_number != before.serial_number


def test_rotated_client_ca_is_used_for_new_connections(tls: Tls, tmp_path: Path) -> None:
    new_ca = make_ca("next CA")
    cert, key = tls.client_cert(tmp_path, "next-gw",
                                [x509.UniformResourceIdentifier(tls.pki.gateway_uri)], new_ca)
    assert ticket_calls(tls.channel(cert, key))["IssueTicket"] == UNAVAILABLE
    old_ca = tls.pki.ca_cert.read_bytes()
    write_public(tls.pki.ca_cert, old_ca + cert_pem(new_ca[0]))  # both CAs during the overlap
    assert ticket_calls(tls.channel(cert, key))["IssueTicket"] == OK
    assert ticket_calls(tls.gateway())["IssueTicket"] == OK



# -- the admin service on its own listener ---------------------------------------------------


def test_admin_service_on_its_own_unix_socket(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    h = Harness(tmp_path / "state", "pkcs11")
    socket_path = tmp_path / "run" / "admin.sock"
    base = make_config(h.state_dir)
    config = replace(base, tls=tls_settings(pki),
                     server=replace(base.server, admin_listen=f"unix:{socket_path}"))
    running = h.start(config)
    try:
        t = Tls(h, pki, running.address)
        assert running.admin_address == f"unix:{socket_path}"
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        # the TLS listener no longer serves TicketAdmin, not even to an admin
        assert admin_calls(t.admin())["GetStatus"] == grpc.StatusCode.UNIMPLEMENTED
        assert ticket_calls(t.gateway())["IssueTicket"] == OK
        local = grpc.insecure_channel(f"unix:{socket_path}")
        h._channels.append(local)
        assert admin_calls(local)["GetStatus"] == OK
        assert ticket_calls(local)["IssueTicket"] == grpc.StatusCode.UNIMPLEMENTED
        assert health_code(local) == OK
        assert main(["status", "--listen", f"unix:{socket_path}"]) == 0
        assert "sealing key" in capsys.readouterr().out
    finally:
        h.stop()
    assert not socket_path.exists()


def test_admin_listen_must_be_local(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('[server]\nadmin_listen = "10.0.0.1:50052"\n')
    with pytest.raises(ConfigError, match=r"^server\.admin_listen: .*plaintext"):
        load_config(toml, state_dir=tmp_path)
    toml.write_text('[server]\nadmin_listen = "unix:"\n')
    with pytest.raises(ConfigError, match=r"^server\.admin_listen:"):
        load_config(toml, state_dir=tmp_path)
