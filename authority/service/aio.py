"""The grpc.aio server (``server.mode = "aio"``, the default): one event loop in its own thread.

Measured against the thread-pool server (docs/benchmarks.md): with 16 worker threads every
device call and SQLite query drops the GIL and another worker takes it, and the hand-offs cost
more CPU than the work; on one loop the same calls run back to back.

Device work: the ticket calls run **inline** in the loop when ``server.device_calls`` is
``inline`` (``auto``: the PKCS#11 backend, whose calls take tens of microseconds), else in a
thread pool of ``server.workers`` threads (``offload``; ``auto`` for the TPM, whose calls take
milliseconds: its backend serialises them on its own worker). With device processes
(``server.device_processes``), batch calls run as plans (authority/steps.py): the loop does
their Python work and awaits only the device process. Admin calls always run in the pool (a
key generation must not stall the loop).

``AioGuard`` is the aio server's only interceptor and does, in order, what the thread-pool
server's ``ThreadGuard`` does (authority/service/guard.py): admission before the request is
read (the role check with client certificates, the caller's slot, the request deadline:
authority/service/admission.py), request decoding (an undecodable body is INVALID_ARGUMENT),
the rate limit, metrics, and error mapping (authority errors to their status, anything else
UNKNOWN with an incident id in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from authority.errors import InvalidArgument
from authority.service.admission import Gate, Wait, status_name, tick
from authority.service.handlers import Guarded, serve, shape_of
from authority.service.interceptors import (
    Stopping,
    begin_request,
    end_request,
    failure,
    mark_status,
)
from authority.steps import AsyncDevice, Plan, run_async

T = TypeVar("T")


class Runner:
    """Runs a servicer's synchronous method inline or in a thread pool."""

    def __init__(self, pool: futures.ThreadPoolExecutor, inline: bool) -> None:
        self.pool = pool
        self.inline = inline

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the loop (inline) or in the pool. Raises: what ``fn`` raises."""
        if self.inline:
            return fn(*args)
        return await self.offload(fn, *args)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the pool, in a copy of this task's context (its log lines carry
        the call's request id). Raises: what ``fn`` raises."""
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self.pool, run, fn, *args)


#: batch methods the aio server can drive as plans (authority/steps.py) on its loop
PLANS = {"IssueTickets": "issue_tickets_plan", "RedeemTickets": "redeem_tickets_plan"}

Invoke = Callable[[Any, Any], Awaitable[Any]]


def async_servicer(sync: Any, base: type, run: Callable[..., Awaitable[Any]],
                   device: AsyncDevice | None = None) -> Any:
    """An instance of ``base`` (a generated servicer class) whose methods await ``run`` on the
    methods of ``sync``, the thread-pool server's servicer. A stream method named
    ``XStream`` answers each message with ``sync.Xs`` (``RedeemTicketStream`` ->
    ``RedeemTickets``). With ``device`` (device processes), the methods in ``PLANS`` run as
    plans on the loop, awaiting only the device. Never raises."""
    methods: dict[str, Any] = {}
    for name in dir(base):
        if name.startswith("_") or not callable(getattr(base, name)):
            continue
        target = name[: -len("Stream")] + "s" if name.endswith("Stream") else name
        invoke = (_planned(getattr(sync, PLANS[target]), device)
                  if device is not None and target in PLANS else _ran(getattr(sync, target), run))
        methods[name] = (_stream_method if name.endswith("Stream") else _unary_method)(invoke)
    return type(f"Aio{type(sync).__name__}", (base,), methods)()


def _ran(fn: Callable[[Any, Any], Any], run: Callable[..., Awaitable[Any]]) -> Invoke:
    async def invoke(request: Any, context: Any) -> Any:
        return await run(fn, request, context)

    return invoke


def _planned(plan: Callable[[Any, Any], Plan[Any]], device: AsyncDevice) -> Invoke:
    async def invoke(request: Any, context: Any) -> Any:
        return await run_async(plan(request, context), device)

    return invoke


def _unary_method(invoke: Invoke) -> Any:
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await invoke(request, context)

    return call


def _stream_method(invoke: Invoke) -> Any:
    async def call(self: Any, requests: AsyncIterator[Any],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            yield await invoke(request, context)

    return call


class AioGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admission, decoding, rate limit, metrics and error mapping for every aio handler
    (authority/service/admission.py): each method is served by a request-streaming handler
    that checks the caller before it reads the request with ``context.read``."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._guarded = Guarded(self._guard)
        self._watchdog: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the watchdog task (on the server's running loop). Never raises."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        period = tick(self.gate.limits)
        while True:
            await asyncio.sleep(period)
            self.gate.expire()

    async def close(self) -> None:
        """Stop the watchdog task. Never raises."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        return self._guarded(details, await continuation(details))

    def _guard(self, method: str, handler: Any) -> Any:
        """``handler`` as a request-streaming handler behind the gate. Never raises."""
        shape = shape_of(handler)
        behavior, stream_in = shape.behavior, shape.stream_in
        if not shape.stream_out:
            return serve(shape, self._unary(method, behavior, stream_in))
        if inspect.iscoroutinefunction(behavior):   # writes through context.write (Watch)
            return serve(shape, self._writing(method, behavior, stream_in))
        return serve(shape, self._streaming(method, behavior, stream_in))

    # -- reading the request -------------------------------------------------------------

    async def _read(self, method: str, wait: Wait, context: grpc.aio.ServicerContext,
                    stream: bool) -> Any:
        """One ``context.read()`` that the watchdog may end by cancelling this task.
        Raises: RequestTimeout, ResourceExhausted (ended by the watchdog); what the read
        raises."""
        try:
            return await context.read()
        except asyncio.CancelledError:
            if not wait.expired:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            self.gate.arrived(wait)
        raise self.gate.ended(method, wait, stream)

    def _cancel(self) -> Callable[[], Any]:
        task = asyncio.current_task()
        assert task is not None
        return task.cancel

    async def _first(self, method: str, client: str, context: grpc.aio.ServicerContext,
                     holds: bool) -> Any:
        """The request of a unary-request call, read under the gate's request deadlines, and
        charged. ``holds``: the call already holds a slot.

        Raises: RequestTimeout; ResourceExhausted; InvalidArgument."""
        wait = self.gate.request(client, self._cancel(), holds)
        request = await self._read(method, wait, context, stream=False)
        if request is grpc.aio.EOF:
            raise InvalidArgument("request", "no request message")
        return self.gate.charge(method, client, request)

    async def _messages(self, method: str, client: str,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """The messages of a request stream, each within ``server.stream_idle_timeout`` of the
        previous one, each charged. Raises: RequestTimeout; InvalidArgument;
        ResourceExhausted."""
        cancel = self._cancel()
        while True:
            wait = self.gate.message(client, cancel)
            request = await self._read(method, wait, context, stream=True)
            if request is grpc.aio.EOF:
                return
            yield self.gate.charge(method, client, request)

    # -- the three shapes ----------------------------------------------------------------

    def _unary(self, method: str, behavior: Any, stream_in: bool) -> Any:
        gate, name = self.gate, method.rsplit("/", 1)[-1]

        async def call(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Observed(gate, name, context):
                client = gate.admit(method, context, holds=stream_in)
                if not stream_in:
                    request = await self._first(method, client, context, False)
                    return await behavior(request, context)
                try:
                    return await behavior(self._messages(method, client, context), context)
                finally:
                    gate.release(client)

        return call

    def _streaming(self, method: str, behavior: Any, stream_in: bool) -> Any:
        async def call(_requests: Any,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._holding(method, context) as client:
                async for response in behavior(await self._arg(method, client, context,
                                                               stream_in), context):
                    yield response

        return call

    def _writing(self, method: str, behavior: Any, stream_in: bool) -> Any:
        """A response-streaming behavior that is a coroutine writing through
        ``context.write`` (the aio health servicer's Watch), not an async generator."""
        async def call(_requests: Any, context: grpc.aio.ServicerContext) -> None:
            async with self._holding(method, context) as client:
                await behavior(await self._arg(method, client, context, stream_in), context)

        return call

    @contextlib.asynccontextmanager
    async def _holding(self, method: str,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[str]:
        """Around a response-streaming call: observed (``_Observed``), admitted holding a slot
        for its life; yields the caller's key. Raises: what ``_fail`` raises."""
        gate = self.gate
        async with _Observed(gate, method.rsplit("/", 1)[-1], context):
            client = gate.admit(method, context, holds=True)
            try:
                yield client
            finally:
                gate.release(client)

    async def _arg(self, method: str, client: str, context: grpc.aio.ServicerContext,
                   stream_in: bool) -> Any:
        """What a response-streaming behavior takes: the request stream, or the request.
        Raises: what ``_first`` raises."""
        if stream_in:
            return self._messages(method, client, context)
        return await self._first(method, client, context, True)


class _Observed:
    """Around one call's work: the call's request id set first (``begin_request``); an
    exception ends the call with the status it deserves (and raises; cancellation passes as
    it is), and the call's latency is recorded with the status it ended with."""

    __slots__ = ("_context", "_gate", "_name", "_request", "_start")

    def __init__(self, gate: Gate, name: str, context: grpc.aio.ServicerContext) -> None:
        self._gate, self._name, self._context = gate, name, context
        self._start = time.perf_counter()
        self._request = begin_request(context)

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: Any) -> None:
        """Raises: what ``_fail`` raises, for any exception."""
        code = "OK"
        try:
            if exc is not None:
                code = _code_of(exc)
                await _fail(exc, self._context)
            mark_status(self._context)   # a status the servicer set without raising
        finally:
            self._gate.observe(self._name, code, time.perf_counter() - self._start)
            end_request(self._request)


def _code_of(exc: BaseException) -> str:
    """The status name a call that raised ``exc`` ends with (for metrics). Never raises."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return status_name(exc)


async def _fail(exc: BaseException, context: grpc.aio.ServicerContext) -> NoReturn:
    """Abort the call with the status ``exc`` deserves (``interceptors.failure``; always
    raises). Cancellation and an abort already in flight are re-raised as they are; a call
    refused while the server stops is answered once its drain lets it (``Stopping``)."""
    if isinstance(exc, grpc.aio.AbortError):   # the servicer's own abort (health's NOT_FOUND)
        mark_status(context)
        raise exc
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or \
            not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, Stopping):
        await exc.wait_async()
    await context.abort(*failure(exc))
    raise AssertionError("unreachable")  # context.abort raises
