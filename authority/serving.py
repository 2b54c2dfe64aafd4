"""Whether a replica serves: its store (revocations and epochs confirmed current:
authority/outage.py) AND its key device answering. Health reports the conjunction, so a load
balancer moves gateways off a replica whose device is gone as off one whose store is."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("authority.serving")

#: seconds of device failures with no success between them before the device counts as down
#: (one failed call is not an outage: a session timeout under load is not one either)
DEVICE_DOWN_AFTER: Final = 1.0


class ServingState:
    """The parts a replica needs ("store", "device"), each up or down; listeners hear the
    conjunction change. Thread-safe; listeners are called outside the lock and must not
    block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: set[str] = set()
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def serving(self) -> bool:
        return not self._down

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(serving)`` at each change. Never raises."""
        with self._lock:
            self._listeners.append(listener)

    def set(self, part: str, up: bool) -> None:
        """Record whether ``part`` is up; tell the listeners if serving changed. Never
        raises."""
        with self._lock:
            before = not self._down
            (self._down.discard if up else self._down.add)(part)
            after = not self._down
            listeners = list(self._listeners) if before != after else []
        if before != after:
            log.log(logging.WARNING if after else logging.ERROR, "%s: %s", part,
                    "serving again" if after else "not serving")
        for listener in listeners:
            try:
                listener(after)
            except Exception:
                log.exception("a serving-state listener failed")


class DeviceHealth:
    """Turns the device calls' outcomes into up/down for a ``ServingState``: down once calls
    have failed (DeviceUnavailable) for ``DEVICE_DOWN_AFTER`` seconds without a success,
    up at the first success. ``failed``/``succeeded`` are the hot path: a comparison when
    nothing changes."""

    def __init__(self, report: Callable[[bool], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._report = report
        self._clock = clock
        self._failing_since: float | None = None
        self.last_success = clock()     # when a call last showed the device working
        self.down = False

    def failed(self) -> None:
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        elif not self.down and now - self._failing_since >= DEVICE_DOWN_AFTER:
            self.down = True
            self._report(False)

    def idle_for(self) -> float:
        """Seconds since a call last showed the device working."""
        return self._clock() - self.last_success

    def succeeded(self) -> None:
        self.last_success = self._clock()
        self._failing_since = None
        if self.down:
            self.down = False
            self._report(True)
