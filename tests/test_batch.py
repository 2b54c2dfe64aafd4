"""Batch and streaming RPCs: request order, per-item results, one bad item never fails the batch,
limits. Real SoftHSM2 token, real gRPC channel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2 as pb
from tests.conftest import Harness, issue, sample_state

OK, INVALID, EXPIRED, REPLAYED = (pb.REDEEM_RESULT_OK, pb.REDEEM_RESULT_INVALID,
                                  pb.REDEEM_RESULT_EXPIRED, pb.REDEEM_RESULT_REPLAYED)


def issue_batch(stub: object, *requests: pb.IssueTicketRequest) -> pb.IssueTicketsResponse:
    return stub.IssueTickets(pb.IssueTicketsRequest(items=requests, batch_id=7))  # type: ignore[attr-defined,no-any-return]


def redeem_batch(stub: object, *items: tuple[bytes, bool]) -> list[pb.RedeemTicketsResponse.Item]:
    request = pb.RedeemTicketsRequest(items=[pb.RedeemTicketRequest(ticket=t, consume=c)
                                             for t, c in items])
    return list(stub.RedeemTickets(request).items)  # type: ignore[attr-defined]


def test_issue_batch_keeps_order_and_fails_items_alone(harness: Harness) -> None:
    reply = issue_batch(
        harness.tickets,
        pb.IssueTicketRequest(state=sample_state(1)),
        pb.IssueTicketRequest(state=sample_state(2, sk_d=b"short")),
        pb.IssueTicketRequest(),
        pb.IssueTicketRequest(state=sample_state(3), lifetime_seconds=60))
    assert reply.batch_id == 7
    kinds = [item.WhichOneof("outcome") for item in reply.items]
    assert kinds == ["ticket", "error", "error", "ticket"]
    assert reply.items[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.items[1].error.message.startswith("items[1].state.sk_d:")
    assert reply.items[2].error.message.startswith("items[2].state:")
    assert reply.items[3].ticket.lifetime_seconds == 60
    redeemed = redeem_batch(harness.tickets, (reply.items[0].ticket.ticket, False),
                            (reply.items[3].ticket.ticket, False))
    assert [r.redeemed.state for r in redeemed] == [sample_state(1), sample_state(3)]


def test_redeem_batch_mixes_every_result(harness: Harness) -> None:
    stub = harness.tickets
    good, short, replay = issue(stub, 1), issue(stub, 2, lifetime=10), issue(stub, 3)
    assert redeem_batch(stub, (replay.ticket, True))[0].redeemed.result == OK
    harness.clock.advance(10)
    tampered = good.ticket[:30] + bytes([good.ticket[30] ^ 4]) + good.ticket[31:]
    items = redeem_batch(stub, (good.ticket, False), (tampered, False), (b"", False),
                         (short.ticket, True), (replay.ticket, False), (b"\x01" * 150, False),
                         (good.ticket, True), (good.ticket, True))
    assert items[2].WhichOneof("outcome") == "error"
    assert items[2].error.message.startswith("items[2].ticket:")
    results = [i.redeemed.result for n, i in enumerate(items) if n != 2]
    assert results == [OK, INVALID, EXPIRED, REPLAYED, INVALID, OK, REPLAYED]
    assert items[0].redeemed.state == sample_state(1)
    assert items[6].redeemed.state == sample_state(1)
    assert not items[7].redeemed.HasField("state")
    assert harness.authority.store.consumed_count(harness.clock.now()) == 2


def test_batch_limits(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.config = replace(h.config, server=replace(h.config.server, max_batch_items=5))
    h.start()
    ticket = issue(h.tickets).ticket
    assert len(redeem_batch(h.tickets, *[(ticket, False)] * 5)) == 5
    with pytest.raises(grpc.RpcError) as err:
        redeem_batch(h.tickets, *[(ticket, False)] * 6)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("items:")
    with pytest.raises(grpc.RpcError) as err:
        issue_batch(h.tickets, *[pb.IssueTicketRequest(state=sample_state())] * 6)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert redeem_batch(h.tickets) == []


def test_streams_answer_each_message_in_order(harness: Harness) -> None:
    stub = harness.tickets
    issues = [pb.IssueTicketsRequest(batch_id=n, items=[
        pb.IssueTicketRequest(state=sample_state(10 * n + k)) for k in range(3)])
        for n in range(4)]
    issued = list(stub.IssueTicketStream(iter(issues)))
    assert [r.batch_id for r in issued] == [0, 1, 2, 3]
    tickets = [item.ticket.ticket for r in issued for item in r.items]
    redeems = [pb.RedeemTicketsRequest(batch_id=100 + n, items=[
        pb.RedeemTicketRequest(ticket=t) for t in tickets[3 * n:3 * n + 3]]) for n in range(4)]
    replies = list(stub.RedeemTicketStream(iter(redeems)))
    assert [r.batch_id for r in replies] == [100, 101, 102, 103]
    states = [item.redeemed.state for r in replies for item in r.items]
    assert states == [sample_state(10 * n + k) for n in range(4) for k in range(3)]


def test_a_bad_stream_message_ends_the_stream_with_invalid_argument(harness: Harness) -> None:
    channel = harness.channel()
    call = channel.stream_stream("/ticketauthority.v1.TicketAuthority/RedeemTicketStream")
    good = pb.RedeemTicketsRequest(items=[pb.RedeemTicketRequest(ticket=b"\x01" * 200)])
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([good.SerializeToString(), b"\xff\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
