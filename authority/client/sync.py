"""``TicketClient``: the blocking gateway-side client (one gRPC channel, thread-safe)."""

from __future__ import annotations

import _thread
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
from authority.client.coalesce import Coalescer, Group, Lane, Outcome, Round, Rounds, Slot
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
#: what the callers of a group get when its sender is interrupted mid-RPC
_INTERRUPTED = coalesce.Failure(coalesce.Status(grpc.StatusCode.CANCELLED,
                                                "the call carrying this item was interrupted"))
#: what the callers of a group get when every deadline passed before it could be sent
_LATE = coalesce.Failure(coalesce.Status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                         "the deadline passed before the call was sent"))


class TicketClient(ClientSettings):
    """Issue, redeem and consume tickets at a ticket authority.

    ``address``: ``host:port`` (any gRPC target). ``tls``: ``ClientTls`` for TLS / mTLS; None
    means plaintext, allowed only to a loopback address. ``timeout``: the deadline of each method
    call in seconds, retries and backoff included (a method's own ``timeout`` argument overrides
    it). ``retries``: how many times an UNAVAILABLE attempt may be repeated, ``backoff`` how long
    to wait in between. ``interceptors``: ``grpc`` client interceptors (e.g. to count attempts).
    ``options``: extra gRPC channel options. ``max_batch_items``: items per batch message.
    ``coalesce_window``: seconds (default 0.0005; 0 turns coalescing off): concurrent ``issue``,
    ``redeem`` and ``consume`` calls on this client are merged into IssueTickets /
    RedeemTickets / ConsumeTickets while a call of their kind is in flight, for at most this
    long, and the calls of threads answered together that call again go together (see
    authority/client/coalesce.py); a lone call goes out at once as the unary call. Each caller
    gets its own result or error, as the unary call would give it, under its own deadline and
    the same retry rule.

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
                 max_batch_items: int = 1000,
                 coalesce_window: float = coalesce.DEFAULT_WINDOW) -> None:
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
        self._rounds = Rounds(min(self.coalesce_window, coalesce.ROUND_GRACE))
        self._hold = coalesce.HOLD_WINDOWS * self.coalesce_window
        self._lock = threading.Lock()
        self._local = threading.local()   # .round: the round this thread was answered in

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
        reply = self._merged(coalesce.CONSUME, request, timeout)
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
        self._leave_round()
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
                self._leave_round()   # not back before the sleep: no one waits for it
                time.sleep(settled)

    def _attempt(self, lane: Lane, request: Any, size: int, loop: RetryLoop) -> Outcome:
        """One attempt: alone (the lane idle) or in a group. Raises AuthorityDeadlineExceeded
        when the caller's deadline passes while it waits for its group."""
        slot = Slot(request, loop.deadline, size, coalesce.nobody)
        with self._lock:
            now = time.monotonic()
            mark = self._mark()
            ended = self._rounds.back(mark, now)
            ended = self._rounds.stalled(now) or ended   # a round no one came back to
            # back from a round of this lane that others have not come back from yet: wait
            # for them (the round's end), as a task does for the rest of its loop round
            held = mark is not None and mark.lane is lane and not mark.over
            group, opened = self._lanes.join(lane, slot, now, tick=held)
            if group is not None:
                box = slot.waiter = _Box()
                if group.full:
                    self._dispatch(group)   # goes now, maybe from this very thread
            if ended:   # the round is over: the groups held for it go now
                self._send_due(now)
        if group is None:
            try:
                return self._alone(lane, request, loop)
            finally:
                self._finished(lane)
        try:
            woken = self._wait(group, box, opened, loop.deadline)
        except BaseException:   # interrupted: nobody else may be left waiting for this caller
            self._give_up(lane, group, slot, box, _INTERRUPTED, opened)
            raise
        if woken:
            if box.slots is None:
                self._local.round = box.round
                return box.outcome
            return self._send(lane, box.slots, slot)
        outcome = self._give_up(lane, group, slot, box, _LATE, opened)
        if outcome is not None:   # delivered as the deadline passed
            return outcome
        raise AuthorityDeadlineExceeded(
            lane.unary, grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no answer within {loop.budget:g} s", max(1, loop.attempts + 1))

    def _wait(self, group: Group, box: _Box, opened: bool, deadline: float) -> bool:
        """Wait in ``group`` until this caller's box is signalled (True: it holds the outcome,
        or the group to send) or its ``deadline`` passes (False). The caller that opened the
        group watches it until it goes: it sends it off when the window is over, and ends a
        round that stalled (to whichever caller is to send each group)."""
        while opened and not group.sent:
            if box.wait(min(deadline, self._check_at(group)) - time.monotonic()):
                return box.taken()
            with self._lock:
                now = time.monotonic()
                self._rounds.stalled(now)
                self._send_due(now)
            if now >= deadline:
                return False
        return box.wait(deadline - time.monotonic()) and box.taken()

    def _check_at(self, group: Group) -> float:
        """When the opener of ``group`` looks again: when its lane's open round would stall
        (or the group has been held as long as a round may hold it), else when the group's
        window is over. Never raises."""
        stall = self._rounds.until(group.lane)
        if stall is None:
            return group.opened + self._lanes.window
        return min(stall, group.opened + self._hold)

    def _mark(self) -> Round | None:
        """The round this thread was answered in (None: none since its last call), taken: the
        thread is back. Never raises."""
        mark: Round | None = getattr(self._local, "round", None)
        if mark is not None:
            self._local.round = None
        return mark

    def _send_due(self, now: float) -> None:
        """Under the lock: each lane's open group goes if it is due (its lane idle, or its
        window over) and no round of its lane holds it (or it has been held long enough).
        Never raises."""
        for group in self._lanes.due_groups(now):
            if not self._rounds.holds(group.lane) or now >= group.opened + self._hold:
                self._dispatch(group)

    def _leave_round(self) -> None:
        """This thread makes no coalesced call next (a retry's sleep, a ``*_many`` call):
        the round it was answered in no longer waits for it. Never raises."""
        if getattr(self._local, "round", None) is not None:
            with self._lock:
                now = time.monotonic()
                if self._rounds.back(self._mark(), now):
                    self._send_due(now)

    def _give_up(self, lane: Lane, group: Group, slot: Slot, box: _Box,
                 why: Outcome, opened: bool) -> Outcome | None:
        """The caller of ``slot`` stops waiting (deadline or interrupt). Its outcome if it was
        delivered meanwhile (it wakes the next caller in its stead), else None: it leaves its
        group (which goes at once if it opened it: no one else watches it), or, if it was to
        send the group, gives each other caller ``why``. Never raises."""
        with self._lock:
            handed, chained = box.slots, box.chained
            if handed is None and not chained:
                self._lanes.abandon(slot, group)
                if opened and group.slots:
                    self._dispatch(group)
        if handed is not None:
            self._deliver(lane, handed, slot, [why] * len(handed))
            return None
        if chained:
            box.taken()
            self._local.round = box.round
            return box.outcome
        return None

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
        """A unary call of ``lane`` answered on this thread: its caller joins the round (the
        lane's open group goes when the round is over)."""
        with self._lock:
            self._local.round = self._rounds.answered(lane, 1, time.monotonic())
            self._lanes.finished(lane)

    def _dispatch(self, group: Group) -> None:
        """Under the lock: take ``group`` (unless it already went) and hand it to the caller
        that sends it, the one with the latest deadline (``coalesce.sender_of``): that caller's
        thread makes the RPC, blocking, as a unary call would (no gRPC callback thread, no
        hand-off on the way back). Never raises."""
        slots = self._lanes.take(group)
        if slots is None:
            return
        if not slots:   # every caller gone: nothing to send
            following = self._lanes.finished(group.lane)
            if following is not None and not self._rounds.holds(group.lane):
                self._dispatch(following)
            return
        slots[coalesce.sender_of(slots)].waiter.hand(slots)

    def _send(self, lane: Lane, slots: list[Slot], own: Slot) -> Outcome:
        """Send the group's items from this thread (one: the unary RPC, else the batch RPC);
        every other caller gets its outcome through its slot; ``own``'s is returned. Raises
        only what interrupts this thread (e.g. KeyboardInterrupt: the others then get
        CANCELLED)."""
        outcomes: list[Outcome] = [_INTERRUPTED] * len(slots)
        try:
            outcomes = self._outcomes(lane, slots)
        finally:
            self._deliver(lane, slots, own, outcomes)
        return outcomes[slots.index(own)]

    def _deliver(self, lane: Lane, slots: list[Slot], own: Slot,
                 outcomes: list[Outcome]) -> None:
        """Give each caller of ``slots`` but ``own`` (the sender) its outcome; they and the
        sender join the round (the lane's open group goes when it is over). The callers still
        waiting are chained and only the first is woken; each wakes the next as it wakes
        (``_Box.taken``): a batch's callers come back one after another, as the interpreter
        lock would let them run anyway, instead of all of them fighting for it at once. Never
        raises."""
        chain: list[_Box] = []
        with self._lock:
            for slot, outcome in zip(slots, outcomes, strict=True):
                if slot is not own and not slot.gone:
                    box = slot.waiter
                    box.outcome, box.chained = outcome, True
                    if chain:
                        chain[-1].next = box
                    chain.append(box)
            mark = self._rounds.answered(lane, len(chain) + 1, time.monotonic())
            for box in chain:
                box.round = mark
            self._local.round = mark
            self._lanes.finished(lane)   # the lane's open group goes when the round is over
        if chain:
            chain[0].signal()

    def _outcomes(self, lane: Lane, slots: list[Slot]) -> list[Outcome]:
        """Each caller's outcome of one blocking RPC carrying ``slots``, under the latest of
        their deadlines (the sender's). Never raises ``Exception``s (each caller gets it)."""
        count = len(slots)
        remaining = max(s.deadline for s in slots) - time.monotonic()
        if remaining <= 0:
            return [_LATE] * count
        try:
            if not lane.idempotent and not self._connected(remaining):
                return [coalesce.NOT_SENT] * count
            if count == 1:
                reply = getattr(self._stub, lane.unary)(slots[0].request, timeout=remaining)
            else:
                batch = coalesce.batch_request(lane, [s.request for s in slots],
                                               next(self._batch_ids))
                reply = getattr(self._stub, lane.batch)(batch, timeout=remaining)
        except grpc.RpcError as err:
            return [coalesce.failure_outcome(err, count, lane, self._shrink)] * count
        except Exception as exc:   # e.g. the channel was closed: each caller gets it
            return [coalesce.Raised(exc)] * count
        return coalesce.outcomes_of(lane, count, reply)

    def _shrink(self, limit: int, sent: int, lane: Lane) -> None:
        with self._lock:
            self._lanes.refused_form(limit, sent, lane)

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
    """Where a waiting caller is woken, once: with its outcome (set with ``chained``, under
    the client's lock, before the wake-up), or with the group it is to send (``hand``). A bare
    lock, acquired at birth: the cheapest wake-up a thread has."""

    __slots__ = ("_signal", "chained", "next", "outcome", "round", "slots")

    def __init__(self) -> None:
        self._signal = _thread.allocate_lock()
        self._signal.acquire()
        self.outcome: Outcome = coalesce.NOT_SENT
        self.slots: list[Slot] | None = None
        self.chained = False
        self.next: _Box | None = None   # the caller to wake after this one
        self.round: Round | None = None   # the round it was answered in

    def wait(self, timeout: float) -> bool:
        """Whether the box was signalled within ``timeout`` seconds. Never raises."""
        return self._signal.acquire(timeout=min(max(0.0, timeout), threading.TIMEOUT_MAX))

    def signal(self) -> None:
        self._signal.release()

    def hand(self, slots: list[Slot]) -> None:
        self.slots = slots
        self._signal.release()

    def taken(self) -> bool:
        """This caller has what woke it: wake the next caller of its chain (once). True."""
        following, self.next = self.next, None
        if following is not None:
            following.signal()
        return True
