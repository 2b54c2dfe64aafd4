"""Policy binding: realm and policy epoch in the ticket (extensions), the epoch table over a real
server, wrong-realm redeems, and the reissue flag after a rotation."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.errors import InvalidTicket
from authority.ticket_format import (
    NONCE_LEN,
    TicketContents,
    decode_contents,
    decode_extensions,
    encode_contents,
    encode_extensions,
    parse_ticket,
)
from tests.conftest import Harness, sample_state
from tests.test_ticket_format import VECTOR, vector_contents, vector_state

EXT = json.loads((Path(__file__).parent / "vectors" / "ticket_v1_ext.json").read_text())

OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
EXPIRED = authority_pb2.REDEEM_RESULT_EXPIRED


# -- the format -------------------------------------------------------------------------------

def ext_contents() -> TicketContents:
    return TicketContents(bytes.fromhex(EXT["ticket_id"]), EXT["issued_at"], EXT["expires_at"],
                          vector_state(), realm=EXT["realm"], policy_epoch=EXT["policy_epoch"])


def test_extension_vector_is_pinned() -> None:
    assert encode_contents(ext_contents()).hex() == EXT["plaintext"]
    assert EXT["plaintext"].endswith("0012" + EXT["extensions"])
    ticket = bytes.fromhex(EXT["ticket"])
    parsed = parse_ticket(ticket)
    nonce, body = parsed.sealed[:NONCE_LEN], parsed.sealed[NONCE_LEN:]
    plain = AESGCM(bytes.fromhex(EXT["aes256_key"])).decrypt(nonce, body, parsed.header)
    assert decode_contents(plain) == ext_contents()


def test_ticket_without_extensions_is_default_realm_epoch_0() -> None:
    contents = decode_contents(bytes.fromhex(VECTOR["plaintext"]))
    assert (contents.realm, contents.policy_epoch, contents.extensions) == ("", 0, b"")
    assert contents == vector_contents()


def test_unknown_records_are_kept_and_known_ones_decoded() -> None:
    unknown = bytes([9, 0, 2, 0xAB, 0xCD])
    realm, epoch, others = decode_extensions(unknown + encode_extensions("red", 7))
    assert (realm, epoch, others) == ("red", 7, unknown)


@pytest.mark.parametrize("records", [
    encode_extensions("red", 0) * 2,                 # realm twice
    encode_extensions("", 5) * 2,                    # epoch twice
    bytes([1, 0, 0]),                                # empty realm
    bytes([1, 0, 65]) + b"r" * 65,                   # realm too long
    bytes([1, 0, 2]) + b"\xff\xfe",                  # realm not UTF-8
    bytes([2, 0, 4]) + bytes(4),                     # epoch not 8 octets
    bytes([2, 0, 8]) + bytes(7),                     # truncated record
    bytes([2, 0]),                                   # truncated length
])
def test_malformed_extensions_are_invalid(records: bytes) -> None:
    with pytest.raises(InvalidTicket):
        decode_extensions(records)


def test_encode_refuses_a_long_realm() -> None:
    with pytest.raises(ValueError, match="realm"):
        encode_extensions("r" * 65, 0)


# -- the epoch table over a real server -------------------------------------------------------

def issue_in(h: Harness, realm: str, n: int = 0) -> authority_pb2.IssueTicketResponse:
    return h.tickets.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state(n),
                                                                  realm=realm))


def redeem_in(h: Harness, ticket: bytes, realm: str, consume: bool = False
              ) -> authority_pb2.RedeemTicketResponse:
    return h.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=ticket, realm=realm,
                                                                    consume=consume))


def bump(h: Harness, realm: str) -> int:
    reply = h.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(realm=realm))
    assert reply.realm == realm
    return int(reply.policy_epoch)


def test_epoch_table(harness: Harness) -> None:
    h = harness
    blue0 = issue_in(h, "blue", 1).ticket
    red0 = issue_in(h, "red", 2).ticket
    default0 = issue_in(h, "", 3).ticket
    ok = redeem_in(h, blue0, "blue")
    assert (ok.result, ok.realm, ok.policy_epoch) == (OK, "blue", 0)

    # another realm's gateway sees INVALID, and the failure consumes nothing
    before = h.authority.counters.snapshot().get("redeem.invalid.realm", 0)
    for ticket, realm in ((blue0, "red"), (blue0, ""), (red0, "blue"), (default0, "blue")):
        assert redeem_in(h, ticket, realm, consume=True).result == INVALID
    assert h.authority.counters.snapshot()["redeem.invalid.realm"] == before + 4

    assert bump(h, "blue") == 1
    assert redeem_in(h, blue0, "blue").result == REVOKED
    assert redeem_in(h, blue0, "red").result == INVALID  # realm before revocation
    assert redeem_in(h, red0, "red").result == OK          # red unaffected
    assert redeem_in(h, default0, "").result == OK         # the default realm unaffected

    blue1 = issue_in(h, "blue", 4).ticket
    fresh = redeem_in(h, blue1, "blue", consume=True)
    assert (fresh.result, fresh.policy_epoch) == (OK, 1)
    assert redeem_in(h, blue1, "blue").result == authority_pb2.REDEEM_RESULT_REPLAYED

    assert bump(h, "blue") == 2 and bump(h, "") == 1
    assert redeem_in(h, blue1, "blue").result == REVOKED
    assert redeem_in(h, default0, "").result == REVOKED
    assert redeem_in(h, red0, "red").result == OK
    realms = h.admin.ListRealms(admin_pb2.ListRealmsRequest()).realms
    assert [(r.realm, r.policy_epoch) for r in realms] == [("", 1), ("blue", 2)]

    # epochs persist; REVOKED lasts until expiry, then EXPIRED
    h.restart()
    assert redeem_in(h, blue1, "blue").result == REVOKED
    assert issue_in(h, "blue").ticket and redeem_in(h, issue_in(h, "blue").ticket,
                                                    "blue").policy_epoch == 2
    h.clock.advance(3601)
    assert redeem_in(h, blue1, "blue").result == EXPIRED


def test_batch_items_carry_their_realm(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    issued = h.tickets.IssueTickets(authority_pb2.IssueTicketsRequest(items=[
        authority_pb2.IssueTicketRequest(state=sample_state(1), realm="blue"),
        authority_pb2.IssueTicketRequest(state=sample_state(2), realm="x" * 65),
        authority_pb2.IssueTicketRequest(state=sample_state(3), realm="red")]))
    assert issued.items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert issued.items[1].error.message.startswith("items[1].realm")
    blue, red = issued.items[0].ticket.ticket, issued.items[2].ticket.ticket
    redeemed = h.tickets.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
        authority_pb2.RedeemTicketRequest(ticket=blue, realm="blue"),
        authority_pb2.RedeemTicketRequest(ticket=red, realm="blue"),
        authority_pb2.RedeemTicketRequest(ticket=red, realm="red")]))
    assert [i.redeemed.result for i in redeemed.items] == [OK, INVALID, OK]
    assert [i.redeemed.realm for i in redeemed.items] == ["blue", "", "red"]


@pytest.mark.parametrize("realm", ["r" * 65, "é" * 33, "bad\nrealm"])
def test_bad_realm_is_invalid_argument(pkcs11_harness: Harness, realm: str) -> None:
    h = pkcs11_harness
    with pytest.raises(grpc.RpcError) as err:
        issue_in(h, realm)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("realm")
    with pytest.raises(grpc.RpcError) as err:
        h.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(realm=realm))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("realm")


def test_longest_realm_fits(pkcs11_harness: Harness) -> None:
    realm = "r" * 64
    ticket = issue_in(pkcs11_harness, realm).ticket
    assert redeem_in(pkcs11_harness, ticket, realm).realm == realm


# -- reissue ----------------------------------------------------------------------------------

def test_reissue_after_rotation(harness: Harness) -> None:
    h = harness
    old = issue_in(h, "blue").ticket
    first = redeem_in(h, old, "blue")
    assert first.result == OK and not first.reissue
    h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    again = redeem_in(h, old, "blue")
    assert again.result == OK and again.reissue
    new = issue_in(h, "blue").ticket
    assert not redeem_in(h, new, "blue").reissue
    assert redeem_in(h, old, "red").reissue is False  # only OK redeems say so
