"""``AsyncTicketClient``: the asyncio gateway-side client (``grpc.aio``), the same methods and
retry rule as ``TicketClient``. Create it inside the event loop that will use it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final

import grpc
import grpc.aio

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.client import coalesce, models
from authority.client.coalesce import Coalescer, Group, Lane, Outcome, Slot
from authority.client.errors import AuthorityDeadlineExceeded
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
    ``grpc.aio`` client interceptors). ``coalesce_window`` as there: concurrent ``issue`` /
    ``redeem`` calls of tasks on this client's loop are merged into batch RPCs (on an idle lane,
    the calls made in the same round of the loop go together, without a timer; a call alone
    goes as the unary call, see authority/client/coalesce.py); a task cancelled
    while it waits for its group gets CancelledError and is left out of (or just not answered
    from) the batch, the others unaffected; a batch whose callers were all cancelled is
    cancelled.

    Raises (constructor): PlaintextRefused (no ``tls`` and a non-loopback address), ValueError
    (bad settings or half an mTLS pair), OSError (an unreadable TLS file).
    """

    def __init__(self, address: str, tls: ClientTls | None = None, *, timeout: float = 2.0,
                 retries: int = 3, backoff: Backoff | None = None,
                 interceptors: Sequence[Any] = (), options: Sequence[tuple[str, Any]] = (),
                 max_batch_items: int = 1000,
                 coalesce_window: float = coalesce.DEFAULT_WINDOW) -> None:
        opts = self._settle(address, tls, timeout, retries, backoff, max_batch_items, options,
                            coalesce_window)
        chosen = list(interceptors) or None
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=opts,
                                                      interceptors=chosen)
        else:
            self._channel = grpc.aio.secure_channel(address, tls.credentials(), options=opts,
                                                    interceptors=chosen)
        self._stub = authority_pb2_grpc.TicketAuthorityStub(self._channel)
        self._batch_ids = itertools.count(1)
        self._lanes = Coalescer(self.coalesce_window, max_batch_items)
        self._sending: set[asyncio.Task[None]] = set()

    async def issue(self, state: StateLike, lifetime: int = 0, *,
                    realm: str = "",
                    timeout: float | None = None) -> IssuedTicket:
        """As ``TicketClient.issue``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded; ValueError
        for a lifetime outside 32 bits."""
        request = models.issue_request(state, lifetime, realm)
        reply = await self._merged(coalesce.ISSUE, request, timeout)
        return models.issued_from_proto(reply)

    async def redeem(self, ticket: bytes, consume: bool = False, *,
                     realm: str = "",
                     timeout: float | None = None) -> Redeemed:
        """As ``TicketClient.redeem``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        request = authority_pb2.RedeemTicketRequest(ticket=ticket, consume=consume,
                                                   realm=realm)
        reply = await self._merged(coalesce.REDEEM_CONSUME if consume else coalesce.REDEEM,
                                   request, timeout)
        return models.redeemed_from_proto(reply)

    async def consume(self, ticket_id: bytes, *, timeout: float | None = None) -> RedeemResult:
        """As ``TicketClient.consume``.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        request = authority_pb2.ConsumeTicketRequest(ticket_id=ticket_id)
        reply = await self._merged(coalesce.CONSUME, request, timeout)
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

    async def _merged(self, lane: Lane, request: Any, timeout: float | None) -> Any:
        """One ``issue`` / ``redeem`` call, coalesced with concurrent ones of its lane (unary
        when coalescing is off), under the retry rule.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        if not self.coalesce_window:
            return await self._call(lane.unary, request, lane.idempotent, timeout)
        loop = RetryLoop(lane.unary, lane.idempotent, self.retries, self.backoff,
                         self.timeout if timeout is None else timeout)
        size = request.ByteSize()
        while True:
            loop.remaining()
            settled = coalesce.settle(loop, await self._attempt(lane, request, size, loop))
            if isinstance(settled, coalesce.Answer):
                return settled.reply
            if settled is not None:
                await asyncio.sleep(settled)

    async def _attempt(self, lane: Lane, request: Any, size: int, loop: RetryLoop) -> Outcome:
        """One attempt: alone (the lane idle) or in a group. Raises AuthorityDeadlineExceeded
        when the caller's deadline passes while it waits for its group; CancelledError."""
        slot = Slot(request, loop.deadline, size, coalesce.nobody)
        group, leader = self._lanes.join(lane, slot, time.monotonic(), tick=True)
        if group is None:
            return await self._unary(lane, request, loop)
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def deliver(outcome: Outcome) -> None:
            if not answer.done():
                answer.set_result(outcome)

        slot.deliver = deliver
        if leader and not group.tick:
            group.timer = asyncio.get_running_loop().call_later(self._lanes.window,
                                                                self._flush, group)
        if group.full:
            self._flush(group)
        try:
            if leader and group.tick and await self._after_round(group, slot):
                return await self._unary(lane, request, loop)
            return await _by_deadline(answer, loop.deadline)
        except TimeoutError:
            self._abandon(slot, group)
            raise AuthorityDeadlineExceeded(
                lane.unary, grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {loop.budget:g} s", max(1, loop.attempts + 1)) from None
        except asyncio.CancelledError:
            self._abandon(slot, group)
            raise

    async def _unary(self, lane: Lane, request: Any, loop: RetryLoop) -> Outcome:
        """A call counted in flight alone: the unary attempt, then the lane's open group goes if
        the lane is idle. Raises as ``_alone``."""
        try:
            return await self._alone(lane, request, loop)
        finally:
            self._finished(lane)

    async def _after_round(self, group: Group, slot: Slot) -> bool:
        """The opener of a ``tick`` group (``slot``'s caller): let the tasks already ready to
        run make their calls (they join the group), then send it. True when no one joined:
        the caller sends its own call, as the unary call (the group is taken, counted in
        flight). Raises CancelledError (the others still go)."""
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._lanes.abandon(slot, group)
            self._flush(group)   # the others go (none left: the lane is idle again)
            raise
        if group.sent:   # it filled up meanwhile and went
            return False
        if group.slots == [slot]:
            self._lanes.take(group)
            return True
        self._flush(group)
        return False

    def _abandon(self, slot: Slot, group: Group) -> None:
        """The caller of ``slot`` stopped waiting: leave it out of its group, or cancel the
        group's RPC if it went out and every caller of it is gone."""
        self._lanes.abandon(slot, group)
        if group.task is not None and all(s.gone for s in group.slots):
            group.task.cancel()

    async def _alone(self, lane: Lane, request: Any, loop: RetryLoop) -> Outcome:
        """One unary attempt, as ``_call`` makes it. Raises AuthorityDeadlineExceeded;
        CancelledError."""
        if not lane.idempotent and not await self._connected(loop.remaining()):
            return coalesce.NOT_SENT
        try:
            return coalesce.Answer(await getattr(self._stub, lane.unary)(
                request, timeout=loop.remaining()))
        except grpc.RpcError as err:
            return coalesce.Failure(err)

    def _finished(self, lane: Lane) -> None:
        """A call of ``lane`` answered: send its open group if the lane is idle now."""
        group = self._lanes.finished(lane)
        if group is not None:
            self._flush(group)

    def _flush(self, group: Group) -> None:
        """Send ``group`` now (a task) unless it already went."""
        if group.timer is not None:
            group.timer.cancel()
        slots = self._lanes.take(group)
        if slots is None:
            return
        task = asyncio.get_running_loop().create_task(self._send(group.lane, slots))
        group.task = task
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, lane: Lane, slots: list[Slot]) -> None:
        """Send the group's items (one: the unary RPC, else the batch RPC); every caller gets
        its outcome through its slot. Cancelled when all its callers are gone (a cancellation,
        e.g. by ``close``, reaches the callers as CancelledError). Never raises."""
        outcomes: list[Outcome] = [coalesce.NOT_SENT] * len(slots)  # what the gone are given
        try:
            if slots:
                outcomes = await self._send_slots(lane, slots)
        except grpc.RpcError as err:
            outcomes = [coalesce.failure_outcome(err, len(slots), lane,
                                                 self._lanes.refused_form)] * len(slots)
        except (Exception, asyncio.CancelledError) as exc:  # the channel closed, or all gone
            outcomes = [coalesce.Raised(exc)] * len(slots)
        finally:
            for slot, outcome in zip(slots, outcomes, strict=True):
                slot.deliver(outcome)
            self._finished(lane)

    async def _send_slots(self, lane: Lane, slots: list[Slot]) -> list[Outcome]:
        """Raises grpc.RpcError, CancelledError (all callers gone)."""
        remaining = max(s.deadline for s in slots) - time.monotonic()
        if not lane.idempotent and not await self._connected(remaining):
            return [coalesce.NOT_SENT] * len(slots)
        if len(slots) == 1:
            call = getattr(self._stub, lane.unary)(slots[0].request, timeout=remaining)
        else:
            batch = coalesce.batch_request(lane, [s.request for s in slots],
                                           next(self._batch_ids))
            call = getattr(self._stub, lane.batch)(batch, timeout=remaining)
        return coalesce.outcomes_of(lane, len(slots), await call)

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


#: what a caller's deadline timer puts in its answer future (never an outcome of a call)
_EXPIRED: Final = coalesce.Raised(TimeoutError())


async def _by_deadline(answer: asyncio.Future[Outcome], deadline: float) -> Outcome:
    """``answer``'s outcome, awaited until ``deadline`` (``time.monotonic``): one timer that
    resolves the future itself, the cheapest way the event loop has (``asyncio.timeout`` makes
    a context manager, reschedules and cancels the task). Raises TimeoutError once the deadline
    passed; CancelledError."""
    loop = asyncio.get_running_loop()
    timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), _expire, answer)
    try:
        outcome = await answer
    finally:
        timer.cancel()
    if outcome is _EXPIRED:
        raise TimeoutError
    return outcome


def _expire(answer: asyncio.Future[Outcome]) -> None:
    if not answer.done():
        answer.set_result(_EXPIRED)
