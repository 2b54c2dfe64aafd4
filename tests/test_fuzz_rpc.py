"""Hostile input against the running service: whatever a client sends, the answer is a result or
INVALID_ARGUMENT, never INTERNAL or UNKNOWN, and the server keeps serving."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from tests.conftest import Harness, issue, redeem, sample_state

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION}
METHODS = ["/ticketauthority.v1.TicketAuthority/IssueTicket",
           "/ticketauthority.v1.TicketAuthority/RedeemTicket",
           "/ticketauthority.v1.TicketAuthority/ConsumeTicket",
           "/ticketauthority.v1.TicketAdmin/ListKeys",
           "/ticketauthority.v1.TicketAdmin/RetireKey",
           "/ticketauthority.v1.TicketAdmin/GetStatus"]


def call_raw(channel: grpc.Channel, method: str, body: bytes) -> grpc.StatusCode:
    try:
        channel.unary_unary(method)(body, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@FUZZ
@given(method=st.sampled_from(METHODS), body=st.binary(max_size=2048))
def test_raw_bytes_to_every_method(harness: Harness, method: str, body: bytes) -> None:
    assert call_raw(harness.channel(), method, body) in ACCEPTABLE


ids = st.binary(max_size=300)
ints = st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1))


@FUZZ
@given(id_i=ids, id_r=ids, spi_i=st.binary(max_size=10), spi_r=st.binary(max_size=10),
       sk_d=st.binary(max_size=70), encr_id=ints, encr_key_bits=ints, prf_id=ints,
       integ_id=ints, dh_group=ints, auth_method=ints, gateway_data=st.binary(max_size=300),
       lifetime=ints)
def test_structured_issue_requests(harness: Harness, lifetime: int, **fields: object) -> None:
    request = authority_pb2.IssueTicketRequest(state=authority_pb2.ResumptionState(**fields),
                                               lifetime_seconds=lifetime)
    stub = harness.tickets
    try:
        issued = stub.IssueTicket(request, timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("state.")
        return
    reply = redeem(stub, issued.ticket)
    assert reply.result == authority_pb2.REDEEM_RESULT_OK
    assert reply.state == request.state


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.integers(0, 10_000), extra=st.binary(max_size=64))
def test_mutated_tickets_are_invalid(harness: Harness, edits: list[tuple[int, int]], cut: int,
                                     extra: bytes) -> None:
    stub = harness.tickets
    original = issue(stub).ticket
    ticket = bytearray(original)
    for position, value in edits:
        ticket[position % len(ticket)] = value
    mutated = bytes(ticket[: max(1, cut % (len(ticket) + 1))]) + extra
    expected = authority_pb2.REDEEM_RESULT_OK if mutated == original else \
        authority_pb2.REDEEM_RESULT_INVALID
    assert redeem(stub, mutated).result == expected


def test_server_still_serves_after_the_fuzzing(harness: Harness) -> None:
    channel = harness.channel()
    for body in (b"\x0a\xff\xff\xff\xff\x0f", b"\x12" * 100, bytes(range(256))):
        for method in METHODS:
            assert call_raw(channel, method, body) in ACCEPTABLE
    rotate = channel.unary_unary("/ticketauthority.v1.TicketAdmin/RotateKey")
    rotate(b"\x08\x01\x12\x03abc", timeout=10)  # unknown fields are ignored, as proto3 says
    assert harness.admin.ListKeys(admin_pb2.ListKeysRequest()).keys
    issued = harness.tickets.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state()))
    assert redeem(harness.tickets, issued.ticket).state == sample_state()
