"""A fair pool of idle items: a returned item goes straight to the caller that has waited
longest, so a thread that gives an item back and asks again at once cannot take it from
the others (``queue.Queue`` lets it: measured, a bench thread starved for 5 s behind three
others on two device processes)."""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class _Waiter(Generic[T]):
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.item: T | None = None


class Handoff(Generic[T]):
    """Idle items, first in first out; waiting callers served in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: collections.deque[T] = collections.deque()
        self._waiters: collections.deque[_Waiter[T]] = collections.deque()

    def put(self, item: T) -> None:
        """Give ``item`` to the longest-waiting caller, or keep it idle."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.item = item
                waiter.ready.set()
            else:
                self._idle.append(item)

    def get(self, timeout: float) -> T | None:
        """An idle item, waiting up to ``timeout`` seconds behind earlier callers; None if
        none came."""
        with self._lock:
            if self._idle:
                return self._idle.popleft()
            waiter: _Waiter[T] = _Waiter()
            self._waiters.append(waiter)
        waiter.ready.wait(timeout)
        with self._lock:
            if waiter.item is None:  # timed out and not served meanwhile: leave the line
                self._waiters.remove(waiter)
            return waiter.item
