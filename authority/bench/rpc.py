"""The client side: one grpc.aio channel, and the calls each phase makes through it.

Echo and ticket calls go through the same channel, stubs and loops, so their rates compare.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
from authority.errors import StartupError

TIMEOUT = 30.0  # seconds per call: a stuck server fails the phase instead of hanging it
_LIMIT = 16 << 20
SERVING = health_pb2.HealthCheckResponse.SERVING


class _Rotating:
    """The same stub over several channels: each call is made on the next channel."""

    def __init__(self, stubs: list[Any]) -> None:
        self._next = itertools.cycle(stubs)

    def __getattr__(self, method: str) -> Any:
        return getattr(next(self._next), method)


def _channel(address: str, own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to ``address`` (plaintext loopback, like the server); ``own_connection``:
    not shared with the other channels of this process."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", _LIMIT),
                                      ("grpc.max_send_message_length", _LIMIT)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(address, options=options)


@dataclass
class Client:
    """The channel(s) and stubs of one bench run (create inside the running event loop)."""

    channel: grpc.aio.Channel
    tickets: authority_pb2_grpc.TicketAuthorityStub
    health: health_pb2_grpc.HealthStub
    admin: admin_pb2_grpc.TicketAdminStub
    others: list[grpc.aio.Channel] = field(default_factory=list)  # spread: the rest

    @classmethod
    def connect(cls, address: str) -> Client:
        """A channel to ``address`` (plaintext loopback, like the server)."""
        channel = _channel(address)
        return cls(channel, authority_pb2_grpc.TicketAuthorityStub(channel),
                   health_pb2_grpc.HealthStub(channel), admin_pb2_grpc.TicketAdminStub(channel))

    @classmethod
    async def spread(cls, address: str, count: int, replicas: int) -> Client:
        """``count`` connections of their own to ``address``, the same number to each of
        the ``replicas`` serving there (server.processes: the kernel gives each new
        connection to one replica; one that reached a replica holding its share is closed);
        calls take them in turn. A replica is told by its start time (GetStatus).

        Raises: StartupError if 20 tries per connection did not spread them evenly;
        grpc.aio.AioRpcError."""
        share = max(1, count // replicas)
        kept: dict[int, list[grpc.aio.Channel]] = {}
        for _ in range(20 * count):
            channel = _channel(address, own_connection=True)
            who = await _started_at(channel)
            if len(kept.get(who, [])) < share and (who in kept or len(kept) < replicas):
                kept.setdefault(who, []).append(channel)
                if sum(map(len, kept.values())) == count:
                    break
            else:
                await channel.close()
        channels = [c for group in kept.values() for c in group]
        if len(channels) < count:
            for channel in channels:
                await channel.close()
            raise StartupError(f"{len(channels)} of {count} connections spread over "
                               f"{len(kept)} of {replicas} replicas at {address}")
        tickets: Any = _Rotating([authority_pb2_grpc.TicketAuthorityStub(c) for c in channels])
        health: Any = _Rotating([health_pb2_grpc.HealthStub(c) for c in channels])
        return cls(channels[0], tickets, health, admin_pb2_grpc.TicketAdminStub(channels[0]),
                   channels[1:])

    async def status(self) -> dict[str, object]:
        """The server's backend description (TicketAdmin/GetStatus)."""
        reply = await self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=TIMEOUT)
        return {"backend": reply.backend, "library": reply.library, "token": reply.token,
                "sessions": reply.sessions, "device_processes": reply.device_processes,
                "version": reply.version}

    async def close(self) -> None:
        """Close the channel(s)."""
        for channel in [self.channel, *self.others]:
            await channel.close()

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


async def _started_at(channel: grpc.aio.Channel) -> int:
    """When the replica answering on ``channel`` started (GetStatus), in nanoseconds."""
    reply = await admin_pb2_grpc.TicketAdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(),
                                                                    timeout=TIMEOUT)
    return int(reply.started_at.ToNanoseconds())


def batch_items(request: Any) -> int:
    """Items in a batch request."""
    return len(request.items)
