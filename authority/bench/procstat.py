"""Reading another process from /proc: CPU time, resident memory, and a sampler of its RSS."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authority.bench.loops import Tally

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of ``pid`` and its live descendants (the embedded swtpm,
    device processes; with server.processes the replicas and theirs) so far, all threads;
    None if ``pid`` is unreadable."""
    if pid is None:
        return None
    own = _stat(pid)
    if own is None:
        return None
    return own[1] + sum(child[1] for child in map(_stat, descendants(pid)) if child is not None)


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid``: its children, theirs, and so on. Never raises."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents.setdefault(stat[0], []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = [p for p in parents.get(todo.pop(), []) if p != pid and p not in found]
        found += below
        todo += below
    return found


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        # fields[0] is the state (field 3 of stat): ppid is field 4, utime and stime 14 and 15
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def tree_mb(pid: int | None, field: str, kids: list[int] | None = None) -> float | None:
    """``status_mb`` of ``pid`` plus its descendants' (device processes, swtpm, replicas;
    ``kids`` if known, else found by scanning /proc): shared pages count once per process, so
    this overstates rather than understates."""
    own = status_mb(pid, field)
    if own is None or pid is None:
        return own
    found = descendants(pid) if kids is None else kids
    return own + sum(status_mb(child, field) or 0.0 for child in found)


def status_mb(pid: int | None, field: str) -> float | None:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM...) in MB (2^20 bytes), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples VmRSS of a process and its children every ``interval`` seconds in a thread;
    ``peak_mb`` is the largest sum seen. Use as a context manager around the measured work."""

    #: samples between two scans of /proc for the children (a scan reads every process's
    #: stat file: every 20 ms it cost the bench client a noticeable share of a core)
    RESCAN = 50

    def __init__(self, pid: int | None, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mb: float | None = None
        self._kids: list[int] = []
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        if self.pid is not None and self._samples % self.RESCAN == 0:
            self._kids = descendants(self.pid)
        self._samples += 1
        value = tree_mb(self.pid, "VmRSS", self._kids)
        if value is not None and (self.peak_mb is None or value > self.peak_mb):
            self.peak_mb = value


class CpuMeter:
    """Client (this process), server and database CPU seconds spent between ``start`` and
    ``stop`` (or inside a ``with`` block). The database is the bench's own PostgreSQL
    (``db_pid``: its postmaster, whose children are the backends); None: not measured."""

    def __init__(self, server_pid: int | None, db_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.db_pid = db_pid
        self.client = 0.0
        self.server: float | None = None
        self.db: float | None = None
        self._c0 = 0.0
        self._s0: float | None = None
        self._d0: float | None = None

    def start(self) -> None:
        """Take the starting readings."""
        self._c0 = time.process_time()
        self._s0 = cpu_seconds(self.server_pid)
        self._d0 = cpu_seconds(self.db_pid)

    def stop(self) -> None:
        """Add the CPU spent since ``start``."""
        self.client += time.process_time() - self._c0
        s1, d1 = cpu_seconds(self.server_pid), cpu_seconds(self.db_pid)
        if self._s0 is not None and s1 is not None:
            self.server = (self.server or 0.0) + s1 - self._s0
        if self._d0 is not None and d1 is not None:
            self.db = (self.db or 0.0) + d1 - self._d0

    def __enter__(self) -> CpuMeter:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def charge(self, tally: Tally) -> None:
        """Give the CPU seconds measured to ``tally``."""
        tally.client_cpu, tally.server_cpu, tally.db_cpu = self.client, self.server, self.db
