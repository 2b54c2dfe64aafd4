"""Progress bars on stderr, with no dependency: one line per phase, redrawn in place on a TTY.

On a non-TTY stderr only each phase's closing line is printed (logs stay readable).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 28
_REDRAW = 0.1  # seconds between redraws


class Bar:
    """One phase's bar: ``update`` as work progresses, ``close`` with a summary."""

    def __init__(self, out: TextIO | None, label: str, total: float, unit: str,
                 live: bool) -> None:
        self._out = out
        self._label = label
        self._total = max(total, 1e-9)
        self._unit = unit
        self._live = live
        self._last = 0.0
        self._started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was made."""
        return time.perf_counter() - self._started

    def update(self, done: float, note: str = "") -> None:
        """Redraw (at most every 0.1 s) with ``done`` out of the total."""
        now = time.perf_counter()
        if self._out is None or not self._live or now - self._last < _REDRAW:
            return
        self._last = now
        share = min(1.0, max(0.0, done / self._total))
        filled = int(share * _WIDTH)
        bar = "#" * filled + "." * (_WIDTH - filled)
        text = f"\r{self._label:<22} [{bar}] {share:4.0%} {_amount(done, self._unit)} {note}"
        self._out.write(text[:120].ljust(100))
        self._out.flush()

    def close(self, summary: str) -> None:
        """End the bar with a summary line (elapsed seconds added)."""
        if self._out is None:
            return
        elapsed = time.perf_counter() - self._started
        prefix = "\r" if self._live else ""
        line = f"{prefix}{self._label:<22} {summary} ({elapsed:.1f} s)"
        self._out.write(line.ljust(100) + "\n")
        self._out.flush()


class Progress:
    """Makes bars; ``enabled=False`` makes silent ones. ``tag`` starts every label and line
    (which server a phase ran against, when several run at once)."""

    def __init__(self, enabled: bool, out: TextIO | None = None, tag: str = "") -> None:
        self._out = (out or sys.stderr) if enabled else None
        self._live = bool(self._out is not None and self._out.isatty())
        self._tag = tag

    def tagged(self, tag: str) -> Progress:
        """The same output, every label and line starting with ``tag``."""
        other = Progress(False, tag=tag)
        other._out, other._live = self._out, self._live
        return other

    def bar(self, label: str, total: float, unit: str = "s") -> Bar:
        """A new bar for a phase of ``total`` units (seconds, tickets...)."""
        return Bar(self._out, self._tag + label, total, unit, self._live)

    def say(self, line: str) -> None:
        """Print a line of information on stderr (when progress is enabled)."""
        if self._out is not None:
            self._out.write(self._tag + line + "\n")
            self._out.flush()


def _amount(done: float, unit: str) -> str:
    if unit == "s":
        return f"{done:5.1f} s"
    return f"{int(done):,} {unit}"
