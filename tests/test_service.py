"""The ticket service end to end: real SoftHSM2 token, real gRPC channel."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from tests.conftest import START, Harness, issue, redeem, sample_state

OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID
EXPIRED = authority_pb2.REDEEM_RESULT_EXPIRED
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED


def test_round_trip_returns_state_exactly(harness: Harness) -> None:
    stub = harness.tickets
    issued = issue(stub, 7)
    reply = redeem(stub, issued.ticket)
    assert reply.result == OK
    assert reply.state == sample_state(7)
    assert reply.key_id == issued.key_id
    assert reply.expires_at == issued.expires_at
    assert reply.issued_at.seconds == int(START)
    assert len(reply.ticket_id) == 40  # the consume handle: id | expiry | tag


def test_issue_reply_fields(harness: Harness) -> None:
    stub = harness.tickets
    default = issue(stub)
    assert default.lifetime_seconds == harness.config.tickets.default_lifetime
    assert default.expires_at.seconds == int(START) + default.lifetime_seconds
    assert default.ticket_lt_opaque == default.lifetime_seconds.to_bytes(4, "big") + default.ticket
    assert len(default.ticket) <= 400
    primary = harness.authority.ring.primary_id.hex()
    assert default.key_id == primary
    assert default.ticket[4:12].hex() == primary
    assert issue(stub, lifetime=60).lifetime_seconds == 60
    clamped = issue(stub, lifetime=10**9)
    assert clamped.lifetime_seconds == harness.config.tickets.max_lifetime


def test_two_tickets_for_one_state_differ(harness: Harness) -> None:
    stub = harness.tickets
    a, b = issue(stub), issue(stub)
    assert a.ticket != b.ticket
    assert redeem(stub, a.ticket).ticket_id != redeem(stub, b.ticket).ticket_id


def test_every_bit_flip_is_invalid(harness: Harness) -> None:
    stub = harness.tickets
    ticket = issue(stub).ticket
    results = set()
    for bit in range(len(ticket) * 8):
        flipped = bytearray(ticket)
        flipped[bit // 8] ^= 1 << (bit % 8)
        results.add(redeem(stub, bytes(flipped)).result)
    assert results == {INVALID}
    assert redeem(stub, ticket).result == OK


def test_every_truncation_is_invalid(harness: Harness) -> None:
    stub = harness.tickets
    ticket = issue(stub).ticket
    results = {redeem(stub, ticket[:cut]).result for cut in range(1, len(ticket))}
    results |= {redeem(stub, ticket + b"\x00").result, redeem(stub, ticket[1:]).result}
    assert results == {INVALID}


def test_garbage_and_oversized_tickets(harness: Harness) -> None:
    stub = harness.tickets
    for junk in (b"\x00", os.urandom(50), os.urandom(300), b"\x01" + bytes(300),
                 os.urandom(1024), os.urandom(4096), os.urandom(200_000)):
        assert redeem(stub, junk).result == INVALID
    with pytest.raises(grpc.RpcError) as err:
        redeem(stub, b"")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ticket" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        redeem(stub, os.urandom(harness.config.server.max_message_bytes + 1))  # over the limit
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_undecodable_request_is_invalid_argument(harness: Harness) -> None:
    channel = harness.channel()
    for method in ("RedeemTicket", "IssueTicket", "ConsumeTicket"):
        call = channel.unary_unary(f"/ticketauthority.v1.TicketAuthority/{method}")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff\x0f", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("state", "field"), [
    (None, "state"),
    (sample_state(spi_i=b"\x01" * 4), "state.spi_i"),
    (sample_state(sk_d=b"\x01" * 20), "state.sk_d"),
    (sample_state(prf_id=99), "state.prf_id"),
    (sample_state(id_i=b""), "state.id_i"),
    (sample_state(gateway_data=b"x" * 5000), "state.gateway_data"),
])
def test_bad_issue_is_invalid_argument_naming_the_field(harness: Harness, state: object,
                                                       field: str) -> None:
    request = authority_pb2.IssueTicketRequest(state=state)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as err:
        harness.tickets.IssueTicket(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


def test_expiry_follows_the_clock(harness: Harness) -> None:
    stub = harness.tickets
    issued = issue(stub, lifetime=120)
    harness.clock.advance(119)
    assert redeem(stub, issued.ticket).result == OK
    harness.clock.advance(1)
    assert redeem(stub, issued.ticket).result == EXPIRED
    assert redeem(stub, issued.ticket, consume=True).result == EXPIRED
    assert harness.authority.store.consumed_count(START) == 0  # a failed redeem changes nothing


def test_consume_then_replayed_also_after_restart(harness: Harness) -> None:
    stub = harness.tickets
    first, second = issue(stub, 1), issue(stub, 2)
    handle = redeem(stub, first.ticket).ticket_id
    consume = authority_pb2.ConsumeTicketRequest(ticket_id=handle)
    assert stub.ConsumeTicket(consume).result == OK
    assert stub.ConsumeTicket(consume).result == REPLAYED
    assert redeem(stub, first.ticket).result == REPLAYED
    assert redeem(stub, second.ticket, consume=True).result == OK
    assert redeem(stub, second.ticket, consume=True).result == REPLAYED
    harness.restart()
    stub = harness.tickets
    assert redeem(stub, first.ticket).result == REPLAYED
    assert redeem(stub, second.ticket).result == REPLAYED
    assert harness.tickets.ConsumeTicket(consume).result == REPLAYED


def test_consumed_entries_expire_with_their_tickets(harness: Harness) -> None:
    stub = harness.tickets
    for n in range(3):
        redeem(stub, issue(stub, n, lifetime=60 * (n + 1)).ticket, consume=True)
    store = harness.authority.store
    assert store.consumed_count(harness.clock.now()) == 3
    harness.clock.advance(61)
    harness.authority.maintain()
    assert store.consumed_count(harness.clock.now()) == 2
    assert store.purge_expired(harness.clock.now()) == 0  # already purged by maintenance


def test_failed_redeem_does_not_consume(harness: Harness) -> None:
    stub = harness.tickets
    ticket = issue(stub).ticket
    tampered = ticket[:-1] + bytes([ticket[-1] ^ 1])
    assert redeem(stub, tampered, consume=True).result == INVALID
    assert redeem(stub, ticket).result == OK
    assert harness.authority.store.consumed_count(START) == 0


def test_bad_consume_handle_is_invalid_argument(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.tickets.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=b"short"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("ticket_id:")


def test_health_and_reflection_are_on(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel())
    for service in ("", "ticketauthority.v1.TicketAuthority", "ticketauthority.v1.TicketAdmin"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([request]))))
    names = {s.name for s in reply.list_services_response.service}
    assert {"ticketauthority.v1.TicketAuthority", "ticketauthority.v1.TicketAdmin"} <= names


def test_status_reports_backend_and_counts(harness: Harness) -> None:
    stub = harness.tickets
    ticket = issue(stub).ticket
    redeem(stub, ticket, consume=True)
    redeem(stub, b"\x01" * 200)
    status = harness.admin.GetStatus(admin_pb2.GetStatusRequest())
    assert status.backend == harness.backend
    if harness.backend == "pkcs11":
        assert "softhsm" in status.library.lower()
        assert "ticket-authority" in status.token
    else:
        assert "swtpm" in status.library.lower() and status.token
    assert status.sealing_key_id == harness.authority.ring.primary_id.hex()
    assert status.active_keys == 1 and status.consumed_tickets == 1
    assert status.counters["issued"] == 1
    assert status.counters["redeem.ok"] == 1 and status.counters["redeem.invalid"] == 1
    assert status.counters["redeem.invalid.malformed"] == 1
    assert status.sessions >= 1
