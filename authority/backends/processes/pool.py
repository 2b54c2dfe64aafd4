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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from authority.backends.base import BackendInfo, KeyBackend
from authority.backends.processes.fleet import Fleet
from authority.backends.processes.handoff import Handoff
from authority.backends.processes.link import AsyncLink
from authority.backends.processes.process import BrokenProcess, DeviceProcess, checked, sealed
from authority.backends.processes.wire import SEAL, UNSEAL, encode_request
from authority.errors import DeviceUnavailable, FailedPrecondition, InvalidTicket

log = logging.getLogger("authority.backends.processes")

Items = Sequence[tuple[bytes, bytes, bytes]]
Results = list[bytes | InvalidTicket]

PIPELINE = 4  # requests in flight per device process (asynchronous mode)


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
        self.asynchronous = asynchronous
        self._local = local
        self._min_items = min_items
        self._wait = wait
        self._call_timeout = call_timeout
        self._fleet = Fleet(hello, count, self._ready, start_timeout)
        self._idle: Handoff[DeviceProcess] = Handoff()  # synchronous: fair, no caller starves
        self._loop: asyncio.AbstractEventLoop | None = None  # asynchronous: the loop and
        self._links: dict[int, AsyncLink] = {}              # each process's link on it
        # at most PIPELINE requests per process in flight: more only queue memory in the
        # socket buffers (a batch is up to ~1 MB), the processes are busy either way
        self._slots = asyncio.Semaphore(PIPELINE * count)

    def __repr__(self) -> str:
        return f"<DeviceProcesses {self._fleet.count} x {self._local!r}>"

    def start(self) -> DeviceProcesses:
        """Start every device process and wait until each has its session.
        Raises: StartupError (the first failing process's reason; none is left running)."""
        self._fleet.start()
        return self

    def _ready(self, process: DeviceProcess) -> None:
        if not self.asynchronous:
            self._idle.put(process)
        elif self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._attach(process), self._loop)

    # -- batches -----------------------------------------------------------------------------

    def seal_many(self, items: Items) -> list[bytes]:
        """See KeyBackend.seal_many; batches of ``min_items`` or more run in a device process.
        Raises: KeyNotFound, DeviceUnavailable."""
        results = self._remote(SEAL, items) if len(items) >= self._min_items else None
        return self._local.seal_many(items) if results is None else sealed(results)

    def unseal_many(self, items: Items) -> Results:
        """See KeyBackend.unseal_many; batches of ``min_items`` or more run in a device
        process. Raises: DeviceUnavailable."""
        results = self._remote(UNSEAL, items) if len(items) >= self._min_items else None
        return self._local.unseal_many(items) if results is None else results

    async def seal_many_async(self, items: Items) -> list[bytes]:
        """``seal_many`` for the event loop: awaits a device process.
        Raises: KeyNotFound, DeviceUnavailable."""
        results = (await self._remote_async(SEAL, items)
                   if len(items) >= self._min_items else None)
        return self._local.seal_many(items) if results is None else sealed(results)

    async def unseal_many_async(self, items: Items) -> Results:
        """``unseal_many`` for the event loop: awaits a device process.
        Raises: DeviceUnavailable."""
        results = (await self._remote_async(UNSEAL, items)
                   if len(items) >= self._min_items else None)
        return self._local.unseal_many(items) if results is None else results

    # -- synchronous: one batch per process at a time ----------------------------------------

    def _remote(self, op: int, items: Items) -> Results | None:
        """The results from an idle device process, or None when none is running.
        Raises: DeviceUnavailable (also when every process stays busy for ``wait`` seconds),
        KeyNotFound."""
        if self.asynchronous:
            return self._via_loop(op, items)
        payload = encode_request(op, items)
        process = self._checkout()
        if process is None:
            return None
        try:
            results = process.call(payload, self._call_timeout)
        except BrokenProcess as exc:
            log.error("%s; replacing it", exc.message)
            self._fleet.replace(process)
            raise
        except BaseException:
            self._idle.put(process)
            raise
        self._idle.put(process)
        return checked(results, len(items), process.index)

    def _checkout(self) -> DeviceProcess | None:
        """An idle, live process; None if none is running. Raises: DeviceUnavailable."""
        while self._fleet.running and not self._fleet.closed.is_set():
            process = self._idle.get(self._wait)
            if process is None:
                raise DeviceUnavailable(f"all {self._fleet.count} device processes stayed "
                                        f"busy for {self._wait:g} s")
            if process.alive():
                return process
            log.error("device process %d (pid %d) exited (status %s); replacing it",
                      process.index, process.proc.pid, process.proc.returncode)
            self._fleet.replace(process)
        return None

    def _via_loop(self, op: int, items: Items) -> Results | None:
        """A synchronous batch in asynchronous mode: run on the processes' loop from another
        thread, else (no loop yet, or called on it) None: run here."""
        loop = self._loop
        if loop is None or not loop.is_running() or _on_loop(loop):
            return None
        return asyncio.run_coroutine_threadsafe(self._remote_async(op, items), loop).result()

    # -- asynchronous: requests pipelined on each process's link -----------------------------

    async def _remote_async(self, op: int, items: Items) -> Results | None:
        """The results from the least busy device process, or None when none is running.
        Raises: DeviceUnavailable, KeyNotFound."""
        if not self.asynchronous:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._remote, op, items)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for process in self._fleet.live():
                await self._attach(process)
        async with self._slots:
            links = [link for link in self._links.values() if not link.broken]
            if not links:
                return None
            link = min(links, key=lambda candidate: candidate.pending)
            results = await link.call(encode_request(op, items), self._call_timeout)
        return checked(results, len(items), link.process.index)

    async def _attach(self, process: DeviceProcess) -> None:
        link = AsyncLink(process, self._link_broken)
        try:
            await link.open()
        except OSError as exc:
            log.error("device process %d: cannot attach to the loop: %s", process.index, exc)
            self._fleet.replace(process)
            return
        self._links[process.index] = link

    def _link_broken(self, process: DeviceProcess) -> None:
        self._links.pop(process.index, None)
        self._fleet.replace(process)

    async def detach(self) -> None:
        """Close the links on the running loop (before it stops): each process reads EOF and
        exits; ``close`` reaps them. Later batches run in this process. Never raises."""
        self._fleet.stop_replacing()
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()

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

    def refresh(self) -> None:
        """See KeyBackend.refresh: this process's backend, which creates and destroys keys (a
        device process never changes the token, so its view follows other processes' changes).
        Raises: DeviceUnavailable."""
        self._local.refresh()

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """See KeyBackend.seal. Raises: KeyNotFound, DeviceUnavailable."""
        return self._local.seal(key_id, aad, plaintext)

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """See KeyBackend.unseal. Raises: UnsealFailed, KeyNotFound, DeviceUnavailable."""
        return self._local.unseal(key_id, aad, sealed)

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """See KeyBackend.key_attributes. Raises: KeyNotFound, DeviceUnavailable."""
        return self._local.key_attributes(key_id)

    # -- per-node tokens (cluster.per_node_tokens): this process's backend, as key creation --

    def create_wrappable_key(self, key_id: bytes) -> None:
        """See Pkcs11Backend.create_wrappable_key (the device processes find the key at its
        first use, as any key made here). Raises: what it raises."""
        self._wrapping("create_wrappable_key")(key_id)

    def wrap_key(self, key_id: bytes, *kek_label: str) -> bytes:
        """See Pkcs11Backend.wrap_key. Raises: what it raises."""
        blob: bytes = self._wrapping("wrap_key")(key_id, *kek_label)
        return blob

    def key_check(self, key_id: bytes) -> bytes:
        """See Pkcs11Backend.key_check. Raises: what it raises."""
        check: bytes = self._wrapping("key_check")(key_id)
        return check

    def unwrap_key(self, key_id: bytes, blob: bytes, check: bytes, *kek_label: str) -> None:
        """See Pkcs11Backend.unwrap_key. Raises: what it raises."""
        self._wrapping("unwrap_key")(key_id, blob, check, *kek_label)

    def kek_attributes(self, *kek_label: str) -> dict[str, bool]:
        """See Pkcs11Backend.kek_attributes. Raises: what it raises."""
        found: dict[str, bool] = self._wrapping("kek_attributes")(*kek_label)
        return found

    def _wrapping(self, name: str) -> Any:
        """This process's backend's method ``name``. Raises: FailedPrecondition (a backend
        that cannot copy keys between tokens)."""
        method = getattr(self._local, name, None)
        if method is None:
            raise FailedPrecondition(f"the {self.name} backend cannot copy keys between tokens")
        return method

    def describe(self) -> BackendInfo:
        """This process's backend; its sessions plus one per running device process (what a
        token's session limit sees), and how many device processes run."""
        info = self._local.describe()
        running = self._fleet.running
        return replace(info, sessions=info.sessions + running, processes=running,
                       process_restarts=self._fleet.restarts)

    def pids(self) -> list[int]:
        """Process ids of the running device processes (for status and tests)."""
        return [process.proc.pid for process in self._fleet.live()]

    def close(self) -> None:
        """End every device process, then close this process's backend. Never raises."""
        self._links.clear()
        self._fleet.close()
        self._local.close()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
