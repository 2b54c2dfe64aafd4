"""The client side: one grpc.aio channel, and the calls each phase makes through it.

Echo and ticket calls go through the same channel, stubs and loops, so their rates compare.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2_grpc,
)
from authority._proto.ticketauthority.v1 import authority_pb2 as pb
from authority.bench.loops import Call
from authority.bench.workload import OK, issue_request, issued_tickets, redeemed_ok

TIMEOUT = 30.0  # seconds per call: a stuck server fails the phase instead of hanging it
_LIMIT = 16 << 20
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Client:
    """The channel and stubs of one bench run (create inside the running event loop)."""

    channel: grpc.aio.Channel
    tickets: authority_pb2_grpc.TicketAuthorityStub
    health: health_pb2_grpc.HealthStub
    admin: admin_pb2_grpc.TicketAdminStub

    @classmethod
    def connect(cls, address: str) -> Client:
        """A channel to ``address`` (plaintext loopback, like the server)."""
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", _LIMIT),
                              ("grpc.max_send_message_length", _LIMIT)])
        return cls(channel, authority_pb2_grpc.TicketAuthorityStub(channel),
                   health_pb2_grpc.HealthStub(channel), admin_pb2_grpc.TicketAdminStub(channel))

    async def status(self) -> dict[str, object]:
        """The server's backend description (TicketAdmin/GetStatus)."""
        reply = await self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=TIMEOUT)
        return {"backend": reply.backend, "library": reply.library, "token": reply.token,
                "sessions": reply.sessions, "device_processes": reply.device_processes,
                "version": reply.version}

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    # -- unary calls -----------------------------------------------------------------------

    def echo(self) -> Call:
        """grpc.health.v1.Health/Check: the baseline, through the same server machinery."""
        request = health_pb2.HealthCheckRequest()

        async def call(_: int) -> tuple[int, int]:
            reply = await self.health.Check(request, timeout=TIMEOUT)
            return (1, 0) if reply.status == SERVING else (0, 1)

        return call

    def issue(self, sink: list[bytes], keep: int) -> Call:
        """Unary IssueTicket of a distinct state per call; the first ``keep`` tickets are
        appended to ``sink`` (the pool the redeem phases cycle through)."""
        requests = [issue_request(n) for n in range(1000)]

        async def call(n: int) -> tuple[int, int]:
            reply = await self.tickets.IssueTicket(requests[n % len(requests)],
                                                   timeout=TIMEOUT)
            if len(sink) < keep and reply.ticket:
                sink.append(reply.ticket)
            return (1, 0) if reply.ticket else (0, 1)

        return call

    def redeem(self, tickets: list[bytes]) -> Call:
        """Unary RedeemTicket (no consume) cycling through ``tickets`` (which may grow)."""

        async def call(n: int) -> tuple[int, int]:
            request = pb.RedeemTicketRequest(ticket=tickets[n % len(tickets)])
            reply = await self.tickets.RedeemTicket(request, timeout=TIMEOUT)
            return (1, 0) if reply.result == OK else (0, 1)

        return call

    def redeem_batch(self, batches: list[pb.RedeemTicketsRequest]) -> Call:
        """RedeemTickets of prepared batches, cycling."""

        async def call(n: int) -> tuple[int, int]:
            return await self.redeem_request(batches[n % len(batches)])

        return call

    async def redeem_request(self, request: pb.RedeemTicketsRequest) -> tuple[int, int]:
        """One RedeemTickets call: (OK items, other items)."""
        return redeemed_ok(await self.tickets.RedeemTickets(request, timeout=TIMEOUT))

    def issue_into(self, sink: list[bytes]) -> Callable[[pb.IssueTicketsRequest],
                                                        Awaitable[tuple[int, int]]]:
        """An IssueTickets call that appends the tickets it gets to ``sink``."""

        async def call(request: pb.IssueTicketsRequest) -> tuple[int, int]:
            tickets, failed = issued_tickets(
                await self.tickets.IssueTickets(request, timeout=TIMEOUT))
            sink.extend(tickets)
            return len(tickets), failed

        return call

    def redeem_stream(self) -> Any:
        """A new RedeemTicketStream call (write batches, read one reply per batch)."""
        return self.tickets.RedeemTicketStream(timeout=TIMEOUT * 10)


def batch_items(request: Any) -> int:
    """Items in a batch request."""
    return len(request.items)
