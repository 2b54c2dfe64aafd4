"""``AsyncTicketClient``: the asyncio gateway-side client (``grpc.aio``), the same methods and
retry rule as ``TicketClient``. Create it inside the event loop that will use it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.client import models
from authority.client.models import IssuedTicket, ItemError, Redeemed, RedeemResult, StateLike
from authority.client.transport import (
    Backoff,
    ClientSettings,
    ClientTls,
    RetryLoop,
    chunks,
)

_READY = grpc.ChannelConnectivity.READY
_FAILED = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


class AsyncTicketClient(ClientSettings):
    """Issue, redeem and consume tickets at a ticket authority from asyncio code.

    Arguments, retry rule and exceptions as ``TicketClient`` (``interceptors`` are
    ``grpc.aio`` client interceptors).

    Raises (constructor): PlaintextRefused (no ``tls`` and a non-loopback address), ValueError
    (bad settings or half an mTLS pair), OSError (an unreadable TLS file).
    """

    def __init__(self, address: str, tls: ClientTls | None = None, *, timeout: float = 2.0,
                 retries: int = 3, backoff: Backoff | None = None,
                 interceptors: Sequence[Any] = (), options: Sequence[tuple[str, Any]] = (),
                 max_batch_items: int = 1000) -> None:
        opts = self._settle(address, tls, timeout, retries, backoff, max_batch_items, options)
        chosen = list(interceptors) or None
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=opts,
                                                      interceptors=chosen)
        else:
            self._channel = grpc.aio.secure_channel(address, tls.credentials(), options=opts,
                                                    interceptors=chosen)
        self._stub = authority_pb2_grpc.TicketAuthorityStub(self._channel)
        self._batch_ids = itertools.count(1)

    async def issue(self, state: StateLike, lifetime: int = 0, *,
                    realm: str = "",
                    timeout: float | None = None) -> IssuedTicket:
        """As ``TicketClient.issue``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded; ValueError
        for a lifetime outside 32 bits."""
        request = models.issue_request(state, lifetime, realm)
        reply = await self._call("IssueTicket", request, True, timeout)
        return models.issued_from_proto(reply)

    async def redeem(self, ticket: bytes, consume: bool = False, *,
                     realm: str = "",
                     timeout: float | None = None) -> Redeemed:
        """As ``TicketClient.redeem``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        request = authority_pb2.RedeemTicketRequest(ticket=ticket, consume=consume,
                                                   realm=realm)
        reply = await self._call("RedeemTicket", request, not consume, timeout)
        return models.redeemed_from_proto(reply)

    async def consume(self, ticket_id: bytes, *, timeout: float | None = None) -> RedeemResult:
        """As ``TicketClient.consume``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        request = authority_pb2.ConsumeTicketRequest(ticket_id=ticket_id)
        reply = await self._call("ConsumeTicket", request, False, timeout)
        return models.result_from_number(reply.result)

    async def issue_many(self, states: Sequence[StateLike], lifetime: int = 0, *,
                         realm: str = "",
                         timeout: float | None = None) -> list[IssuedTicket | ItemError]:
        """As ``TicketClient.issue_many``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded; ValueError
        for a lifetime outside 32 bits."""
        out: list[IssuedTicket | ItemError] = []
        for chunk in chunks(states, self.max_batch_items):
            request = models.issue_batch(chunk, lifetime, next(self._batch_ids), realm)
            out += models.issued_batch(await self._call("IssueTickets", request, True, timeout))
        return out

    async def redeem_many(self, tickets: Sequence[bytes], consume: bool = False, *,
                          realm: str = "",
                          timeout: float | None = None) -> list[Redeemed | ItemError]:
        """As ``TicketClient.redeem_many``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        out: list[Redeemed | ItemError] = []
        for chunk in chunks(tickets, self.max_batch_items):
            request = models.redeem_batch(chunk, consume, next(self._batch_ids), realm)
            out += models.redeemed_batch(await self._call("RedeemTickets", request, not consume,
                                                          timeout))
        return out

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Never raises."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncTicketClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        mode = "plaintext" if self.tls is None else ("mTLS" if self.tls.mutual else "TLS")
        return f"AsyncTicketClient({self.address}, {mode}, timeout={self.timeout}, " \
               f"retries={self.retries})"

    async def _call(self, method: str, request: Any, idempotent: bool,
                    timeout: float | None) -> Any:
        """One client call under the retry rule (see ``TicketClient``).

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        loop = RetryLoop(method, idempotent, self.retries, self.backoff,
                         self.timeout if timeout is None else timeout)
        rpc = getattr(self._stub, method)
        while True:
            remaining = loop.remaining()
            if not idempotent and not await self._connected(remaining):
                delay = loop.not_connected("no connection to the authority (request not sent)")
            else:
                remaining = loop.remaining()
                loop.sending()
                try:
                    return await rpc(request, timeout=remaining)
                except grpc.RpcError as err:
                    delay = loop.failed(err)
            await asyncio.sleep(delay)

    async def _connected(self, timeout: float) -> bool:
        """Wait until the channel is READY (True), fails to connect or ``timeout`` passes
        (False). Never raises (but lets cancellation through)."""
        try:
            async with asyncio.timeout(timeout):
                state = self._channel.get_state(try_to_connect=True)
                while state != _READY:
                    if state in _FAILED:
                        return False
                    await self._channel.wait_for_state_change(state)
                    state = self._channel.get_state(try_to_connect=True)
        except TimeoutError:
            return False
        return True
