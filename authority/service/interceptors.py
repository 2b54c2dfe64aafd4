"""The one place that maps errors to gRPC status codes (``failure``, for both servers' guards).

Deliberate errors carry their status (authority/errors.py), a role refusal its code. Anything
unexpected is logged with an incident id and answered UNKNOWN: a client never sees INTERNAL or a
stack trace, and a request body that is not a valid message is INVALID_ARGUMENT. A call arriving
once the server began to stop gracefully is UNAVAILABLE (``Drain``: never the gRPC core's
CANCELLED).

Every call has a request id (``begin_request``, called by both guards first): the caller's
``x-request-id`` metadata when well-formed (``REQUEST_ID_FORM``), else a new one. It is in
every log line written for the call (authority/logs.py ``REQUEST_ID``), in the call's trailing
metadata (``x-request-id``), and at the end of the details of every error status the guards
send: ``... (request id 3f2a...)``, so a gateway's error can be found in the server's log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextvars import Token
from typing import Any, NoReturn

import grpc

from authority.errors import AuthorityError
from authority.logs import REQUEST_ID
from authority.service.auth import Denied

log = logging.getLogger(__name__)

DRAIN_QUIET = 0.1   # seconds without a refused call that end a graceful stop's drain early
DRAIN_MAX = 1.0     # seconds a drain lasts at most (and never more than half the grace)
DRAIN_POLL = 0.01
HOLD_SETTLE = 0.05  # seconds refusals are held before the gRPC server's stop begins
HOLD_MAX = 1.0      # seconds a held refusal waits at most for its release
STOPPING = "the authority is stopping: retry another replica"
REQUEST_ID_KEY = "x-request-id"   # the metadata key, in both directions
#: a caller's request id we keep: 1 to 64 letters, digits, '.', '_', ':', '-' (a UUID, a
#: trace id); anything else (empty, longer, spaces, control characters) is replaced
REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Stopping(AuthorityError):
    """A call that arrived once the server began to stop gracefully. ``drain``: the drain
    holding its answer (``wait``) until the gRPC server's stop began, else None."""

    status = "UNAVAILABLE"

    def __init__(self, drain: Drain | None = None) -> None:
        super().__init__(STOPPING)
        self.drain = drain

    def wait(self) -> None:
        """Block until the answer may go (the thread-pool server). Never raises."""
        if self.drain is not None:
            self.drain.released.wait(HOLD_MAX)

    async def wait_async(self) -> None:
        """Await until the answer may go (the aio server). Never raises."""
        if self.drain is None:
            return
        deadline = time.monotonic() + HOLD_MAX
        while not self.drain.released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL)


class Drain:
    """How a graceful stop avoids CANCELLED. The gRPC core answers CANCELLED to every call not
    yet handed to a handler when the server's stop begins, and to every call arriving on a
    connection before the client read the GOAWAY that stop sends (grpc/grpc#41785). So before
    it, each guard's gate refuses new calls but health's with ``Stopping`` (UNAVAILABLE, which
    clients retry on another replica) while calls already admitted go on:

    1. ``settle``: refusals answered at once, until none came for ``quiet`` seconds (the
       clients went elsewhere) or for at most ``longest`` seconds;
    2. ``hold``: refusals held -- a caller waiting for its answer sends nothing new -- so the
       stop begins with every such call in a handler, none pending or arriving;
    3. ``release``, once the stop began (its GOAWAY sent): the held calls are answered
       UNAVAILABLE, the clients' next calls find the listener closed (UNAVAILABLE).

    One writer per attribute: the refusing threads store floats, the stopping thread flags."""

    def __init__(self, quiet: float = DRAIN_QUIET, longest: float = DRAIN_MAX) -> None:
        self.quiet = quiet
        self.longest = longest
        self.started = time.monotonic()
        self.last_refusal = self.started
        self.refused = 0
        self.holding = False
        self.released = threading.Event()

    def refusal(self) -> Stopping:
        """Count one refused call; the error to end it with. Never raises."""
        self.last_refusal = time.monotonic()
        self.refused += 1
        return Stopping(self if self.holding else None)

    def settle(self, bound: float) -> float:
        """Wait until no call was refused for ``quiet`` seconds, at most ``min(longest,
        bound)`` seconds from the start; returns the seconds the drain lasted. Never raises."""
        end = self.started + max(0.0, min(self.longest, bound))
        while True:
            now = time.monotonic()
            if now >= end or now - self.last_refusal >= self.quiet:
                return now - self.started
            time.sleep(min(DRAIN_POLL, end - now))

    def hold(self, settle: float = HOLD_SETTLE) -> None:
        """Hold refusals from now on, and give the answers already sent ``settle`` seconds to
        bring their callers' next calls in (to be held). Never raises."""
        self.holding = True
        time.sleep(settle)

    def release(self) -> None:
        """Let the held refusals go (the server's stop began). Never raises."""
        self.released.set()


def drain(gates: Sequence[Any], grace: float | None) -> tuple[Drain | None, float | None]:
    """Drain before a graceful stop of ``grace`` seconds (``Drain``): the ``gates`` (one per
    listener) refuse new calls from now on, settle within half the grace, then hold. Returns
    the drain (``release`` it once the gRPC server's stop began) and the grace left for that
    stop. ``grace`` None or 0 (stop at once): no drain. Never raises."""
    if not grace or grace <= 0:
        return None, grace
    draining = Drain()
    for gate in gates:
        gate.drain = draining
    draining.settle(grace / 2)
    if draining.refused:   # callers still call: hold them over the stop's beginning
        draining.hold()
    took = time.monotonic() - draining.started
    log.info("drained for %.2f s: %d new calls answered UNAVAILABLE", took, draining.refused)
    return draining, max(0.0, grace - took)


def request_id_of(metadata: Any) -> str:
    """The request id of a call whose invocation metadata is ``metadata`` (pairs, or None):
    its first ``x-request-id`` if well-formed, else a new one (16 random hex digits). Never
    raises."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and REQUEST_ID_FORM.fullmatch(value):
                return value
            break
    return os.urandom(8).hex()


def begin_request(context: Any) -> Token[str | None]:
    """Give the call of ``context`` (either server's) its request id: set in this context
    (every log line of the call names it) and in the call's trailing metadata. Returns what
    ``end_request`` takes. Never raises."""
    request = request_id_of(context.invocation_metadata())
    context.set_trailing_metadata(((REQUEST_ID_KEY, request),))
    return REQUEST_ID.set(request)


def end_request(token: Token[str | None]) -> None:
    """Forget the call's request id in this context (a worker thread's next call must not
    inherit it). Never raises."""
    try:
        REQUEST_ID.reset(token)
    except ValueError:   # ended in another context (a stream closed elsewhere)
        REQUEST_ID.set(None)


def with_request_id(details: str) -> str:
    """``details`` with the current call's request id appended (once); as it is outside a
    call. Never raises."""
    request = REQUEST_ID.get()
    if request is None:
        return details
    suffix = f"(request id {request})"
    if details.endswith(suffix):
        return details
    return f"{details} {suffix}" if details else suffix


def mark_status(context: Any) -> None:
    """Append the request id to the details of an error status already set on ``context``
    (a servicer's own ``abort`` or ``set_code``, e.g. health's NOT_FOUND). Never raises."""
    try:
        code = context.code()
        if code is None or code == grpc.StatusCode.OK or code == 0:
            return
        context.set_details(with_request_id(context.details() or ""))
    except Exception:   # a context that cannot say (the call is over): nothing to mark
        log.debug("cannot mark the status of a call with its request id", exc_info=True)


class _Undecodable:
    """Stands in for a request body that failed to parse."""


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable()

    return parse


def failure(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a call that raised ``exc`` ends with, for both servers: an
    authority error's own; a role refusal's (logged when PERMISSION_DENIED); anything else
    UNKNOWN with an incident id, logged with the error. Never raises."""
    if isinstance(exc, AuthorityError):
        return grpc.StatusCode[exc.status], with_request_id(exc.message)
    if isinstance(exc, Denied):
        if exc.code == grpc.StatusCode.PERMISSION_DENIED:
            log.warning("denied: %s", exc.message)
        return exc.code, with_request_id(exc.message)
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error (incident %s)", incident, exc_info=exc)
    return (grpc.StatusCode.UNKNOWN, with_request_id(
        f"unexpected server error (incident {incident}); see the server log"))


def _fail(exc: Exception, context: grpc.ServicerContext) -> NoReturn:
    """Abort the call with the status an exception deserves (``failure``); re-raise an abort
    in flight."""
    if not isinstance(exc, (AuthorityError, Denied)) and context.code() is not None:
        mark_status(context)
        raise exc   # context.abort() was already called
    context.abort(*failure(exc))
    raise AssertionError("unreachable")  # context.abort raises


#: the four kinds of method handler, in grpc's attribute names
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
