"""Thread-safe event counters reported by GetStatus (and, later, exported as metrics)."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Named monotonically increasing counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name``."""
        with self._lock:
            self._counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        """Return a copy of every counter."""
        with self._lock:
            return dict(self._counts)
