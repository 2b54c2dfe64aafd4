"""Coalescing: concurrent ``issue`` / ``redeem`` / ``consume`` calls of one client merged into
batch RPCs.

The bookkeeping here is shared by ``TicketClient`` (threads, under the client's lock) and
``AsyncTicketClient`` (tasks on one loop); each client drives it with its own waiting and sending.

Lanes: calls merge only with calls of the same lane, ``IssueTicket`` (into IssueTickets),
``RedeemTicket`` without consume and ``RedeemTicket`` with consume (into RedeemTickets, consume
set on every item), so that a batch is idempotent exactly when each of its calls is, and the
retry rule stays the unary one. Realms and lifetimes are per item in the batch messages and mix
freely. ``consume(ticket_id)`` has a lane of its own (into ConsumeTickets, not idempotent); a
server without a batch RPC (UNIMPLEMENTED) makes that lane unary from then on.

When a call goes out:

- A call that finds its lane idle (nothing of its lane in flight, no group waiting) is sent at
  once as the unary RPC: a lone call never waits. In the aio client, "at once" is at the end of
  the event loop's current round (no timer: a yield to the tasks already ready to run; a gRPC
  call of grpc.aio starts in a task of its own anyway): the calls of the lane that other tasks
  make in the same round join it and go with it as one batch; a call alone goes as the unary
  RPC. (Tasks woken together, e.g. by one batch's answer, ask together.) The sync client's
  round is the threads' analogue (``Rounds``): the callers an answer of the lane woke that
  have not called again yet. A caller back from such a round while others of it are still out
  opens a group on the idle lane instead of going alone; the group goes when the last of them
  is back with its own call (it joins and goes with it), or when none came back for
  ``ROUND_GRACE`` (a caller went to do something else), whichever comes first. Any other call
  that finds its lane idle (its caller not answered in an open round) goes at once.
- A call that finds its lane busy joins the lane's open group. The group is sent (as one batch
  RPC; a group of one as the unary RPC) as soon as the lane becomes idle, or ``coalesce_window``
  seconds after the group opened, or when it is full (``max_batch_items`` items or
  ``MAX_GROUP_BYTES``), whichever comes first; in the sync client, the first two wait for the
  round, if one is open. So merging needs no waiting at low load, and the window bounds what
  waiting for calls in flight can add to any call's latency.
- A call with less than the window left before its deadline, or an item over
  ``ALONE_BYTES``, is sent at once as the unary RPC (it is never held past its deadline, and an
  oversize item cannot get the others' message refused).

Who sends: the aio client sends a group from a task of its own. The sync client has one of the
group's callers send it from its own thread, blocking, as a unary call is made (a gRPC future
would add a gRPC thread, started afresh whenever none of the channel's futures is in flight, and a
thread hand-off per answer): the caller with the latest deadline (``sender_of``), so that no one
waits past their own deadline; at the end of a round that is usually the caller whose return
ended it, so that no thread is woken to send. It then gives the others their outcomes and wakes
the first; each caller wakes the next as it wakes, so that a batch's callers come back one after
another rather than all fighting for the interpreter lock at once.

Each caller waits for its own outcome until its own deadline (a batch's deadline is the latest
of its callers'), then classifies it with its own ``RetryLoop``: an answer, the per-item
``ItemError`` as the status the unary call would have got (``items[3].`` taken off the front of
its message), the whole batch's failure, or "not sent" (a non-idempotent group found no
connection). A whole batch refused for its form (more items than the server's
``max_batch_items``, or a message over its size limit) is not the callers' error: the client
lowers its limits and the callers go again, without using an attempt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.client.transport import RetryLoop

#: the clients' default ``coalesce_window`` (seconds): at 64 callers of one TicketClient, 0.2 ms
#: sent a group every 0.2 ms while a batch was still in flight (about 5 items per batch); 0.5 ms
#: lets about twice as many join (docs/benchmarks.md (h)). A lone call never waits for it.
DEFAULT_WINDOW = 0.0005
#: the sync client's round ends when none of its callers came back for this long (seconds; at
#: most the window): one answered caller that went to do something else holds the others of
#: its round no longer than this (see ``Rounds``)
ROUND_GRACE = 0.0005
#: a group waits for a round at most this many windows after it opened (a bound, should a
#: lane's round keep being extended by calls that go alone)
HOLD_WINDOWS = 10
#: an item larger than this (serialized) is sent alone, as the unary call
ALONE_BYTES = 16 << 10
#: a group holding this many octets of items is full
MAX_GROUP_BYTES = 1 << 20
_ITEM_PREFIX = re.compile(r"^items\[\d+\]\.")
_ITEMS_LIMIT = re.compile(r"at most (\d+) items")


@dataclass(frozen=True)
class Lane:
    """Calls that may share a batch: the unary and batch RPC names and the retry rule."""

    unary: str
    batch: str
    idempotent: bool


ISSUE = Lane("IssueTicket", "IssueTickets", True)
REDEEM = Lane("RedeemTicket", "RedeemTickets", True)
REDEEM_CONSUME = Lane("RedeemTicket", "RedeemTickets", False)
CONSUME = Lane("ConsumeTicket", "ConsumeTickets", False)


# -- outcomes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """A failure status in the shape ``RetryLoop.failed`` reads (as a ``grpc.RpcError``)."""

    status: Any
    text: str

    def code(self) -> Any:
        return self.status

    def details(self) -> str:
        return self.text


@dataclass(frozen=True)
class Answer:
    """The unary-shaped reply for this caller's item."""

    reply: Any


@dataclass(frozen=True)
class Failure:
    """A failed attempt: the batch's or the unary call's error, or this item's ItemError."""

    error: Any   # has code() and details()


@dataclass(frozen=True)
class NotSent:
    """The group found no connection: nothing was sent."""


@dataclass(frozen=True)
class Resend:
    """The batch was refused for its form, not for the items: go again (no attempt used)."""


@dataclass(frozen=True)
class Raised:
    """A local exception while sending (e.g. the channel was closed)."""

    exc: BaseException


Outcome = Answer | Failure | NotSent | Resend | Raised
NOT_SENT = NotSent()
RESEND = Resend()


def nobody(outcome: Outcome) -> None:
    """The ``deliver`` of a slot that goes out alone (no one waits for it). Never raises."""


def settle(loop: RetryLoop, outcome: Outcome) -> Answer | float | None:
    """What one caller makes of its outcome: the ``Answer``, the sleep before its next attempt,
    or None to go again at once (``Resend``).

    Raises as ``RetryLoop.failed`` / ``not_connected`` do, or the ``Raised`` exception."""
    if isinstance(outcome, Answer):
        loop.sending()
        return outcome
    if isinstance(outcome, Failure):
        loop.sending()
        return loop.failed(outcome.error)
    if isinstance(outcome, NotSent):
        return loop.not_connected("no connection to the authority (request not sent)")
    if isinstance(outcome, Resend):
        return None
    raise outcome.exc


def batch_request(lane: Lane, items: list[Any], batch_id: int) -> Any:
    """The batch message of ``items`` (unary request messages). Never raises."""
    if lane is ISSUE:
        return authority_pb2.IssueTicketsRequest(items=items, batch_id=batch_id)
    if lane is CONSUME:
        return authority_pb2.ConsumeTicketsRequest(items=items, batch_id=batch_id)
    return authority_pb2.RedeemTicketsRequest(items=items, batch_id=batch_id)


def split_reply(lane: Lane, reply: Any, count: int) -> list[Outcome]:
    """Each item's outcome from a batch reply, in request order. Never raises (a reply with the
    wrong number of items fails every caller with INTERNAL)."""
    if len(reply.items) != count:
        bad = Failure(Status(grpc.StatusCode.INTERNAL,
                             f"the authority answered {len(reply.items)} items for {count}"))
        return [bad] * count
    kind = "ticket" if lane is ISSUE else "consumed" if lane is CONSUME else "redeemed"
    return [Answer(getattr(item, kind)) if item.HasField(kind) else Failure(item_status(item.error))
            for item in reply.items]


def item_status(error: Any) -> Status:
    """An ``ItemError`` message as the status the unary call would have failed with (its
    message without the ``items[N].`` prefix, so it names the field as the unary one does).
    Never raises."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code),
                grpc.StatusCode.UNKNOWN)
    return Status(code, _ITEM_PREFIX.sub("", error.message))


#: ``form_refusal`` of a server that lacks the batch RPC: that lane goes unary from now on
UNARY_ONLY = -1


def form_refusal(err: Any) -> int | None:
    """For a whole batch refused for its form (too many items for the server, or a message over
    its size limit): the most items to send from now on (0: unknown, halve); ``UNARY_ONLY`` when
    the server does not have the batch RPC (nothing was done: each call goes again alone). None
    for any other failure. Never raises."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNIMPLEMENTED:   # a server without this batch RPC (older)
        return UNARY_ONLY
    if code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("items:"):
        found = _ITEMS_LIMIT.search(details)
        return int(found.group(1)) if found else 0
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return 0
    return None


# -- groups --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Slot:
    """One caller's item. ``deliver`` is called once with its outcome by whoever sent it (aio
    client; the sync client wakes the caller through ``waiter``); ``gone`` once the caller
    stopped waiting (deadline passed, cancelled or interrupted)."""

    request: Any
    deadline: float
    size: int
    deliver: Callable[[Outcome], None]
    gone: bool = False
    waiter: Any = None   # the sync client's box (where its caller waits)


@dataclass(eq=False)
class Group:
    """The calls of one lane waiting to go out together."""

    lane: Lane
    opened: float
    slots: list[Slot] = field(default_factory=list)
    size: int = 0
    full: bool = False
    sent: bool = False
    tick: bool = False  # opened on an idle lane: goes at the end of the loop's round (aio)
    timer: Any = None   # the aio client's window timer
    task: Any = None    # the aio client's sending task


@dataclass
class _LaneState:
    in_flight: int = 0
    open: Group | None = None
    unary_only: bool = False   # the server lacks this lane's batch RPC


class Coalescer:
    """The lanes of one client: what is in flight, which group is open. Not thread-safe: the
    sync client holds its lock around every call; the aio client uses it from its loop only."""

    def __init__(self, window: float, max_items: int) -> None:
        self.window = window
        self.max_items = max_items
        self.max_bytes = MAX_GROUP_BYTES
        self._lanes: dict[Lane, _LaneState] = {}

    def join(self, lane: Lane, slot: Slot, now: float,
             tick: bool = False) -> tuple[Group | None, bool]:
        """Enter a call: (None, False) to send it at once as the unary call (the lane now counts
        it in flight; call ``finished`` after), else (its group, whether it opened the group).
        ``tick``: a call that finds its lane idle opens a group all the same, marked ``tick``,
        which goes at the end of the round (the aio client: its opener ``take``s it after one
        yield; the sync client: while a ``Rounds`` round is open). Never raises."""
        state = self._lanes.setdefault(lane, _LaneState())
        alone = (slot.size > ALONE_BYTES or slot.deadline - now <= self.window
                 or self.max_items < 2 or state.unary_only)
        idle = state.in_flight == 0 and state.open is None
        if alone or (idle and not tick):
            state.in_flight += 1
            return None, False
        group, opened = state.open, False
        if group is None:
            group, opened = Group(lane, now, tick=idle), True
            state.open = group
        group.slots.append(slot)
        group.size += slot.size
        if len(group.slots) >= self.max_items or group.size >= self.max_bytes:
            group.full = True
            state.open = None
        return group, opened

    def due(self, group: Group, now: float) -> bool:
        """Whether ``group`` should go out now (or already went). Never raises."""
        state = self._lanes[group.lane]
        return (group.sent or group.full or state.in_flight == 0
                or now >= group.opened + self.window)

    def take(self, group: Group) -> list[Slot] | None:
        """Mark ``group`` sent and counted in flight; its callers still waiting, or None if it
        was already taken (then nothing is counted). Never raises."""
        if group.sent:
            return None
        group.sent = True
        state = self._lanes[group.lane]
        if state.open is group:
            state.open = None
        state.in_flight += 1
        return [s for s in group.slots if not s.gone]

    def due_groups(self, now: float) -> list[Group]:
        """The open groups that are ``due``. Never raises."""
        return [state.open for state in self._lanes.values()
                if state.open is not None and self.due(state.open, now)]

    def finished(self, lane: Lane) -> Group | None:
        """A unary call or a batch of ``lane`` answered: the open group if the lane is now
        idle (it is due), else None. Never raises."""
        state = self._lanes[lane]
        state.in_flight -= 1
        return state.open if state.in_flight == 0 else None

    def abandon(self, slot: Slot, group: Group) -> None:
        """The caller of ``slot`` stopped waiting: leave it out of ``group`` if not yet sent.
        Never raises."""
        slot.gone = True
        if not group.sent and slot in group.slots:
            group.slots.remove(slot)
            group.size -= slot.size

    def refused_form(self, limit: int, sent: int, lane: Lane) -> None:
        """The server refused a batch of ``sent`` items of ``lane`` for its form: send at most
        ``limit`` items from now on (0: half of ``sent``), and half as many octets; for
        ``UNARY_ONLY``, only ``lane``'s calls go alone from now on. Never raises."""
        if limit == UNARY_ONLY:
            self._lanes.setdefault(lane, _LaneState()).unary_only = True
            return
        self.max_items = max(1, min(self.max_items, limit or sent // 2, sent - 1))
        self.max_bytes = max(ALONE_BYTES, self.max_bytes // 2)


@dataclass(eq=False)
class Round:
    """Callers of ``lane`` answered (by one RPC's answer or several) that are not back in the
    client yet: ``pending`` of them; ``progress`` when one last came back or was answered;
    ``over`` once ended (a caller still marked with it is then no longer waited for)."""

    lane: Lane
    pending: int = 0
    progress: float = 0.0
    over: bool = False


class Rounds:
    """The sync client's rounds, one per lane: the threads' analogue of a round of the event
    loop.

    When an RPC answers, its callers (the sender too) go back to their own code: threads that
    may call again at once. While some of them have not come back (called the client again,
    on any lane, or gone to a retry's sleep), their lane's round is open: one of them that
    calls again on the idle lane opens a group instead of going alone (``Coalescer.join``'s
    ``tick``), and the lane's groups wait for the round, so that the callers of one answer that
    call again go together, as tasks woken by one answer do. The round ends when the last of
    them comes back (its call joins the group, which then goes), or when none has come back for
    ``grace`` seconds (a caller went to do something else). A caller not answered in the open
    round (a new thread, or one back after its round ended) that finds the lane idle goes alone
    at once. Not thread-safe: the sync client holds its lock around every call."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._open: dict[Lane, Round] = {}

    def answered(self, lane: Lane, count: int, now: float) -> Round:
        """``count`` callers of ``lane`` were just answered: its open round, extended by them.
        Never raises."""
        current = self._open.get(lane)
        if current is None:
            current = self._open[lane] = Round(lane)
        current.pending += count
        current.progress = now
        return current

    def back(self, mark: Round | None, now: float) -> bool:
        """A caller answered in round ``mark`` (None: none) calls again: True when it was the
        last of that round (which is then over). Never raises."""
        if mark is None or mark.over:
            return False
        mark.pending -= 1
        mark.progress = now
        if mark.pending > 0:
            return False
        self._end(mark)
        return True

    def stalled(self, now: float) -> bool:
        """End the rounds that had no caller back for ``grace`` seconds; whether there were
        any. Never raises."""
        stale = [r for r in self._open.values() if now >= r.progress + self.grace]
        for current in stale:
            self._end(current)
        return bool(stale)

    def holds(self, lane: Lane) -> bool:
        """Whether a round of ``lane`` is open. Never raises."""
        return lane in self._open

    def until(self, lane: Lane) -> float | None:
        """When the open round of ``lane`` stalls unless a caller comes back (None: no round).
        Never raises."""
        current = self._open.get(lane)
        return None if current is None else current.progress + self.grace

    def _end(self, current: Round) -> None:
        current.over = True
        self._open.pop(current.lane, None)


def sender_of(slots: list[Slot]) -> int:
    """The index of the slot whose caller should send ``slots`` when one of the callers makes
    the RPC itself (the sync client): the latest deadline, which is the batch's, so the sender
    never waits past its own deadline; of equal ones the last to join. Raises ValueError for no
    slots."""
    latest = max(slot.deadline for slot in slots)
    return max(i for i, slot in enumerate(slots) if slot.deadline == latest)


def outcomes_of(lane: Lane, count: int, reply: Any) -> list[Outcome]:
    """The outcomes of ``count`` callers sent together: the reply itself for one (sent as the
    unary call), else the batch reply split. Never raises."""
    return [Answer(reply)] if count == 1 else split_reply(lane, reply, count)


def failure_outcome(err: Any, count: int, lane: Lane,
                    shrink: Callable[[int, int, Lane], None]) -> Outcome:
    """The outcome every caller of a failed send gets: ``Resend`` (after ``shrink``) for a batch
    refused for its form, else the failure itself. Never raises."""
    limit = form_refusal(err) if count > 1 else None
    if limit is not None:
        shrink(limit, count, lane)
        return RESEND
    return Failure(err)
