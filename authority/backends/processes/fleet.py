"""The device processes' life cycle: start them, replace one that failed, end them all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from authority.backends.processes.process import DeviceProcess
from authority.errors import StartupError

log = logging.getLogger("authority.backends.processes")


class Fleet:
    """``count`` device processes opened with ``hello``. ``on_ready`` is called with each
    process once it has its session (at start and after each replacement). Thread-safe."""

    def __init__(self, hello: dict[str, Any], count: int, on_ready: Callable[[DeviceProcess], None],
                 start_timeout: float = 60.0) -> None:
        self.count = count
        self._hello = hello
        self._on_ready = on_ready
        self._start_timeout = start_timeout
        self._lock = threading.Lock()
        self._live: dict[int, DeviceProcess] = {}
        self.restarts = 0           # processes replaced (died, hung, broke the protocol)
        self.closed = threading.Event()

    def start(self) -> None:
        """Start every process and open their sessions one after the other (the interpreters
        start in parallel). A process that fails to open gets one more try, in a new process.

        Raises: StartupError (the reason of a process that failed twice; none is left running).
        """
        started = [DeviceProcess.spawn(i) for i in range(self.count)]
        try:
            for n, process in enumerate(started):
                started[n] = self._open(process)
        except StartupError:
            for process in started:
                process.kill()
            raise
        for process in started:
            self._adopt(process)

    def _open(self, process: DeviceProcess) -> DeviceProcess:
        """``process`` with its session, or a new one if it failed once. Raises: StartupError."""
        try:
            process.open(self._hello, self._start_timeout)
            return process
        except StartupError as exc:
            log.warning("device process %d failed to open its session, trying a new one: %s",
                        process.index, exc)
        again = DeviceProcess.spawn(process.index)
        try:
            again.open(self._hello, self._start_timeout)
        except StartupError:
            again.kill()
            raise
        return again

    @property
    def running(self) -> int:
        """Processes that have their session and are not being replaced."""
        with self._lock:
            return len(self._live)

    def live(self) -> list[DeviceProcess]:
        """The running processes."""
        with self._lock:
            return list(self._live.values())

    def _adopt(self, process: DeviceProcess) -> None:
        with self._lock:
            self._live[process.index] = process
        self._on_ready(process)

    def replace(self, process: DeviceProcess) -> None:
        """Kill ``process`` and start its successor in the background (retrying with backoff
        until it starts or the fleet closes). Never raises."""
        process.kill()
        with self._lock:
            if self._live.get(process.index) is not process:
                return  # already replaced
            del self._live[process.index]
            self.restarts += 1
        if not self.closed.is_set():
            threading.Thread(target=self._respawn, args=(process.index,),
                             name=f"device-process-{process.index}", daemon=True).start()

    def _respawn(self, index: int) -> None:
        delay = 0.5
        while not self.closed.is_set():
            try:
                process = DeviceProcess.spawn(index)
                process.open(self._hello, self._start_timeout)
            except StartupError as exc:
                log.error("device process %d could not restart (retry in %g s): %s",
                          index, delay, exc)
                self.closed.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self.closed.is_set():
                process.close()
                return
            log.info("device process %d restarted (pid %d)", index, process.proc.pid)
            self._adopt(process)
            return

    def stop_replacing(self) -> None:
        """No replacement starts from now on; the running processes stay."""
        self.closed.set()

    def close(self) -> None:
        """End every process (closing its channel: it logs out and exits). Never raises."""
        self.closed.set()
        with self._lock:
            processes, self._live = list(self._live.values()), {}
        for process in processes:
            process.close()
