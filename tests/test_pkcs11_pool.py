"""The PKCS#11 session pool on its own (no device): fairness, exclusive borrows, timeouts.

The pool is also the object lock (create/destroy borrow it exclusively), so these tests pin the
lock's rules: an exclusive borrower waits for the sessions already lent, and borrowers that come
after it wait for it.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import pytest

from authority.backends.pkcs11._pool import PooledSession, SessionPool
from authority.errors import DeviceUnavailable
from tests import conftest


class FakeSession:
    def __init__(self, n: int) -> None:
        self.handle = n
        self.closed = False

    def close(self) -> None:
        self.closed = True


def make_pool(size: int, timeout: float = 2.0) -> tuple[SessionPool, list[PooledSession]]:
    opened: list[PooledSession] = []

    def opener() -> PooledSession:
        gcm: Any = None  # never used: no device here
        pooled = PooledSession(FakeSession(len(opened)), gcm, len(opened))
        opened.append(pooled)
        return pooled

    pool = SessionPool(opener, size, timeout)
    pool.fill()
    return pool, opened


def in_thread(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


wait_until = functools.partial(conftest.wait_until, timeout=5.0, poll=0.005)


def waiting(pool: SessionPool) -> int:
    return len(pool._waiters)


def test_fill_opens_every_session_and_take_reuses_them() -> None:
    pool, opened = make_pool(3)
    assert len(opened) == 3 and pool.live() == opened
    taken = [pool.take() for _ in range(3)]
    assert sorted(p.handle for p in taken) == [0, 1, 2]
    for p in taken:
        pool.give_back(p, broken=False)
    assert len(opened) == 3


def test_exclusive_waits_for_lent_sessions_and_blocks_later_borrowers() -> None:
    pool, _ = make_pool(3)
    events: list[str] = []
    reader = pool.take()

    def writer() -> None:
        with pool.session(exclusive=True):
            events.append("writer in")
            time.sleep(0.05)
            events.append("writer out")

    def late_reader() -> None:
        with pool.session():
            events.append("late reader")

    w = in_thread(writer)
    wait_until(lambda: waiting(pool) == 1)  # two sessions idle, yet the writer waits
    r = in_thread(late_reader)
    wait_until(lambda: waiting(pool) == 2)  # and the later reader queues behind it
    assert events == []
    pool.give_back(reader, broken=False)
    w.join(5)
    r.join(5)
    assert events == ["writer in", "writer out", "late reader"]


def test_readers_share_while_no_writer() -> None:
    pool, _ = make_pool(3)
    lent = [pool.take() for _ in range(3)]
    assert len({id(p) for p in lent}) == 3
    for p in lent:
        pool.give_back(p, broken=False)


def test_exclusive_times_out_and_lets_readers_behind_it_in() -> None:
    pool, _ = make_pool(2, timeout=1.0)
    held = pool.take()
    outcome: list[str] = []

    def writer() -> None:
        try:
            pool.take(exclusive=True)
        except DeviceUnavailable:
            outcome.append("writer timed out")

    def reader() -> None:
        with pool.session():
            outcome.append("reader served")

    w = in_thread(writer)
    wait_until(lambda: waiting(pool) == 1)
    time.sleep(0.5)  # the reader's own timeout must end well after the writer's
    r = in_thread(reader)
    wait_until(lambda: waiting(pool) == 2 or bool(outcome))
    assert outcome == []  # an idle session, yet the reader waits behind the writer
    w.join(5)
    r.join(5)
    assert sorted(outcome) == ["reader served", "writer timed out"]
    pool.give_back(held, broken=False)
    with pool.session(exclusive=True):
        pass


def test_fifo_hand_over() -> None:
    pool, _ = make_pool(1)
    held = pool.take()
    order: list[int] = []

    def borrower(n: int) -> Any:
        def run() -> None:
            with pool.session():
                order.append(n)
        return run

    threads = []
    for n in range(5):
        threads.append(in_thread(borrower(n)))
        wait_until(lambda n=n: waiting(pool) == n + 1)
    pool.give_back(held, broken=False)
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]


def test_broken_session_is_closed_and_reopened_by_the_next_borrower() -> None:
    pool, opened = make_pool(1)
    first = pool.take()
    pool.give_back(first, broken=True)
    assert first.session.closed and first not in pool.live()
    second = pool.take()
    assert second is not first and len(opened) == 2
    pool.give_back(second, broken=False)


def test_exclusive_borrow_that_breaks_releases_exclusivity() -> None:
    pool, _ = make_pool(2)
    with pytest.raises(DeviceUnavailable), pool.session(exclusive=True):
        raise DeviceUnavailable("device failed")
    a, b = pool.take(), pool.take()  # both lendable again (one is a fresh session)
    pool.give_back(a, broken=False)
    pool.give_back(b, broken=False)


def test_drain_wakes_waiters_and_refuses_borrowers() -> None:
    pool, _ = make_pool(1, timeout=5.0)
    held = pool.take()
    errors: list[str] = []

    def waiter() -> None:
        try:
            pool.take()
        except DeviceUnavailable as exc:
            errors.append(exc.message)

    t = in_thread(waiter)
    wait_until(lambda: waiting(pool) == 1)
    assert pool.drain() == []
    t.join(5)
    assert errors == ["pkcs11 backend is closed"]
    pool.give_back(held, broken=False)  # closed after use
    assert held.session.closed
    with pytest.raises(DeviceUnavailable, match="closed"):
        pool.take()
