"""The session pool: logged-in sessions lent one borrower at a time, first come first served.

It is also the object lock. SoftHSM2's file object store is not safe when keys are created or
destroyed while other sessions use it: C_GenerateKey of a token object while other sessions run
C_FindObjects failed with CKR_GENERAL_ERROR, and using a handle while its key was being destroyed
gave CKR_MECHANISM_INVALID or CKR_KEY_FUNCTION_NOT_PERMITTED. So creating or destroying borrows
the pool *exclusively* (no other session lent), while every other borrow is shared. Holding a
session is therefore the shared side of the read/write lock, at no cost beyond the borrow itself;
an exclusive borrower waits only for the sessions already lent, and borrowers arriving after it
queue behind it (writers are preferred).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from pkcs11 import exceptions as p11x

from authority.backends.pkcs11._gcm import GcmSession
from authority.errors import DeviceUnavailable

log = logging.getLogger("authority.backends.pkcs11")


@dataclass(eq=False)
class PooledSession:
    """One logged-in session, its AES-GCM context and the key handles found in it (a handle
    belongs to its session)."""

    session: Any  # pkcs11 Session
    gcm: GcmSession
    handle: int
    keys: dict[bytes, int] = field(default_factory=dict)
    per_node: bool = False   # ticket keys may be per-node ones (Pkcs11Settings.per_node_keys)


class _Waiter:
    """A borrower queued for a session; served in arrival order. ``gate`` is held until then."""

    __slots__ = ("exclusive", "gate", "served", "slot")

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive
        self.gate = threading.Lock()
        self.gate.acquire()
        self.slot: PooledSession | None = None
        self.served = False


class SessionPool:
    """``size`` sessions; a slot holding None stands for a session still to be opened (at start,
    or after one broke), by the borrower who gets it.

    A returned session goes to the longest waiter (python's queue.Queue lets a thread that gives
    back and asks again overtake a waiter: under load some waited out the timeout).
    """

    def __init__(self, opener: Callable[[], PooledSession], size: int, timeout: float) -> None:
        self._opener = opener
        self._timeout = timeout
        self._lock = threading.Lock()
        self._idle: deque[PooledSession | None] = deque([None] * size)
        self._waiters: deque[_Waiter] = deque()
        self._live: list[PooledSession] = []
        self._lent = 0
        self._exclusive = False  # an exclusive borrower holds the pool
        self._closed = False

    def fill(self) -> None:
        """Open every session not yet open (start-up). Raises: what the opener raises."""
        with self._lock:
            taken = list(self._idle)
            self._idle.clear()
        try:
            for i, slot in enumerate(taken):
                if slot is None:
                    taken[i] = self._open()
        finally:
            with self._lock:
                self._idle.extend(taken)
                self._dispatch()

    def live(self) -> list[PooledSession]:
        """A snapshot of every open pooled session (lent or not)."""
        with self._lock:
            return list(self._live)

    @contextmanager
    def session(self, exclusive: bool = False) -> Iterator[PooledSession]:
        """Borrow a session for the block (``exclusive``: with no other session lent).

        Raises: DeviceUnavailable when none is free within the timeout, the pool is closed, or a
        replacement cannot be opened. A DeviceUnavailable raised by the caller's block drops the
        session; a replacement is opened by the next borrower.
        """
        pooled = self.take(exclusive)
        broken = False
        try:
            yield pooled
        except DeviceUnavailable:
            broken = True
            raise
        finally:
            self.give_back(pooled, broken, exclusive)

    def drain(self) -> list[PooledSession]:
        """Close the pool to borrowers; return the idle sessions (the caller closes them)."""
        with self._lock:
            self._closed = True
            idle = [slot for slot in self._idle if slot is not None]
            self._idle.clear()
            for waiter in self._waiters:
                waiter.served = True
                waiter.gate.release()
            self._waiters.clear()
        return idle

    @contextmanager
    def emptied(self) -> Iterator[None]:
        """Hold the pool exclusively (borrowers already served finish first, later ones wait)
        with every session closed, for a re-initialisation of the module; the slots are then
        opened again by :meth:`fill` or by the next borrowers.

        Raises: DeviceUnavailable (closed, or no exclusive turn within the timeout).
        """
        self._claim(exclusive=True)
        with self._lock:
            closing, self._live = self._live, []
            self._idle = deque([None] * len(self._idle))
        for pooled in closing:   # nothing else is lent: we hold the pool exclusively
            close_quietly(pooled)
        try:
            yield
        finally:
            with self._lock:
                self._put_back(None, exclusive=True)

    def reopen_with(self, opener: Callable[[], PooledSession]) -> None:
        """Open sessions with ``opener`` from now on (a re-initialised module's login)."""
        self._opener = opener

    def forget(self, pooled: PooledSession) -> None:
        """Stop tracking a session (closed by the caller)."""
        with self._lock:
            if pooled in self._live:
                self._live.remove(pooled)

    def take(self, exclusive: bool = False) -> PooledSession:
        """A session of our own: an idle one, or a newly opened one for an empty slot.

        Raises: DeviceUnavailable (closed, timeout, replacement failed).
        """
        slot = self._claim(exclusive)
        if slot is not None:
            return slot
        try:
            return self._open()
        except BaseException:
            with self._lock:
                self._put_back(None, exclusive)
            raise

    def give_back(self, pooled: PooledSession, broken: bool, exclusive: bool = False) -> None:
        """Return a borrowed session; a broken one is closed and its slot left to reopen."""
        slot: PooledSession | None = pooled
        if broken or self._closed:
            self.forget(pooled)
            close_quietly(pooled)
            if broken:
                log.warning("pkcs11 session %d dropped after a device error", pooled.handle)
            slot = None
        with self._lock:
            self._put_back(slot, exclusive)

    def _claim(self, exclusive: bool) -> PooledSession | None:
        """Wait (in turn) for a slot. Raises: DeviceUnavailable (closed, timeout)."""
        with self._lock:
            if self._closed:
                raise DeviceUnavailable("pkcs11 backend is closed")
            if not self._waiters and self._can_lend(exclusive):
                return self._lend(exclusive)
            waiter = _Waiter(exclusive)
            self._waiters.append(waiter)
        waiter.gate.acquire(timeout=self._timeout)
        with self._lock:
            if not waiter.served:
                self._waiters.remove(waiter)
                self._dispatch()  # a writer giving up may let the readers behind it in
                raise DeviceUnavailable(f"no device session free within {self._timeout:g}s")
        if self._closed:  # drained while we waited
            if waiter.slot is not None:
                self.forget(waiter.slot)
                close_quietly(waiter.slot)
            raise DeviceUnavailable("pkcs11 backend is closed")
        return waiter.slot

    def _can_lend(self, exclusive: bool) -> bool:
        """A slot is idle and lending it keeps the exclusivity rule. Call with the lock held."""
        return bool(self._idle) and not self._exclusive and (not exclusive or not self._lent)

    def _lend(self, exclusive: bool) -> PooledSession | None:
        """Take an idle slot for a borrower. Call with the lock held."""
        self._lent += 1
        self._exclusive = exclusive
        return self._idle.popleft()

    def _put_back(self, slot: PooledSession | None, exclusive: bool) -> None:
        """Make a returned slot idle and serve the waiters it allows. Call with the lock held."""
        self._lent -= 1
        if exclusive:
            self._exclusive = False
        if not self._closed:
            self._idle.append(slot)
            self._dispatch()

    def _dispatch(self) -> None:
        """Serve waiters in arrival order while the head one can be. Call with the lock held."""
        while self._waiters and self._can_lend(self._waiters[0].exclusive):
            waiter = self._waiters.popleft()
            waiter.slot = self._lend(waiter.exclusive)
            waiter.served = True
            waiter.gate.release()

    def _open(self) -> PooledSession:
        pooled = self._opener()
        with self._lock:
            self._live.append(pooled)
        return pooled


def close_quietly(pooled: PooledSession) -> None:
    """Close a session, ignoring device errors (it may already be gone)."""
    with suppress(p11x.PKCS11Error):
        pooled.session.close()
