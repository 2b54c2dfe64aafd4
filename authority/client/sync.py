"""``TicketClient``: the blocking gateway-side client (one gRPC channel, thread-safe)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

_CORE_READY = grpc.ChannelConnectivity.READY.value[0]
_NOT_CONNECTED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TicketClient(ClientSettings):
    """Issue, redeem and consume tickets at a ticket authority.

    ``address``: ``host:port`` (any gRPC target). ``tls``: ``ClientTls`` for TLS / mTLS; None
    means plaintext, allowed only to a loopback address. ``timeout``: the deadline of each method
    call in seconds, retries and backoff included (a method's own ``timeout`` argument overrides
    it). ``retries``: how many times an UNAVAILABLE attempt may be repeated, ``backoff`` how long
    to wait in between. ``interceptors``: ``grpc`` client interceptors (e.g. to count attempts).
    ``options``: extra gRPC channel options. ``max_batch_items``: items per batch message.
    ``coalesce_window``: seconds (default 0.0002; 0 turns coalescing off): concurrent ``issue``
    and ``redeem`` calls on this client are merged into IssueTickets / RedeemTickets while a
    call of their kind is in flight, for at most this long (see authority/client/coalesce.py);
    a lone call goes out at once as the unary call. Each caller gets its own result or error,
    as the unary call would give it, under its own deadline and the same retry rule.

    Retry rule (only UNAVAILABLE is ever retried; INVALID_ARGUMENT, DEADLINE_EXCEEDED and every
    other status fail at once):
      - ``issue``/``issue_many`` (a second ticket is harmless) and ``redeem``/``redeem_many``
        without consume are idempotent: retried on UNAVAILABLE, whatever its cause.
      - ``redeem(consume=True)``, ``redeem_many(consume=True)`` and ``consume`` are not: a repeat
        of a request that did reach the authority would answer REPLAYED for the caller's own
        ticket. Before each attempt the client makes sure the channel is connected (READY, else
        a health-check probe must get through); a failure to connect (nothing sent) is retried,
        an UNAVAILABLE once the request went out is not.

    Raises (constructor): PlaintextRefused (no ``tls`` and a non-loopback address), ValueError
    (bad settings or half an mTLS pair), OSError (an unreadable TLS file).
    """

    def __init__(self, address: str, tls: ClientTls | None = None, *, timeout: float = 2.0,
                 retries: int = 3, backoff: Backoff | None = None,
                 interceptors: Sequence[Any] = (), options: Sequence[tuple[str, Any]] = (),
                 max_batch_items: int = 1000, coalesce_window: float = 0.0002) -> None:
        opts = self._settle(address, tls, timeout, retries, backoff, max_batch_items, options,
                            coalesce_window)
        if tls is None:
            self._raw = grpc.insecure_channel(address, options=opts)
        else:
            self._raw = grpc.secure_channel(address, tls.credentials(), options=opts)
        self._channel = grpc.intercept_channel(self._raw, *interceptors) if interceptors \
            else self._raw
        self._stub = authority_pb2_grpc.TicketAuthorityStub(self._channel)
        self._probe = health_pb2_grpc.HealthStub(self._raw).Check
        self._batch_ids = itertools.count(1)
        self._lanes = Coalescer(self.coalesce_window, max_batch_items)
        self._lock = threading.Condition()

    # -- calls -----------------------------------------------------------------------------------

    def issue(self, state: StateLike, lifetime: int = 0, *,
              realm: str = "",
              timeout: float | None = None) -> IssuedTicket:
        """Seal ``state`` into a ticket. ``lifetime`` 0 is the server default; a longer one than
        the server's maximum is clamped. ``realm`` binds the ticket to this gateway's realm
        (with the realm's current policy epoch). Retried on UNAVAILABLE.

        Raises AuthorityRejected (INVALID_ARGUMENT naming the state field, RESOURCE_EXHAUSTED,
        ...), AuthorityUnavailable, AuthorityDeadlineExceeded; ValueError for a lifetime outside
        32 bits."""
        request = models.issue_request(state, lifetime, realm)
        reply = self._merged(coalesce.ISSUE, request, timeout)
        return models.issued_from_proto(reply)

    def redeem(self, ticket: bytes, consume: bool = False, *,
               realm: str = "",
               timeout: float | None = None) -> Redeemed:
        """Check ``ticket``; OK carries the state. A bad ticket is a result (INVALID, EXPIRED,
        REPLAYED, REVOKED), never an exception; a ticket of another ``realm`` is INVALID, and
        ``reissue`` says its key no longer seals. With ``consume`` the ticket is also marked used
        (prefer ``consume`` after the resumed IKE_AUTH verified); then UNAVAILABLE after the
        request was sent is not retried.

        Raises AuthorityRejected (INVALID_ARGUMENT for an empty ticket, ...),
        AuthorityUnavailable, AuthorityDeadlineExceeded."""
        request = authority_pb2.RedeemTicketRequest(ticket=ticket, consume=consume,
                                                   realm=realm)
        reply = self._merged(coalesce.REDEEM_CONSUME if consume else coalesce.REDEEM, request,
                             timeout)
        return models.redeemed_from_proto(reply)

    def consume(self, ticket_id: bytes, *, timeout: float | None = None) -> RedeemResult:
        """Mark the ticket behind a redeem's ``ticket_id`` used: OK the first time, REPLAYED
        after (EXPIRED once it expired). Retried only if nothing was sent.

        Raises AuthorityRejected (INVALID_ARGUMENT for a malformed id), AuthorityUnavailable,
        AuthorityDeadlineExceeded."""
        request = authority_pb2.ConsumeTicketRequest(ticket_id=ticket_id)
        reply = self._call("ConsumeTicket", request, False, timeout)
        return models.result_from_number(reply.result)

    def issue_many(self, states: Sequence[StateLike], lifetime: int = 0, *,
                   realm: str = "",
                   timeout: float | None = None) -> list[IssuedTicket | ItemError]:
        """Seal many states (IssueTickets, ``max_batch_items`` per message, ``timeout`` per
        message); results in order, a bad state gets its own ``ItemError``. Retried on
        UNAVAILABLE.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded for a whole
        message; ValueError for a lifetime outside 32 bits."""
        out: list[IssuedTicket | ItemError] = []
        for chunk in chunks(states, self.max_batch_items):
            request = models.issue_batch(chunk, lifetime, next(self._batch_ids), realm)
            out += models.issued_batch(self._call("IssueTickets", request, True, timeout))
        return out

    def redeem_many(self, tickets: Sequence[bytes], consume: bool = False, *,
                    realm: str = "",
                    timeout: float | None = None) -> list[Redeemed | ItemError]:
        """Redeem many tickets (RedeemTickets, ``max_batch_items`` per message, ``timeout`` per
        message); results in order, an empty ticket gets its own ``ItemError``. Retried as
        ``redeem`` is.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded for a whole
        message."""
        out: list[Redeemed | ItemError] = []
        for chunk in chunks(tickets, self.max_batch_items):
            request = models.redeem_batch(chunk, consume, next(self._batch_ids), realm)
            out += models.redeemed_batch(self._call("RedeemTickets", request, not consume,
                                                    timeout))
        return out

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Never raises."""
        self._raw.close()

    def __enter__(self) -> TicketClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "plaintext" if self.tls is None else ("mTLS" if self.tls.mutual else "TLS")
        return f"TicketClient({self.address}, {mode}, timeout={self.timeout}, " \
               f"retries={self.retries})"

    # -- internals -------------------------------------------------------------------------------

    def _call(self, method: str, request: Any, idempotent: bool, timeout: float | None) -> Any:
        """One client call under the retry rule (see the class docstring).

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        loop = RetryLoop(method, idempotent, self.retries, self.backoff,
                         self.timeout if timeout is None else timeout)
        rpc = getattr(self._stub, method)
        while True:
            remaining = loop.remaining()
            if not idempotent and not self._connected(remaining):
                delay = loop.not_connected("no connection to the authority (request not sent)")
            else:
                remaining = loop.remaining()
                loop.sending()
                try:
                    return rpc(request, timeout=remaining)
                except grpc.RpcError as err:
                    delay = loop.failed(err)
            time.sleep(delay)

    def _merged(self, lane: Lane, request: Any, timeout: float | None) -> Any:
        """One ``issue`` / ``redeem`` call, coalesced with concurrent ones of its lane (unary
        when coalescing is off), under the retry rule.

        Raises AuthorityRejected, AuthorityUnavailable, AuthorityDeadlineExceeded."""
        if not self.coalesce_window:
            return self._call(lane.unary, request, lane.idempotent, timeout)
        loop = RetryLoop(lane.unary, lane.idempotent, self.retries, self.backoff,
                         self.timeout if timeout is None else timeout)
        size = request.ByteSize()
        while True:
            loop.remaining()
            settled = coalesce.settle(loop, self._attempt(lane, request, size, loop))
            if isinstance(settled, coalesce.Answer):
                return settled.reply
            if settled is not None:
                time.sleep(settled)

    def _attempt(self, lane: Lane, request: Any, size: int, loop: RetryLoop) -> Outcome:
        """One attempt: alone (the lane idle) or in a group. Raises AuthorityDeadlineExceeded
        when the caller's deadline passes while it waits for its group."""
        slot = Slot(request, loop.deadline, size, coalesce.nobody)
        with self._lock:
            group, leader = self._lanes.join(lane, slot, time.monotonic())
            if group is not None:
                box = _Box()
                slot.deliver = box.put   # before anyone can take the group (under the lock)
                if group.full:
                    self._lock.notify_all()   # its leader sends it now
        if group is None:
            try:
                return self._alone(lane, request, loop)
            finally:
                self._finished(lane)
        if leader:
            self._lead(group, loop.deadline)
        if not box.done.wait(max(0.0, loop.deadline - time.monotonic())):
            with self._lock:
                self._lanes.abandon(slot, group)
            raise AuthorityDeadlineExceeded(
                lane.unary, grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {loop.budget:g} s", max(1, loop.attempts + 1))
        return box.outcome

    def _alone(self, lane: Lane, request: Any, loop: RetryLoop) -> Outcome:
        """One unary attempt, as ``_call`` makes it. Raises AuthorityDeadlineExceeded."""
        if not lane.idempotent and not self._connected(loop.remaining()):
            return coalesce.NOT_SENT
        try:
            return coalesce.Answer(getattr(self._stub, lane.unary)(request,
                                                                    timeout=loop.remaining()))
        except grpc.RpcError as err:
            return coalesce.Failure(err)

    def _finished(self, lane: Lane) -> None:
        """A call of ``lane`` answered: wake the leader of its group if the lane is idle now."""
        with self._lock:
            if self._lanes.finished(lane) is not None:
                self._lock.notify_all()

    def _lead(self, group: Group, own_deadline: float) -> None:
        """Wait (as the caller that opened ``group``) until it is due, then send it unless it
        already went."""
        with self._lock:
            while not self._lanes.due(group, now := time.monotonic()):
                self._lock.wait(group.opened + self._lanes.window - now)
            slots = self._lanes.take(group)
        if slots is not None:
            self._send(group.lane, slots, own_deadline)

    def _send(self, lane: Lane, slots: list[Slot], own_deadline: float) -> None:
        """Send the group's items (one: the unary RPC, else the batch RPC) without waiting for
        the answer; every caller gets its outcome through its slot. The connection check of a
        non-idempotent group waits at most until ``own_deadline`` (the sender's). Never
        raises."""
        if not slots:
            self._finished(lane)
            return
        now = time.monotonic()
        remaining = max(s.deadline for s in slots) - now
        try:
            if not lane.idempotent and not self._connected(max(0.0, own_deadline - now)):
                self._land(lane, slots, [coalesce.NOT_SENT] * len(slots))
                return
            if len(slots) == 1:
                future = getattr(self._stub, lane.unary).future(slots[0].request,
                                                                 timeout=remaining)
            else:
                batch = coalesce.batch_request(lane, [s.request for s in slots],
                                               next(self._batch_ids))
                future = getattr(self._stub, lane.batch).future(batch, timeout=remaining)
        except Exception as exc:   # e.g. the channel was closed: each caller gets it
            self._land(lane, slots, [coalesce.Raised(exc)] * len(slots))
            return
        future.add_done_callback(lambda done: self._answered(lane, slots, done))

    def _answered(self, lane: Lane, slots: list[Slot], future: Any) -> None:
        """The group's RPC ended: give each caller its outcome. Never raises."""
        try:
            outcomes = coalesce.outcomes_of(lane, len(slots), future.result())
        except grpc.RpcError as err:
            outcomes = [coalesce.failure_outcome(err, len(slots), self._shrink)] * len(slots)
        except Exception as exc:   # cancelled by close()
            outcomes = [coalesce.Raised(exc)] * len(slots)
        self._land(lane, slots, outcomes)

    def _land(self, lane: Lane, slots: list[Slot], outcomes: list[Outcome]) -> None:
        for slot, outcome in zip(slots, outcomes, strict=True):
            slot.deliver(outcome)
        self._finished(lane)

    def _shrink(self, limit: int, sent: int) -> None:
        with self._lock:
            self._lanes.refused_form(limit, sent)

    def _peek_ready(self) -> bool:
        """Whether the channel is READY now, without starting anything. Never raises.

        The blocking API has no public getter for the state: ``subscribe`` starts a poller
        thread that fails noisily when the channel is closed under it. This reads the state the
        way that poller does, through the channel's core object, and answers False (so the
        caller probes) if that is ever not available."""
        core = getattr(self._raw, "_channel", None)
        check = getattr(core, "check_connectivity_state", None)
        if check is None:
            return False
        try:
            return bool(check(False) == _CORE_READY)
        except Exception:
            return False

    def _connected(self, timeout: float) -> bool:
        """True when the channel is connected: READY, or a probe (a health check; any answer
        but UNAVAILABLE or DEADLINE_EXCEEDED, UNIMPLEMENTED included, proves a connection)
        got through within ``timeout``. False means nothing could have been sent. Never
        raises."""
        if self._peek_ready():
            return True
        try:
            self._probe(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return err.code() not in _NOT_CONNECTED
        return True



class _Box:
    """Where a waiting caller's outcome is put."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Outcome = coalesce.NOT_SENT

    def put(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()
