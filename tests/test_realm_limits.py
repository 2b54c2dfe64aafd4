"""``[tls.realms]``: a gateway certificate limited to its realms, over a real mTLS channel.

A gateway whose URI matches a pattern may issue and redeem only in the listed realms; another
realm is PERMISSION_DENIED for a unary call and a per-item error in a batch (the other items
still run). A gateway matching no pattern is unrestricted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.certs import GATEWAY_NAME, init_dev_pki
from authority.errors import ConfigError
from authority.settings_loader import load_config
from tests.conftest import Harness, make_config, sample_state
from tests.test_tls_roles import SERVER_NAME, Tls, tls_settings

OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID
DENIED_CODE = grpc.StatusCode.PERMISSION_DENIED.value[0]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Tls]:
    """The dev gateway may use realms "east" and "" only; other gateways are unrestricted."""
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    realms = ((f"spiffe://{{trust_domain}}/gateway/{GATEWAY_NAME}", ("east", "")),)
    h = Harness(tmp_path / "state", "pkcs11")
    running = h.start(replace(make_config(h.state_dir),
                              tls=tls_settings(pki, realms=realms)))
    yield Tls(h, pki, running.address)
    h.stop()


def _stub(channel: grpc.Channel) -> authority_pb2_grpc.TicketAuthorityStub:
    return authority_pb2_grpc.TicketAuthorityStub(channel)


def _issue(stub: authority_pb2_grpc.TicketAuthorityStub, realm: str) -> bytes:
    reply = stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state(), realm=realm),
                             timeout=10)
    return bytes(reply.ticket)


def _code(call: object, request: object) -> grpc.StatusCode:
    try:
        call(request, timeout=10)  # type: ignore[operator]
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _other_gateway(tls: Tls, tmp_path: Path) -> grpc.Channel:
    uri = f"spiffe://{tls.pki.trust_domain}/gateway/gw-free"
    return tls.channel(*tls.client_cert(tmp_path, "gw-free",
                                        [x509.UniformResourceIdentifier(uri)]))


def test_a_limited_gateway_uses_its_realms_only(limited: Tls) -> None:
    stub = _stub(limited.gateway())
    east = _issue(stub, "east")
    _issue(stub, "")
    issue_west = authority_pb2.IssueTicketRequest(state=sample_state(), realm="west")
    assert _code(stub.IssueTicket, issue_west) == grpc.StatusCode.PERMISSION_DENIED
    redeem_west = authority_pb2.RedeemTicketRequest(ticket=east, realm="west")
    assert _code(stub.RedeemTicket, redeem_west) == grpc.StatusCode.PERMISSION_DENIED
    try:
        stub.IssueTicket(issue_west, timeout=10)
    except grpc.RpcError as err:
        assert "'west'" in err.details() and limited.pki.gateway_uri in err.details()
    assert stub.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=east, realm="east"),
                             timeout=10).result == OK


def test_a_refused_redeem_changes_nothing(limited: Tls) -> None:
    stub = _stub(limited.gateway())
    east = _issue(stub, "east")
    refused = authority_pb2.RedeemTicketRequest(ticket=east, realm="west", consume=True)
    assert _code(stub.RedeemTicket, refused) == grpc.StatusCode.PERMISSION_DENIED
    again = stub.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=east, realm="east",
                                                                consume=True), timeout=10)
    assert again.result == OK


def test_batches_refuse_only_the_items_of_other_realms(limited: Tls) -> None:
    stub = _stub(limited.gateway())
    issued = stub.IssueTickets(authority_pb2.IssueTicketsRequest(items=[
        authority_pb2.IssueTicketRequest(state=sample_state(0), realm="east"),
        authority_pb2.IssueTicketRequest(state=sample_state(1), realm="west"),
        authority_pb2.IssueTicketRequest(state=sample_state(2), realm=""),
    ]), timeout=10)
    kinds = [item.WhichOneof("outcome") for item in issued.items]
    assert kinds == ["ticket", "error", "ticket"]
    assert issued.items[1].error.code == DENIED_CODE
    assert issued.items[1].error.message.startswith("items[1].realm: ")
    east, default = issued.items[0].ticket.ticket, issued.items[2].ticket.ticket
    redeemed = stub.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
        authority_pb2.RedeemTicketRequest(ticket=east, realm="west"),
        authority_pb2.RedeemTicketRequest(ticket=east, realm="east"),
        authority_pb2.RedeemTicketRequest(ticket=default, realm="east"),
        authority_pb2.RedeemTicketRequest(ticket=b"", realm="east"),
    ]), timeout=10)
    kinds = [item.WhichOneof("outcome") for item in redeemed.items]
    assert kinds == ["error", "redeemed", "redeemed", "error"]
    assert redeemed.items[0].error.code == DENIED_CODE
    assert redeemed.items[0].error.message.startswith("items[0].realm: ")
    assert redeemed.items[1].redeemed.result == OK
    assert redeemed.items[2].redeemed.result == INVALID  # a default-realm ticket in east
    assert redeemed.items[3].error.message.startswith("items[3].ticket")


def test_a_gateway_matching_no_rule_may_use_any_realm(limited: Tls, tmp_path: Path) -> None:
    stub = _stub(_other_gateway(limited, tmp_path))
    ticket = _issue(stub, "west")
    reply = stub.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=ticket, realm="west"),
                              timeout=10)
    assert reply.result == OK
    batch = stub.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
        authority_pb2.RedeemTicketRequest(ticket=ticket, realm="west")]), timeout=10)
    assert batch.items[0].redeemed.result == OK


def _write_config(tmp_path: Path, realms_table: str) -> Path:
    pki = init_dev_pki(tmp_path / "pki", server_name=SERVER_NAME)
    path = tmp_path / "authority.toml"
    path.write_text(f"""
[tls]
cert_file = "{pki.server_cert}"
key_file = "{pki.server_key}"
client_ca_file = "{pki.ca_cert}"
trust_domain = "example.org"

[tls.realms]
{realms_table}
""")
    return path


def test_the_realm_table_is_read_from_the_config_file(tmp_path: Path) -> None:
    path = _write_config(tmp_path, '"spiffe://{trust_domain}/gateway/east-*" = ["east", ""]\n'
                                   '"spiffe://{trust_domain}/gateway/*" = ["default"]')
    config = load_config(path, state_dir=tmp_path / "state")
    assert config.tls is not None
    assert config.tls.realms == (("spiffe://{trust_domain}/gateway/east-*", ("east", "")),
                                 ("spiffe://{trust_domain}/gateway/*", ("default",)))


@pytest.mark.parametrize("table, names", [
    ('"spiffe://{trust_domain}/gateway/*" = "east"', "tls.realms.spiffe"),
    ('"spiffe://{trust_domain}/gateway/*" = [1]', "tls.realms.spiffe"),
    ('"spiffe://{trust_domain}/gateway/*" = ["' + "x" * 65 + '"]', "tls.realms.spiffe"),
])
def test_a_bad_realm_table_names_the_setting(tmp_path: Path, table: str, names: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write_config(tmp_path, table), state_dir=tmp_path / "state")
    assert names in str(err.value)
