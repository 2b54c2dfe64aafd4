"""What the bench sends: realistic resumption states (30-octet IDs, SHA-256 PRF, AES-GCM-256)
as protobuf messages for the RPCs and as ticket plaintexts for the raw device loop."""

from __future__ import annotations

import secrets
import time
from typing import Any

from authority._proto.ticketauthority.v1 import authority_pb2 as pb
from authority.state import ResumptionState
from authority.ticket_format import TICKET_ID_LEN, TicketContents, encode_contents

OK = pb.REDEEM_RESULT_OK


def state_fields(n: int) -> dict[str, Any]:
    """The fields of the ``n``-th sample state (the shape tests/conftest.py uses)."""
    return {
        "id_i": b"\x02\x00\x00\x00" + f"client-{n:06d}.vpn.example.net"[:26].encode(),
        "id_r": b"\x02\x00\x00\x00" + b"gw-a.vpn.example.net".ljust(26, b"."),
        "spi_i": (n + 1).to_bytes(8, "big"),
        "spi_r": (0xA5 << 56 | n + 1).to_bytes(8, "big"),
        "sk_d": bytes((n + i) % 256 for i in range(32)), "encr_id": 20, "encr_key_bits": 256,
        "prf_id": 5, "integ_id": 0, "dh_group": 19, "auth_method": 14,
        "gateway_data": f"session={n}".encode()}


def proto_state(n: int) -> pb.ResumptionState:
    """The ``n``-th sample state as the RPC message."""
    return pb.ResumptionState(**state_fields(n))


def issue_request(n: int) -> pb.IssueTicketRequest:
    """A unary IssueTicket request for the ``n``-th state (server default lifetime)."""
    return pb.IssueTicketRequest(state=proto_state(n))


def issue_batches(count: int, batch_size: int) -> list[pb.IssueTicketsRequest]:
    """IssueTickets requests covering ``count`` distinct states."""
    return [pb.IssueTicketsRequest(
        items=[issue_request(n) for n in range(start, min(count, start + batch_size))],
        batch_id=start // batch_size) for start in range(0, count, batch_size)]


def redeem_batches(tickets: list[bytes], batch_size: int,
                   consume: bool = False) -> list[pb.RedeemTicketsRequest]:
    """RedeemTickets requests covering ``tickets`` in order."""
    return [pb.RedeemTicketsRequest(
        items=[pb.RedeemTicketRequest(ticket=t, consume=consume)
               for t in tickets[start:start + batch_size]],
        batch_id=start // batch_size) for start in range(0, len(tickets), batch_size)]


def cycled_batches(pool: list[bytes], batch_size: int) -> list[pb.RedeemTicketsRequest]:
    """RedeemTickets requests (no consume) over ``pool``, repeating tickets when the pool is
    smaller than a batch; at least one batch."""
    count = max(1, -(-len(pool) // batch_size))
    return [pb.RedeemTicketsRequest(
        items=[pb.RedeemTicketRequest(ticket=pool[(b * batch_size + i) % len(pool)])
               for i in range(batch_size)], batch_id=b) for b in range(count)]


def ticket_plaintext(n: int) -> bytes:
    """The plaintext the sealer would seal for the ``n``-th state (for the raw device loop)."""
    now = int(time.time())
    contents = TicketContents(secrets.token_bytes(TICKET_ID_LEN), now, now + 3600,
                              ResumptionState(**state_fields(n)))
    return encode_contents(contents)


def issued_tickets(reply: pb.IssueTicketsResponse) -> tuple[list[bytes], int]:
    """The tickets of an IssueTickets reply and the number of failed items."""
    tickets = [item.ticket.ticket for item in reply.items if item.WhichOneof("outcome") == "ticket"]
    return tickets, len(reply.items) - len(tickets)


def redeemed_ok(reply: pb.RedeemTicketsResponse) -> tuple[int, int]:
    """(OK items, other items) of a RedeemTickets reply: anything but OK is a failure here,
    since the bench only redeems live tickets it issued."""
    ok = sum(1 for item in reply.items
             if item.WhichOneof("outcome") == "redeemed" and item.redeemed.result == OK)
    return ok, len(reply.items) - ok
