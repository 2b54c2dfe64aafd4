"""The thread-pool server's only interceptor, ``ThreadGuard``: what ``AioGuard`` does on the
aio server, in the same order. Admission first, before the request is read and so before a
worker can be held waiting for it (authority/service/admission.py): the role check, the
caller's slot, the request deadline; then request decoding (INVALID_ARGUMENT), the rate limit,
the servicer; around it all metrics and error mapping (authority errors to their status,
anything else UNKNOWN with an incident id in the log).

Every method is served by a request-streaming handler (see admission.py for why). A
response-streaming method that is non-blocking (the health servicer's Watch, which answers
through a callback) stays non-blocking: its worker is freed once the request is read, and its
slot is given back when the call ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc

from authority.errors import InvalidArgument
from authority.service.admission import Gate, Wait, status_name, tick
from authority.service.handlers import Guarded, serve, shape_of
from authority.service.interceptors import (
    Stopping,
    _fail,
    begin_request,
    end_request,
    mark_status,
)

Behavior = Callable[..., Any]


class Watchdog:
    """A daemon thread that ends the calls of ``gate`` whose waits expired."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._period = tick(gate.limits)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grpc-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._gate.expire()

    def close(self) -> None:
        """Stop the thread. Never raises."""
        self._stop.set()
        self._thread.join(5)


class ThreadGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admission, decoding, rate limit, metrics and error mapping for every handler."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._guarded = Guarded(self._guard)
        self._watchdog = Watchdog(gate)
        # sends the responses of non-blocking calls (Watch), one thread, in order
        self._sender = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpc-send")

    def close(self) -> None:
        """Stop the watchdog and the sender (once the server stopped). Never raises."""
        self._watchdog.close()
        self._sender.shutdown(wait=False, cancel_futures=True)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        return self._guarded(details, continuation(details))

    def _guard(self, method: str, handler: Any) -> Any:
        """``handler`` as a request-streaming handler behind the gate. Never raises."""
        shape = shape_of(handler)
        behavior, stream_in = shape.behavior, shape.stream_in
        if not shape.stream_out:
            return serve(shape, self._unary(method, behavior, stream_in))
        if getattr(behavior, "experimental_non_blocking", False) and not stream_in:
            return serve(shape, self._non_blocking(method, behavior))
        return serve(shape, self._streaming(method, behavior, stream_in))

    # -- reading the request -------------------------------------------------------------

    def _read(self, method: str, wait: Wait, requests: Iterator[Any], stream: bool) -> Any:
        """The next message of ``requests`` (None at their end), read while ``wait`` runs
        (past its deadline the watchdog cancels the call).

        Raises: RequestTimeout, ResourceExhausted (the watchdog ended the call); grpc.RpcError
        (the call ended otherwise)."""
        try:
            return next(requests, None)
        except grpc.RpcError:
            if not wait.expired:
                raise
        finally:
            self.gate.arrived(wait)
        raise self.gate.ended(method, wait, stream)

    def _first(self, method: str, client: str, requests: Iterator[Any],
               context: grpc.ServicerContext, holds: bool) -> Any:
        """The request of a unary-request call, read under the gate's request deadlines, and
        charged. ``holds``: the call already holds a slot.

        Raises: RequestTimeout; ResourceExhausted; InvalidArgument (none, undecodable)."""
        wait = self.gate.request(client, context.cancel, holds)
        request = self._read(method, wait, requests, stream=False)
        if request is None:
            raise InvalidArgument("request", "no request message")
        return self.gate.charge(method, client, request)

    def _messages(self, method: str, client: str, requests: Iterator[Any],
                  context: grpc.ServicerContext) -> Iterator[Any]:
        """The messages of a request stream, each within ``server.stream_idle_timeout`` of the
        previous one, each charged.

        Raises: RequestTimeout; InvalidArgument; ResourceExhausted."""
        while True:
            wait = self.gate.message(client, context.cancel)
            request = self._read(method, wait, requests, stream=True)
            if request is None:
                return
            yield self.gate.charge(method, client, request)

    # -- the three shapes ----------------------------------------------------------------

    def _unary(self, method: str, behavior: Behavior, stream_in: bool) -> Behavior:
        gate, name = self.gate, method.rsplit("/", 1)[-1]

        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with _Observed(gate, name, context):
                client = gate.admit(method, context, holds=stream_in)
                if not stream_in:
                    return behavior(self._first(method, client, requests, context, False),
                                    context)
                try:
                    return behavior(self._messages(method, client, requests, context),
                                    context)
                finally:
                    gate.release(client)

        return call

    def _streaming(self, method: str, behavior: Behavior, stream_in: bool) -> Behavior:
        gate, name = self.gate, method.rsplit("/", 1)[-1]

        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with _Observed(gate, name, context):
                client = gate.admit(method, context, holds=True)
                try:
                    arg = (self._messages(method, client, requests, context) if stream_in
                           else self._first(method, client, requests, context, True))
                    yield from behavior(arg, context)
                finally:
                    gate.release(client)

        return call

    def _non_blocking(self, method: str, behavior: Behavior) -> Behavior:
        """A unary-request method that answers through ``send_response_callback`` and returns
        at once (the health servicer's Watch): the worker is free once the request is read;
        the slot is held until the call ends.

        The behavior gets a callback that hands each response to the guard's sender thread:
        grpcio's callback blocks until the message is sent, which needs the server's poller
        thread, and the health servicer calls it holding its lock -- which the poller takes to
        forget a Watch that ended: sending inline deadlocks the server (seen when Watches end
        while ``enter_graceful_shutdown`` reports NOT_SERVING)."""
        gate, name, sender = self.gate, method.rsplit("/", 1)[-1], self._sender

        def call(requests: Iterator[Any], context: grpc.ServicerContext,
                 send_response_callback: Callable[[Any], None]) -> None:
            start = time.perf_counter()
            request_scope = begin_request(context)
            try:
                client = gate.admit(method, context, holds=True)
                try:
                    request = self._first(method, client, requests, context, True)
                except BaseException:
                    gate.release(client)
                    raise
            except Exception as exc:
                gate.observe(name, _status(exc, context), time.perf_counter() - start)
                _failed(exc, context)

            def ended() -> None:
                gate.release(client)
                gate.observe(name, _code(context), time.perf_counter() - start)

            def send_later(response: Any) -> None:
                with contextlib.suppress(RuntimeError):   # the server stopped
                    sender.submit(send_response_callback, response)

            if not context.add_callback(ended):
                ended()
            try:
                behavior(request, context, send_later)
            finally:
                end_request(request_scope)

        call.experimental_non_blocking = True  # type: ignore[attr-defined]
        return call


class _Observed:
    """Around one call's work: the call's request id set first (``begin_request``); an
    exception ends the call with the status it deserves (and raises), and the call's latency
    is recorded with the status it ended with. A ``GeneratorExit`` (a response stream closed)
    passes as it is, recorded as OK."""

    __slots__ = ("_context", "_gate", "_name", "_request", "_start")

    def __init__(self, gate: Gate, name: str, context: grpc.ServicerContext) -> None:
        self._gate, self._name, self._context = gate, name, context
        self._start = time.perf_counter()
        self._request = begin_request(context)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: Any) -> None:
        """Raises: what ``_failed`` raises, for an Exception."""
        code = "OK"
        try:
            if isinstance(exc, Exception):
                code = _status(exc, self._context)
                _failed(exc, self._context)
            if exc is None:
                mark_status(self._context)   # a status the servicer set without raising
        finally:
            self._gate.observe(self._name, code, time.perf_counter() - self._start)
            end_request(self._request)


def _status(exc: Exception, context: grpc.ServicerContext) -> str:
    """The status name the call ends with (for metrics). Never raises."""
    code = context.code()
    if code is not None:   # the servicer aborted the call
        return str(code.name)
    return status_name(exc)


def _code(context: grpc.ServicerContext) -> str:
    code = context.code()
    return "OK" if code is None else str(code.name)


def _failed(exc: Exception, context: grpc.ServicerContext) -> NoReturn:
    """End the call with the status ``exc`` deserves (always raises): the request stream of
    a cancelled call as it is, anything else as interceptors._fail maps it (a call refused
    while the server stops once its drain lets it: ``Stopping.wait``)."""
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        raise exc
    if isinstance(exc, Stopping):
        exc.wait()
    _fail(exc, context)
