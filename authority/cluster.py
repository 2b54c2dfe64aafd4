"""Replicas: who this process is among the authorities sharing one store, and the lease that
lets one of them at a time do the periodic work.

Every authority process is a replica, alone (SQLite, one process) or with others (one
PostgreSQL database, or one SQLite file shared by processes on one host): the same code runs in
both cases. A replica is known by a random id made at each start (its host and pid are kept for
display only); it heartbeats into the store (authority/keyring/publish.py ``KeyRing.sync``), and is
*live* while its last heartbeat is at most ``cluster.replica_timeout`` old.

The maintenance lease (``MAINTENANCE``) is a row of the store: holder, fencing epoch, expiry.
The holder renews it at each heartbeat; when it stops (a crash, a partition, a clean stop that
releases it), another replica takes it over once it expires, with the epoch + 1. The periodic
work (scheduled rotation, destruction of keys whose window closed, CREATING sweeps, purges)
runs on the holder only, and every key ring write it makes carries the holder's ``Fence``: the
store refuses it once another replica has taken the lease (``StaleFence``), so a holder that
stalled and woke up late cannot act on what it read before.

Times are the replicas' clocks: their skew shifts when a lease expires or a replica counts as
live, never what the fencing epoch allows.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass

from authority.clock import Clock
from authority.store.base import Fence, Store

log = logging.getLogger(__name__)

#: the lease of the periodic work
MAINTENANCE = "maintenance"


@dataclass(frozen=True)
class ReplicaIdentity:
    """This process among the replicas."""

    replica_id: str     # 16 random hex digits, new at each start
    host: str
    pid: int
    started_at: float

    @classmethod
    def new(cls, clock: Clock) -> ReplicaIdentity:
        """A fresh identity for this process start."""
        return cls(secrets.token_hex(8), socket.gethostname(), os.getpid(), clock.now())

    def __str__(self) -> str:
        return f"{self.replica_id} ({self.host} pid {self.pid})"


class Lease:
    """One named lease as this replica holds it, or tries to. Not thread-safe: one caller (the
    maintenance loop, or a test) at a time."""

    def __init__(self, store: Store, name: str, holder: str, clock: Clock,
                 duration: float) -> None:
        self._store = store
        self._name = name
        self._holder = holder
        self._clock = clock
        self._duration = duration
        self._epoch: int | None = None   # the epoch last granted to us (None: not holding)

    def hold(self) -> Fence | None:
        """Take or renew the lease; the fence to carry on the writes of the work it covers,
        or None if another replica holds it. A change (taken, lost) is logged.

        Raises: DeviceUnavailable (the store failed: whether we hold it is unknown; the work
        must not run).
        """
        epoch = self._store.acquire_lease(self._name, self._holder, self._clock.now(),
                                          self._duration)
        if epoch != self._epoch:
            if epoch is None:
                log.warning("lease %r (epoch %s) was taken over by another replica", self._name,
                            self._epoch)
            else:
                log.info("lease %r taken (epoch %d)", self._name, epoch)
        self._epoch = epoch
        return None if epoch is None else Fence(self._name, self._holder, epoch)

    @property
    def epoch(self) -> int | None:
        """The epoch we last held the lease at (None: not holding)."""
        return self._epoch

    def release(self) -> None:
        """Give the lease up (a clean stop) so another replica takes it at once.

        Raises: DeviceUnavailable.
        """
        if self._epoch is not None:
            self._store.release_lease(self._name, self._holder)
            self._epoch = None
