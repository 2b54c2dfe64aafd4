"""One dedicated thread that owns the TPM connection, fed by a bounded queue of jobs.

A TPM executes one command at a time and the connection (ESAPI context) is not thread-safe, so
every device call happens on this thread. Callers (gRPC threads) submit a job and wait on its
future: they never hold a lock while the TPM works and never wait for anything but their own
result (and the jobs ahead of it). A batch (seal_many / unseal_many) is one job.

The worker takes every job already queued (up to ``drain_max``) and runs those for the key it has
loaded first, then the others grouped by key, so issuing under the new key and redeeming under the
previous one do not make it reload keys on every job (a key switch costs 2-6 TPM commands; with
3 transient slots only one key fits). Within a key, jobs keep their arrival order; no job waits
for more than one such round.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from authority.errors import DeviceUnavailable

__all__ = ["Worker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DRAIN_MAX: Final = 64


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    affinity: bytes | None = None
    stop: bool = False
    future: Future[T] = field(default_factory=Future)


class Worker:
    """The TPM thread. ``call`` is thread-safe; everything else is for the owner."""

    def __init__(self, name: str, queue_size: int, timeout: float,
                 affinity: Callable[[], bytes | None] | None = None,
                 drain_max: int = DRAIN_MAX) -> None:
        """``timeout``: seconds a caller waits for its result; ``affinity``: the key currently
        loaded (called on the worker thread), whose jobs run first."""
        self._queue: queue.Queue[_Job[Any]] = queue.Queue(maxsize=queue_size)
        self._timeout = timeout
        self._affinity = affinity
        self._drain_max = drain_max
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting (approximate)."""
        return self._queue.qsize()

    def call(self, fn: Callable[[], T], affinity: bytes | None = None,
             timeout: float | None = None) -> T:
        """Run ``fn`` on the worker thread and return its result (or raise its exception).

        Raises: DeviceUnavailable if the queue is full, the backend is closed, or no result came
        within the timeout; whatever ``fn`` raises.
        """
        if self._closed:
            raise DeviceUnavailable("tpm backend is closed")
        job: _Job[T] = _Job(fn, affinity)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise DeviceUnavailable(
                f"tpm: {self._queue.maxsize} requests are already waiting for the TPM; "
                "it is saturated, try again later"
            ) from None
        if self._closed and job.future.cancel():  # closed while we queued: nobody will run it
            raise DeviceUnavailable("tpm backend is closed")
        wait = self._timeout if timeout is None else timeout
        try:
            return job.future.result(wait)
        except TimeoutError:
            job.future.cancel()  # skipped if not started; a running job finishes unobserved
            raise DeviceUnavailable(
                f"tpm: no result within {wait:g}s ({self.queued} requests queued)"
            ) from None

    def stop(self, final: Callable[[], None], timeout: float = 30.0) -> None:
        """Run the jobs already queued, then ``final`` (on the worker thread), then end.

        Jobs submitted later fail with DeviceUnavailable. Idempotent; never raises.
        """
        if self._closed:
            return
        self._closed = True
        job: _Job[None] = _Job(final, stop=True)
        self._queue.put(job)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("tpm worker did not stop within %gs (a TPM command hangs?)", timeout)
        self._fail_queued()
        if job.future.done() and job.future.exception() is not None:
            log.error("tpm worker shutdown failed: %s", job.future.exception())

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._drain_max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = next((job for job in batch if job.stop), None)
            jobs = [job for job in batch if not job.stop]
            if len(jobs) > 1 and self._affinity is not None:
                hot = self._affinity()
                jobs.sort(key=lambda j: (j.affinity != hot, j.affinity or b""))
            for job in jobs:
                self._execute(job)
            if stop is not None:
                self._fail_queued()
                self._execute(stop)
                return

    @staticmethod
    def _execute(job: _Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # the caller gave up waiting
        try:
            result = job.fn()
        except BaseException as exc:  # handed to the caller, who re-raises it
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    def _fail_queued(self) -> None:
        """Fail every job still queued (the worker is stopping or gone)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if not job.stop and job.future.set_running_or_notify_cancel():
                job.future.set_exception(DeviceUnavailable("tpm backend is closed"))
