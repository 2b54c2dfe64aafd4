"""Ticket size against the format's 1024-octet cap (issue 12 point 3): the largest state the
request rules allow, with a 64-octet realm, fits a PKCS#11 ticket (AES-GCM adds 28 octets) but not
a TPM ticket (CFB + HMAC adds 48). Such an item is refused alone, before any seal, with
INVALID_ARGUMENT naming its field; the other items of the batch are sealed. Real swtpm and
SoftHSM2, real gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.errors import InvalidArgument
from authority.sealer import IssuedTicket
from authority.service import convert
from authority.ticket_format import (
    FORMAT_V1,
    FORMAT_V2_TPM,
    MAX_TICKET_LEN,
    TicketContents,
    encode_contents,
    sealed_ticket_len,
)
from tests.conftest import START, Harness, sample_state
from tests.tpm_fixtures import HAVE_PYTSS, HAVE_SWTPM, requires_tpm

REALM = "r" * 64


def big_state(gateway_data: int = 256) -> authority_pb2.ResumptionState:
    """The largest state the request rules allow: 256-octet IDs and gateway data, a 64-octet
    SK_d (PRF_HMAC_SHA2_512)."""
    return sample_state(1, id_i=b"\x02\x00\x00\x00" + b"i" * 252,
                        id_r=b"\x02\x00\x00\x00" + b"r" * 252, prf_id=7, sk_d=bytes(range(64)),
                        gateway_data=b"g" * gateway_data)


def _harness(tmp_path: Path, backend: str) -> Iterator[Harness]:
    h = Harness(tmp_path / "state", backend)
    h.start()
    yield h
    h.stop()


@pytest.fixture
def tpm_harness(tmp_path: Path) -> Iterator[Harness]:
    """A running authority on the embedded swtpm."""
    if not (HAVE_PYTSS and HAVE_SWTPM):
        pytest.skip("swtpm or tpm2-pytss not installed")
    yield from _harness(tmp_path, "tpm")


@pytest.fixture(params=["tpm", "pkcs11"])
def any_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A running authority on either backend."""
    if request.param == "tpm" and not (HAVE_PYTSS and HAVE_SWTPM):
        pytest.skip("swtpm or tpm2-pytss not installed")
    yield from _harness(tmp_path, request.param)


def _item(state: Any, realm: str = "") -> authority_pb2.IssueTicketRequest:
    return authority_pb2.IssueTicketRequest(state=state, realm=realm)


@pytest.mark.parametrize("version", [FORMAT_V1, FORMAT_V2_TPM])
@pytest.mark.parametrize(("realm", "epoch"), [("", 0), (REALM, 0), (REALM, 7)])
def test_sealed_ticket_len_is_the_real_length(version: int, realm: str, epoch: int) -> None:
    """The pure size function agrees with what a seal makes (tickets are checked against the
    backends below)."""
    state = convert.state_from_proto(_item(big_state()))
    plain = encode_contents(TicketContents(bytes(16), 1, 2, state, realm=realm,
                                           policy_epoch=epoch))
    overhead = {FORMAT_V1: 12 + 16, FORMAT_V2_TPM: 16 + 32}[version]
    assert sealed_ticket_len(version, len(plain)) == 12 + overhead + len(plain)
    with pytest.raises(ValueError, match="unknown ticket format version 9"):
        sealed_ticket_len(9, len(plain))


def test_a_big_item_fails_alone_in_a_batch(any_harness: Harness) -> None:
    """On the TPM the 64-octet-realm maximum state is INVALID_ARGUMENT for its item only; on
    PKCS#11 the same request is sealed. Every ticket made redeems OK."""
    h = any_harness
    h.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(realm=REALM))  # + 11 octets
    items = [_item(sample_state(0)), _item(big_state(), REALM), _item(sample_state(2)),
             _item(big_state(), "")]
    reply = h.tickets.IssueTickets(authority_pb2.IssueTicketsRequest(items=items, batch_id=5))
    outcomes = [item.WhichOneof("outcome") for item in reply.items]
    if h.backend == "tpm":
        assert outcomes == ["ticket", "error", "ticket", "ticket"]
        error = reply.items[1].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error.message.startswith("items[1].state: ")
        assert f"more than the {MAX_TICKET_LEN}" in error.message
    else:
        assert outcomes == ["ticket"] * 4
    for index, item in enumerate(reply.items):
        if item.WhichOneof("outcome") != "ticket":
            continue
        assert len(item.ticket.ticket) <= MAX_TICKET_LEN
        redeemed = h.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=item.ticket.ticket, realm=items[index].realm))
        assert redeemed.result == authority_pb2.REDEEM_RESULT_OK
        assert redeemed.state == items[index].state


@requires_tpm
def test_a_big_single_issue_names_its_field(tpm_harness: Harness) -> None:
    h = tpm_harness
    with pytest.raises(grpc.RpcError) as err:
        h.tickets.IssueTicket(_item(big_state(), REALM))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("state: ")
    assert h.authority.counters.snapshot().get("issued", 0) == 0


@requires_tpm
def test_the_largest_tpm_ticket_is_sealed(tpm_harness: Harness) -> None:
    """A state whose ticket is exactly 1024 octets on the TPM is sealed; one octet more is
    refused (the bound is the format's cap, not a guess)."""
    h = tpm_harness
    # the 64-octet realm and the maximum state make 1027 octets: 3 fewer of gateway data fit
    sealer = h.authority.sealer
    fits = convert.state_from_proto(_item(big_state(253)))
    too_big = convert.state_from_proto(_item(big_state(254)))
    issued, refused = sealer.issue_many([(fits, 0), (too_big, 0)], realms=[REALM, REALM])
    assert isinstance(issued, IssuedTicket)
    assert len(issued.ticket) == MAX_TICKET_LEN
    assert issued.expires_at == int(START) + h.config.tickets.default_lifetime
    assert isinstance(refused, InvalidArgument)
    assert refused.message.startswith("items[1].state: sealed ticket would be 1025 octets")
    assert sealer.redeem(issued.ticket, realm=REALM).contents is not None
