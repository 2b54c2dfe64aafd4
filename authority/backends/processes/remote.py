"""RemoteBackend: a key backend whose every call runs in one device process that owns the device.

Why (the TPM): a TPM takes one command at a time through one connection, and the TPM backend's
worker thread parses every reply in Python. Beside the server's gRPC threads it waits for the GIL
after each TPM command: measured in process, ``unseal_many`` of 100 on the embedded swtpm did
2,040 tickets/s alone and 78/s next to one busy Python thread (docs/benchmarks.md). In its own
process the worker has an interpreter to itself; the server waits for one reply per call.

How: one device process (a fleet of one) that opens the whole backend and answers every
KeyBackend call (wire.py). This process reaches it from a private event-loop thread: requests
pipelined on the socket, up to ``pipeline`` in flight, replies in order (``AsyncLink``).
Synchronous callers (the thread-pool server, admin calls) hand their request to that loop and
wait; the aio server awaits it from its own loop.

Failure: a process that dies, hangs past ``call_timeout`` or breaks the protocol fails the calls
in flight with UNAVAILABLE and is replaced in the background with backoff; until its successor
runs every call is UNAVAILABLE (nothing else may talk to the device). Callers beyond
``max_waiting`` get UNAVAILABLE at once, as from the TPM worker's bounded queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from authority.backends.base import BackendInfo
from authority.backends.processes.fleet import Fleet
from authority.backends.processes.link import AsyncLink
from authority.backends.processes.process import DeviceProcess, checked, sealed
from authority.backends.processes.wire import (
    CREATE_KEY,
    DESCRIBE,
    DESTROY_KEY,
    KEY_ATTRIBUTES,
    LIST_KEYS,
    SEAL,
    UNSEAL,
    WireError,
    decode_flags,
    decode_info,
    encode_request,
)
from authority.errors import DeviceUnavailable, InvalidArgument, InvalidTicket, StartupError

log = logging.getLogger("authority.backends.processes")

Items = Sequence[tuple[bytes, bytes, bytes]]
Results = list[bytes | InvalidTicket]


class RemoteBackend:
    """A KeyBackend served by one device process. Thread-safe; ``*_many_async`` for the aio
    server."""

    asynchronous = True  # the aio server awaits batches instead of offloading them

    def __init__(self, hello: dict[str, Any], *, name: str, format_version: int,
                 pipeline: int = 32, max_waiting: int = 1024, call_timeout: float = 35.0,
                 start_timeout: float = 120.0, note: str = "",
                 on_close: Callable[[], None] | None = None) -> None:
        """Use :meth:`start`. ``hello``: the settings the process opens its backend with;
        ``note``: appended to the library in ``describe``; ``on_close``: run after the process
        has ended (e.g. stop the embedded swtpm it used)."""
        self.name = name
        self.format_version = format_version
        self._fleet = Fleet(hello, 1, self._ready, start_timeout)
        self._pipeline = pipeline
        self._max_waiting = max_waiting
        self._call_timeout = call_timeout
        self._note = note
        self._on_close = on_close
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"{name}-process-link", daemon=True)
        self._link: AsyncLink | None = None
        self._slots = asyncio.Semaphore(pipeline)  # used on self._loop only
        self._waiting = 0                          # calls on self._loop: waiting or in flight
        self._info: BackendInfo | None = None
        self._closed = False
        # a call always ends within: the wait for a slot, then the call (each call_timeout)
        self._bound = 2 * call_timeout + 5.0

    def __repr__(self) -> str:
        return f"<RemoteBackend {self.name} in a device process>"

    def start(self) -> RemoteBackend:
        """Start the device process and wait until its backend is open.
        Raises: StartupError (the process's reason; nothing is left running)."""
        self._thread.start()
        try:
            self._fleet.start()
            if self._link is None:
                raise StartupError(f"server.device_processes: the {self.name} device process "
                                   "did not answer after start")
        except BaseException:
            self.close()
            raise
        return self

    # -- the link (on the private loop) ------------------------------------------------------

    def _ready(self, process: DeviceProcess) -> None:
        """A process has its backend open (start or replacement): attach it and learn what its
        backend reports. Called from the starting thread, never from the loop."""
        try:
            asyncio.run_coroutine_threadsafe(self._attach(process), self._loop).result(
                self._call_timeout + 5)
        except (RuntimeError, TimeoutError) as exc:  # closed meanwhile: the loop is gone
            log.warning("%s device process %d not attached: %r", self.name, process.index, exc)
            process.kill()

    async def _attach(self, process: DeviceProcess) -> None:
        link = AsyncLink(process, self._broken)
        try:
            await link.open()
            reply = await link.call(encode_request(DESCRIBE, []), self._call_timeout)
            info = checked(reply, 1, process.index)[0]
            self._info = decode_info(info if isinstance(info, bytes) else b"")
        except (OSError, WireError, DeviceUnavailable) as exc:
            log.error("%s device process: cannot attach it: %s", self.name, exc)
            await link.close()
            self._fleet.replace(process)
            return
        self._link = link

    def _broken(self, process: DeviceProcess) -> None:
        self._link = None
        self._fleet.replace(process)

    async def _call_async(self, op: int, items: Items) -> Results:
        """One request on the link. Raises: DeviceUnavailable (no process, saturated, no slot
        within the timeout, or from the device), KeyNotFound, FailedPrecondition,
        InvalidArgument."""
        if self._waiting >= self._max_waiting:
            raise DeviceUnavailable(f"{self.name}: {self._max_waiting} requests are already "
                                    "waiting for the device; it is saturated, try again later")
        self._waiting += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self._call_timeout)
            except TimeoutError:
                raise DeviceUnavailable(f"{self.name}: no result within "
                                        f"{self._call_timeout:g} s") from None
            try:
                link = self._link
                if link is None or link.broken:
                    raise DeviceUnavailable(f"the {self.name} device process is restarting")
                try:
                    payload = encode_request(op, items)
                except WireError as exc:
                    raise InvalidArgument("items", f"too long for the device: {exc}") from None
                results = await link.call(payload, self._call_timeout)
            finally:
                self._slots.release()
        finally:
            self._waiting -= 1
        return results

    def _call(self, op: int, items: Items, count: int | None = None) -> Results:
        """``_call_async`` from any thread but the loop's; ``count``: the results expected.
        Raises: as ``_call_async``; DeviceUnavailable once closed."""
        future = self._submit(op, items)
        try:
            results = future.result(self._bound)
        except TimeoutError:  # only if the loop stopped under us (closed meanwhile)
            future.cancel()
            raise DeviceUnavailable(f"{self.name} backend is closed") from None
        return results if count is None else checked(results, count, 0)

    async def _await(self, op: int, items: Items) -> Results:
        """``_call_async`` from another event loop (the aio server's). Raises: as ``_call``."""
        future = self._submit(op, items)
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), self._bound)
        except TimeoutError:
            raise DeviceUnavailable(f"{self.name} backend is closed") from None
        return checked(results, len(items), 0)

    def _submit(self, op: int, items: Items) -> concurrent.futures.Future[Results]:
        """Schedule one call on the private loop. Raises: DeviceUnavailable once closed."""
        if self._closed:
            raise DeviceUnavailable(f"{self.name} backend is closed")
        try:
            return asyncio.run_coroutine_threadsafe(self._call_async(op, items), self._loop)
        except RuntimeError:  # the loop closed between the check and now
            raise DeviceUnavailable(f"{self.name} backend is closed") from None

    # -- KeyBackend --------------------------------------------------------------------------

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """See KeyBackend.seal. Raises: InvalidArgument, KeyNotFound, DeviceUnavailable."""
        return sealed(self._call(SEAL, [(key_id, aad, plaintext)], 1))[0]

    def unseal(self, key_id: bytes, aad: bytes, sealed_body: bytes) -> bytes:
        """See KeyBackend.unseal. Raises: UnsealFailed, KeyNotFound, DeviceUnavailable."""
        result = self._call(UNSEAL, [(key_id, aad, sealed_body)], 1)[0]
        if isinstance(result, InvalidTicket):
            raise result
        return result

    def seal_many(self, items: Items) -> list[bytes]:
        """See KeyBackend.seal_many. Raises: InvalidArgument, KeyNotFound, DeviceUnavailable."""
        return sealed(self._call(SEAL, items, len(items))) if items else []

    def unseal_many(self, items: Items) -> Results:
        """See KeyBackend.unseal_many. Raises: DeviceUnavailable."""
        return self._call(UNSEAL, items, len(items)) if items else []

    async def seal_many_async(self, items: Items) -> list[bytes]:
        """``seal_many`` awaited on the caller's loop. Raises: as ``seal_many``."""
        return sealed(await self._await(SEAL, items)) if items else []

    async def unseal_many_async(self, items: Items) -> Results:
        """``unseal_many`` awaited on the caller's loop. Raises: DeviceUnavailable."""
        return await self._await(UNSEAL, items) if items else []

    async def detach(self) -> None:
        """Nothing to release on the caller's loop (the link has a loop of its own)."""

    def create_key(self, key_id: bytes) -> None:
        """See KeyBackend.create_key. Raises: InvalidArgument, FailedPrecondition,
        DeviceUnavailable."""
        self._call(CREATE_KEY, [(key_id, b"", b"")], 0)

    def destroy_key(self, key_id: bytes) -> None:
        """See KeyBackend.destroy_key. Raises: KeyNotFound, DeviceUnavailable."""
        self._call(DESTROY_KEY, [(key_id, b"", b"")], 0)

    def list_keys(self) -> set[bytes]:
        """See KeyBackend.list_keys. Raises: DeviceUnavailable."""
        return {key_id for key_id in self._call(LIST_KEYS, []) if isinstance(key_id, bytes)}

    def refresh(self) -> None:
        """Nothing to re-read: the one device process alone uses its device (the TPM)."""

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """See KeyBackend.key_attributes. Raises: KeyNotFound, DeviceUnavailable."""
        flags = self._call(KEY_ATTRIBUTES, [(key_id, b"", b"")], 1)[0]
        try:
            return decode_flags(flags if isinstance(flags, bytes) else b"")
        except WireError as exc:
            raise DeviceUnavailable(f"{self.name} device process: bad attributes: {exc}") from None

    def describe(self) -> BackendInfo:
        """What the process's backend reported when it started, and whether it runs now."""
        info = self._info or BackendInfo(self.name, "-", "-", 0)  # not started
        running = len(self.pids())
        return replace(info, library=info.library + self._note,
                       sessions=info.sessions if running else 0, processes=running,
                       process_restarts=self._fleet.restarts)

    def pids(self) -> list[int]:
        """Process id of the device process while it serves calls (for status and tests)."""
        link = self._link
        return [] if link is None or link.broken else [link.process.proc.pid]

    def close(self) -> None:
        """End the device process (it closes its backend), stop the loop, then ``on_close``.
        Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._fleet.stop_replacing()
        link, self._link = self._link, None
        if link is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(link.close(), self._loop).result(10)
        self._fleet.close()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        if self._on_close is not None:
            self._on_close()
