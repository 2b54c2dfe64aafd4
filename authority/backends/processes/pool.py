"""DeviceProcesses: a key backend that runs batches in child processes, each with its own
session on the same token, and everything else in this process.

Why: on the aio server one thread makes every device call, so a PKCS#11 software token such as
SoftHSM2 (about 50 µs of CPU per AES-GCM operation) can use one core at most; threads that drop
the GIL for each call cost more in hand-offs than they overlap (docs/benchmarks.md). Child
processes have no GIL to share: a batch costs one request and one reply on a socket pair.

What runs where: batches of ``min_items`` or more go to an idle device process; single items
(unary calls), key creation and destruction, listings and attribute reads run in this
process's own backend. Keys are token objects, so a key created here is found by every device
process at its first use, and a destroyed key fails there too (tests/test_device_processes.py).

Failure: a process that dies, hangs past ``call_timeout`` or breaks the protocol fails its
batch with UNAVAILABLE and is replaced in the background; while none is running, batches run
here. No key material crosses the socket: tickets and plaintexts do, as they cross this
process's memory anyway.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from authority.backends.base import BackendInfo, KeyBackend
from authority.backends.processes.handoff import Handoff
from authority.backends.processes.link import AsyncLink
from authority.backends.processes.process import BrokenProcess, DeviceProcess
from authority.backends.processes.wire import SEAL, UNSEAL, encode_request
from authority.errors import DeviceUnavailable, InvalidTicket, StartupError

log = logging.getLogger("authority.backends.processes")

Items = Sequence[tuple[bytes, bytes, bytes]]


class DeviceProcesses:
    """A KeyBackend: ``local`` plus ``count`` device processes for batches. Thread-safe."""

    def __init__(self, local: KeyBackend, hello: dict[str, Any], count: int, *,
                 asynchronous: bool = False, min_items: int = 2, wait: float = 5.0,
                 call_timeout: float = 30.0, start_timeout: float = 60.0) -> None:
        """Use :meth:`start`. ``hello``: the settings every device process opens its backend
        with; ``asynchronous``: the processes serve the ``*_many_async`` methods on the event
        loop that first calls one (requests pipelined), and synchronous batches from other
        threads are handed to that loop; else they serve synchronous callers one batch at a
        time, and ``wait`` is how long a batch waits for an idle process before
        UNAVAILABLE."""
        self.name = local.name
        self.format_version = local.format_version
        self._local = local
        self._hello = hello
        self._count = count
        self._min_items = min_items
        self._wait = wait
        self._call_timeout = call_timeout
        self._start_timeout = start_timeout
        self._idle: Handoff[DeviceProcess] = Handoff()  # fair: no caller starves
        self._running = 0          # processes idle or serving a batch
        self._restarts = 0         # processes replaced (died, hung, broke the protocol)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._all: dict[int, DeviceProcess] = {}
        self._asynchronous = asynchronous
        self._loop: asyncio.AbstractEventLoop | None = None
        self._links: dict[int, AsyncLink] = {}

    @property
    def asynchronous(self) -> bool:
        """Whether batches are served on an event loop (``*_many_async``)."""
        return self._asynchronous

    def __repr__(self) -> str:
        return f"<DeviceProcesses {self._count} x {self._local!r}>"

    def start(self) -> DeviceProcesses:
        """Start every device process and wait until each has its session.

        Raises: StartupError (with the first failing process's reason; none is left running).
        """
        started = []
        try:
            started = [DeviceProcess.spawn(i, self._hello) for i in range(self._count)]
            for process in started:
                process.ready(self._start_timeout)
        except StartupError:
            for process in started:
                process.kill()
            raise
        for process in started:
            self._adopt(process)
        return self

    def _adopt(self, process: DeviceProcess) -> None:
        with self._lock:
            self._all[process.index] = process
            self._running += 1
        if not self._asynchronous:
            self._idle.put(process)
        elif self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._attach(process), self._loop)

    # -- batches -----------------------------------------------------------------------------

    def seal_many(self, items: Items) -> list[bytes]:
        """See KeyBackend.seal_many; batches of ``min_items`` or more run in a device process.
        Raises: KeyNotFound, DeviceUnavailable."""
        if len(items) < self._min_items:
            return self._local.seal_many(items)
        results = self._remote(SEAL, items)
        if results is None:
            return self._local.seal_many(items)
        if not all(isinstance(r, bytes) for r in results):
            raise DeviceUnavailable("device process returned an item error for a seal")
        return results  # type: ignore[return-value]  # checked above

    def unseal_many(self, items: Items) -> list[bytes | InvalidTicket]:
        """See KeyBackend.unseal_many; batches of ``min_items`` or more run in a device
        process. Raises: DeviceUnavailable."""
        if len(items) < self._min_items:
            return self._local.unseal_many(items)
        results = self._remote(UNSEAL, items)
        if results is None:
            return self._local.unseal_many(items)
        return results

    def _remote(self, op: int, items: Items) -> list[bytes | InvalidTicket] | None:
        """The results from an idle device process, or None when none is running.
        Raises: DeviceUnavailable (also when every process stays busy for ``wait`` seconds),
        KeyNotFound."""
        if self._asynchronous:
            return self._via_loop(op, items)
        payload = encode_request(op, items)
        process = self._checkout()
        if process is None:
            return None
        try:
            results = process.call(payload, self._call_timeout)
        except BrokenProcess as exc:
            log.error("%s; replacing it", exc.message)
            self._replace(process)
            raise
        except BaseException:
            self._idle.put(process)
            raise
        self._idle.put(process)
        if len(results) != len(items):
            raise DeviceUnavailable(f"device process {process.index} returned "
                                    f"{len(results)} results for {len(items)} items")
        return results

    def _via_loop(self, op: int, items: Items) -> list[bytes | InvalidTicket] | None:
        """A synchronous batch in asynchronous mode: run on the processes' loop from another
        thread, else (no loop yet, or called on it) None: run here."""
        loop = self._loop
        if loop is None or not loop.is_running() or _on_loop(loop):
            return None
        return asyncio.run_coroutine_threadsafe(self._remote_async(op, items), loop).result()

    # -- asynchronous batches ----------------------------------------------------------------

    async def seal_many_async(self, items: Items) -> list[bytes]:
        """``seal_many`` for the event loop: awaits a device process.
        Raises: KeyNotFound, DeviceUnavailable."""
        if len(items) < self._min_items:
            return self._local.seal_many(items)
        results = await self._remote_async(SEAL, items)
        if results is None:
            return self._local.seal_many(items)
        if not all(isinstance(r, bytes) for r in results):
            raise DeviceUnavailable("device process returned an item error for a seal")
        return results  # type: ignore[return-value]  # checked above

    async def unseal_many_async(self, items: Items) -> list[bytes | InvalidTicket]:
        """``unseal_many`` for the event loop: awaits a device process.
        Raises: DeviceUnavailable."""
        if len(items) < self._min_items:
            return self._local.unseal_many(items)
        results = await self._remote_async(UNSEAL, items)
        if results is None:
            return self._local.unseal_many(items)
        return results

    async def _remote_async(self, op: int, items: Items) -> list[bytes | InvalidTicket] | None:
        """The results from the least busy device process, or None when none is running.
        Raises: DeviceUnavailable, KeyNotFound."""
        if not self._asynchronous:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._remote, op, items)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for process in list(self._all.values()):
                await self._attach(process)
        links = [link for link in self._links.values() if not link.broken]
        if not links:
            return None
        link = min(links, key=lambda candidate: candidate.pending)
        results = await link.call(encode_request(op, items), self._call_timeout)
        if len(results) != len(items):
            raise DeviceUnavailable(f"device process {link.process.index} returned "
                                    f"{len(results)} results for {len(items)} items")
        return results

    async def detach(self) -> None:
        """Close the links on the running loop (before it stops): each process reads EOF and
        exits; ``close`` reaps them. Later batches run in this process. Never raises."""
        links, self._links = list(self._links.values()), {}
        with self._lock:
            self._running = 0
        self._closed.set()  # no replacements from here on
        for link in links:
            await link.close()

    async def _attach(self, process: DeviceProcess) -> None:
        link = AsyncLink(process, self._link_broken)
        try:
            await link.open()
        except OSError as exc:
            log.error("device process %d: cannot attach to the loop: %s", process.index, exc)
            self._replace(process)
            return
        self._links[process.index] = link

    def _link_broken(self, process: DeviceProcess) -> None:
        self._links.pop(process.index, None)
        self._replace(process)

    def _checkout(self) -> DeviceProcess | None:
        """An idle, live process; None if none is running. Raises: DeviceUnavailable."""
        while True:
            with self._lock:
                if self._running == 0 or self._closed.is_set():
                    return None
            process = self._idle.get(self._wait)
            if process is None:
                raise DeviceUnavailable(f"all {self._count} device processes stayed busy for "
                                        f"{self._wait:g} s")
            if process.alive():
                return process
            log.error("device process %d (pid %d) exited (status %s); replacing it",
                      process.index, process.proc.pid, process.proc.returncode)
            self._replace(process)

    def _replace(self, process: DeviceProcess) -> None:
        """Kill ``process`` and start its successor in the background. Never raises."""
        process.kill()
        with self._lock:
            self._running -= 1
            self._restarts += 1
            self._all.pop(process.index, None)
        if not self._closed.is_set():
            threading.Thread(target=self._respawn, args=(process.index,),
                             name=f"device-process-{process.index}", daemon=True).start()

    def _respawn(self, index: int) -> None:
        delay = 0.5
        while not self._closed.is_set():
            try:
                process = DeviceProcess.spawn(index, self._hello)
                process.ready(self._start_timeout)
            except StartupError as exc:
                log.error("device process %d could not restart (retry in %g s): %s",
                          index, delay, exc)
                self._closed.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._closed.is_set():
                process.close()
                return
            log.info("device process %d restarted (pid %d)", index, process.proc.pid)
            self._adopt(process)
            return

    # -- everything else runs here -----------------------------------------------------------

    def create_key(self, key_id: bytes) -> None:
        """See KeyBackend.create_key. Raises: DeviceUnavailable, FailedPrecondition."""
        self._local.create_key(key_id)

    def destroy_key(self, key_id: bytes) -> None:
        """See KeyBackend.destroy_key (the device processes fail on it from then on).
        Raises: KeyNotFound, DeviceUnavailable."""
        self._local.destroy_key(key_id)

    def list_keys(self) -> set[bytes]:
        """See KeyBackend.list_keys. Raises: DeviceUnavailable."""
        return self._local.list_keys()

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """See KeyBackend.seal. Raises: KeyNotFound, DeviceUnavailable."""
        return self._local.seal(key_id, aad, plaintext)

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """See KeyBackend.unseal. Raises: UnsealFailed, KeyNotFound, DeviceUnavailable."""
        return self._local.unseal(key_id, aad, sealed)

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """See KeyBackend.key_attributes. Raises: KeyNotFound, DeviceUnavailable."""
        return self._local.key_attributes(key_id)

    def describe(self) -> BackendInfo:
        """This process's backend, and how many device processes run."""
        with self._lock:
            running, restarts = self._running, self._restarts
        return replace(self._local.describe(), processes=running, process_restarts=restarts)

    def pids(self) -> list[int]:
        """Process ids of the running device processes (for status and tests)."""
        with self._lock:
            return [p.proc.pid for p in self._all.values()]

    def close(self) -> None:
        """End every device process (closing its channel: it logs out and exits), then close
        this process's backend. Never raises."""
        self._closed.set()
        with self._lock:
            processes = list(self._all.values())
            self._all.clear()
            self._running = 0
        self._links.clear()
        for process in processes:
            process.close()
        self._local.close()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
