"""Time as a dependency, so tests can move it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

log = logging.getLogger("authority.clock")


class Clock(Protocol):
    """Something that tells the current Unix time in seconds."""

    def now(self) -> float:
        """Return the current time, seconds since the Unix epoch."""
        ...


class SystemClock:
    """The system clock as it is, steps included (``SteadyClock`` is what the service uses)."""

    def __init__(self) -> None:
        self._wall = system_wall()

    def now(self) -> float:
        """Return ``time.time()`` (plus the test seam's offset, when set)."""
        return self._wall()


class ManualClock:
    """A clock that moves only when told to (tests and simulations)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        """Return the current manual time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (must not be negative)."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds


#: fastest rate at which the service clock moves towards a system clock that stepped away from
#: it (500 ppm, as ntpd's maximum slew): an hour-long ticket's life changes by at most 1.8 s
MAX_SLEW: Final = 0.0005
#: a difference between the system clock and the service clock larger than this is a step
#: (logged once per step); smaller ones are NTP's slewing, followed at ``MAX_SLEW``
STEP: Final = 1.0
#: test seam, never set in operation: a file holding a number of seconds added to the system
#: clock this process reads (the chaos command steps one replica's clock without touching the
#: host's); read again at most every ``_SEAM_POLL`` seconds
CLOCK_OFFSET_ENV: Final = "TICKET_AUTHORITY_TEST_CLOCK_OFFSET_FILE"
_SEAM_POLL: Final = 0.05


_BOOTTIME: Final = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _elapsed() -> float:
    """A clock that never steps and counts suspended time (CLOCK_BOOTTIME where Linux has it)."""
    return time.clock_gettime(_BOOTTIME)


class SteadyClock:
    """Wall time that does not jump when the system clock is stepped (by hand, a VM resume, a
    bad NTP source): it advances with a clock that never steps, and moves towards the system
    clock by at most ``MAX_SLEW`` seconds per second (so NTP's own slewing, well under that, is
    followed exactly, and a step is absorbed slowly instead of making every ticket expire early
    or live late at once). A step is logged once. Thread-safe: a redeem reads it."""

    def __init__(self, wall: Callable[[], float] | None = None,
                 elapsed: Callable[[], float] = _elapsed) -> None:
        self._wall = wall or system_wall()
        self._elapsed = elapsed
        self._lock = threading.Lock()
        self._at = elapsed()                  # when ``_time`` was last computed
        self._time = self._wall()             # the service time then
        self._stepped = False

    def now(self) -> float:
        """The service time. Never raises."""
        with self._lock:
            at = self._elapsed()
            steady = self._time + (at - self._at)
            gap = self._wall() - steady
            room = MAX_SLEW * (at - self._at)
            self._time = steady + max(-room, min(room, gap))
            self._at = at
            self._note(gap)
            return self._time

    def _note(self, gap: float) -> None:
        if abs(gap) > STEP and not self._stepped:
            self._stepped = True
            log.warning("the system clock differs from the service clock by %+.1f s (a step): "
                        "not followed; the service clock moves towards it at %.2f %% (%.0f s "
                        "per day)", gap, MAX_SLEW * 100, MAX_SLEW * 86400)
        elif abs(gap) <= STEP and self._stepped:
            self._stepped = False
            log.warning("the system clock and the service clock agree again")

    def offset(self) -> float:
        """System clock minus service clock now (0 unless the system clock stepped)."""
        with self._lock:
            return self._wall() - (self._time + (self._elapsed() - self._at))


def system_wall() -> Callable[[], float]:
    """``time.time``; with the test seam ``CLOCK_OFFSET_ENV`` set, the system clock plus the
    offset in that file (re-read at most every 50 ms; unreadable: no offset)."""
    path = os.environ.get(CLOCK_OFFSET_ENV)
    if not path:
        return time.time
    seam = Path(path)
    cached = {"at": -1.0, "offset": 0.0}

    def wall() -> float:
        now = time.monotonic()
        if now - cached["at"] >= _SEAM_POLL:
            cached["at"] = now
            try:
                cached["offset"] = float(seam.read_text().strip() or 0)
            except (OSError, ValueError):
                cached["offset"] = 0.0
        return time.time() + cached["offset"]

    log.warning("%s is set: this process's clock is offset by the test seam %s",
                CLOCK_OFFSET_ENV, seam)
    return wall
