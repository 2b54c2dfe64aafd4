"""A device process driven from an event loop: requests pipelined on its socket, replies
matched in order (the process answers one request at a time, in the order sent)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from authority.backends.processes.process import BrokenProcess, DeviceProcess
from authority.backends.processes.wire import WireError, decode_reply, frame, frame_length
from authority.errors import InvalidTicket

log = logging.getLogger("authority.backends.processes")

Results = list[bytes | InvalidTicket]


class AsyncLink:
    """One device process on the running loop. ``pending`` counts requests in flight."""

    def __init__(self, process: DeviceProcess, on_broken: Callable[[DeviceProcess], None]
                 ) -> None:
        self.process = process
        self._on_broken = on_broken
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.broken = False

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def open(self) -> None:
        """Attach the process's socket to the running loop. Raises: OSError."""
        self.process.channel.sock.settimeout(None)
        reader, self._writer = await asyncio.open_connection(sock=self.process.channel.sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def call(self, payload: bytes, timeout: float) -> Results:
        """Send one request and await its results.

        Raises: DeviceUnavailable, KeyNotFound (from the device); BrokenProcess (the process
        died, timed out or broke the protocol: every request in flight on it fails).
        """
        if self.broken or self._writer is None:
            raise BrokenProcess(f"device process {self.process.index} is being replaced")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._writer.write(frame(payload))
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._break(f"no reply within {timeout:g} s")
            raise BrokenProcess(f"device process {self.process.index} did not answer within "
                                f"{timeout:g} s") from None
        try:
            return decode_reply(reply)
        except WireError as exc:
            self._break(f"bad reply: {exc}")
            raise BrokenProcess(f"device process {self.process.index} sent a bad reply: "
                                f"{exc}") from exc

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                length = frame_length(await reader.readexactly(4))
                payload = await reader.readexactly(length)
                if not self._waiting:
                    raise WireError("a reply nobody asked for")
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(payload)
        except (asyncio.IncompleteReadError, OSError, WireError) as exc:
            self._break(f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            self._fail_waiting("closed")
            raise

    def _break(self, why: str) -> None:
        """Fail every request in flight, stop reading, hand the process back for
        replacement (once). Never raises."""
        if self.broken:
            return
        self.broken = True
        log.error("device process %d (pid %d) failed: %s; replacing it", self.process.index,
                  self.process.proc.pid, why)
        self._fail_waiting(why)
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._on_broken(self.process)

    def _fail_waiting(self, why: str) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(BrokenProcess(
                    f"device process {self.process.index} failed: {why}"))

    async def close(self) -> None:
        """Stop reading and close the socket (the process exits). Never raises."""
        self.broken = True
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
