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
server's interceptors do: request decoding (an undecodable body is INVALID_ARGUMENT), the role
check (with client certificates), the rate limit, metrics, and error mapping (authority errors
to their status, anything else UNKNOWN with an incident id in the log).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from authority.errors import AuthorityError, InvalidArgument, ResourceExhausted
from authority.metrics import Metrics
from authority.service.auth import HEALTH_PREFIX, Denied, RoleMap, authorize
from authority.service.interceptors import _Undecodable, rewrap
from authority.service.ratelimit import TokenBuckets, _cost, client_key
from authority.steps import AsyncDevice, Plan, run_async

log = logging.getLogger(__name__)

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
        """``fn(*args)`` in the pool. Raises: what ``fn`` raises."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


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
    """Decoding, roles, rate limit, metrics and error mapping for every aio handler."""

    def __init__(self, metrics: Metrics, roles: RoleMap | None = None,
                 buckets: TokenBuckets | None = None) -> None:
        self._histogram = metrics.rpc_seconds
        self._children: dict[tuple[str, str], Any] = {}  # labels() is slow: one per pair
        self._roles = roles
        self._buckets = buckets

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        return rewrap(handler, lambda behavior, stream_in, stream_out: (
            self._streaming if stream_out else self._unary)(method, behavior, stream_in),
            safe_decoding=True)

    def _observe(self, method: str, code: str, seconds: float) -> None:
        child = self._children.get((method, code))
        if child is None:
            child = self._children[(method, code)] = self._histogram.labels(method, code)
        child.observe(seconds)

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Raises: Denied (role)."""
        if self._roles is not None:
            authorize(self._roles, method, context)

    def _charge(self, method: str, context: grpc.aio.ServicerContext, request: Any) -> Any:
        """Returns ``request`` once it decoded and the caller's bucket paid for it.
        Raises: AuthorityError (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)."""
        if isinstance(request, _Undecodable):
            raise InvalidArgument("request", "not a valid message")
        if self._buckets is not None and not method.startswith(HEALTH_PREFIX):
            refused = self._buckets.refusal(client_key(context), _cost(request), method)
            if refused is not None:
                raise ResourceExhausted(refused)
        return request

    def _arguments(self, method: str, context: grpc.aio.ServicerContext, request: Any,
                   stream_in: bool) -> Any:
        """Admit the caller, then the request (or a metered request stream) for the behavior.
        Raises: Denied; AuthorityError (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)."""
        self._admit(method, context)
        if stream_in:
            return self._metered(method, context, request)
        return self._charge(method, context, request)

    def _metered(self, method: str, context: grpc.aio.ServicerContext,
                 requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async def each() -> AsyncIterator[Any]:
            async for request in requests:
                yield self._charge(method, context, request)

        return each()

    def _unary(self, method: str, behavior: Any, stream_in: bool) -> Any:
        name = method.rsplit("/", 1)[-1]

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, code = time.perf_counter(), "OK"
            try:
                arg = self._arguments(method, context, request, stream_in)
                return await behavior(arg, context)
            except BaseException as exc:
                code = _code_of(exc)
                await _fail(exc, context)
            finally:
                self._observe(name, code, time.perf_counter() - start)

        return call

    def _streaming(self, method: str, behavior: Any, stream_in: bool) -> Any:
        name = method.rsplit("/", 1)[-1]
        if inspect.iscoroutinefunction(behavior):
            return self._writing(method, behavior, stream_in)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, code = time.perf_counter(), "OK"
            try:
                arg = self._arguments(method, context, request, stream_in)
                async for response in behavior(arg, context):
                    yield response
            except BaseException as exc:
                code = _code_of(exc)
                await _fail(exc, context)
            finally:
                self._observe(name, code, time.perf_counter() - start)

        return call


    def _writing(self, method: str, behavior: Any, stream_in: bool) -> Any:
        """A response-streaming behavior that is a coroutine writing through
        ``context.write`` (the aio health servicer's Watch), not an async generator."""
        name = method.rsplit("/", 1)[-1]

        async def call(request: Any, context: grpc.aio.ServicerContext) -> None:
            start, code = time.perf_counter(), "OK"
            try:
                await behavior(self._arguments(method, context, request, stream_in), context)
            except BaseException as exc:
                code = _code_of(exc)
                await _fail(exc, context)
            finally:
                self._observe(name, code, time.perf_counter() - start)

        return call


def _code_of(exc: BaseException) -> str:
    """The status name a call that raised ``exc`` ends with (for metrics). Never raises."""
    if isinstance(exc, AuthorityError):
        return exc.status
    if isinstance(exc, Denied):
        return str(exc.code.name)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "UNKNOWN"


async def _fail(exc: BaseException, context: grpc.aio.ServicerContext) -> NoReturn:
    """Abort the call with the status ``exc`` deserves (always raises). Cancellation and an
    abort already in flight are re-raised as they are."""
    if isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)):
        raise exc
    if isinstance(exc, AuthorityError):
        await context.abort(grpc.StatusCode[exc.status], exc.message)
    if isinstance(exc, Denied):
        if exc.code == grpc.StatusCode.PERMISSION_DENIED:
            log.warning("denied: %s", exc.message)
        await context.abort(exc.code, exc.message)
    if not isinstance(exc, Exception):
        raise exc
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error (incident %s)", incident, exc_info=exc)
    await context.abort(grpc.StatusCode.UNKNOWN, f"unexpected server error (incident "
                                                 f"{incident}); see the server log")
    raise AssertionError("unreachable")  # context.abort raises
