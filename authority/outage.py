"""What one replica does about its state store being out of reach, and how it keeps its copy of
the revocations and realm epochs current (issue 13).

``PolicyWatch`` runs two threads. The first waits on the store's change feed (a PostgreSQL
LISTEN connection: a notification arrives when another replica commits a revocation or an
epoch bump; SQLite: a timer) for at most ``cluster.heartbeat_interval`` at a time, then
``Policy.refresh``: one read of the policy version, and revocations and epochs read again only
if it moved. So a change is applied by every replica when its notification arrives, and at the
latest one heartbeat interval (plus the re-read) after it committed if the notification is
lost. The second thread only looks at the clock: once the copy was last confirmed current more
than ``store.max_staleness`` seconds ago (the store cannot be reached, or answers too slowly)
the replica reports NOT_SERVING, and SERVING again once a refresh succeeds; it does not depend
on a store call returning.

While the store is out of reach, a redeem without consume answers from the copy for those
``store.max_staleness`` seconds (authority/sealer.py ``Sealer._consumed_among``): its
consumed-set lookup (which only says REPLAYED instead of OK) is skipped, and counted
(``redeem.consumed_unchecked``). Everything that writes the store -- a consume, a seal
reservation, an admin action -- fails UNAVAILABLE (authority/store/postgres/ fails its calls at
once while it is down). Why the lookup may be skipped: a ticket's single use is enforced where
it is consumed (``consume = true`` or ConsumeTicket after IKE_AUTH), and that fails closed; a
redeem without consume never marked anything, and a gateway that resumes without consuming
accepts a ticket more than once anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from authority.errors import AuthorityError
from authority.policy import Policy
from authority.store.base import ChangeFeed, Store

log = logging.getLogger(__name__)

#: the counter of consumed-set lookups skipped while the store was out of reach
UNCHECKED = "redeem.consumed_unchecked"
#: at most this many seconds between two looks at the staleness of the copy
_TICK = 0.1


class PolicyWatch:
    """Keeps a replica's policy copy current and says whether the replica is serving (see the
    module's docstring). ``start`` once, ``stop`` once."""

    def __init__(self, store: Store, policy: Policy, interval: float, max_staleness: float,
                 on_recovered: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._policy = policy
        self._interval = interval
        self._max_staleness = max_staleness
        self._on_recovered = on_recovered
        self._listeners: list[Callable[[bool], None]] = []
        self._serving = True
        self._failing = False           # the last refresh failed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._feed: ChangeFeed | None = None

    @property
    def serving(self) -> bool:
        """Whether the policy copy is fresh enough to serve redeems."""
        return self._serving

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(serving)`` at each change of ``serving`` (from the watch's thread;
        it must not block)."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Enforce the staleness bound and start the threads."""
        self._policy.enforce_staleness(self._max_staleness)
        self._feed = self._store.changes()
        for name, target in (("policy-watch", self._follow), ("serving-watch", self._judge)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop the threads (waits for a refresh in progress, at most a few seconds)."""
        self._stop.set()
        if self._feed is not None:
            self._feed.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _follow(self) -> None:
        feed = self._feed
        assert feed is not None
        try:
            while not self._stop.is_set():
                self._refresh()
                feed.wait(self._interval)
        finally:
            feed.close()

    def _refresh(self) -> None:
        """One refresh; a failure is logged when it starts, a recovery when it ends."""
        try:
            if self._policy.refresh():
                log.debug("revocations and realm epochs read again (a change)")
        except AuthorityError as exc:
            if not self._failing:
                log.warning("cannot confirm the revocations and realm epochs: %s", exc.message)
            self._failing = True
            return
        except Exception:
            log.exception("policy refresh failed unexpectedly")
            self._failing = True
            return
        if self._failing:
            self._failing = False
            log.warning("revocations and realm epochs confirmed again")
            self._on_recovered()

    def _judge(self) -> None:
        tick = min(_TICK, self._max_staleness / 10)
        while not self._stop.wait(tick):
            serving = self._policy.fresh()
            if serving == self._serving:
                continue
            self._serving = serving
            if serving:
                log.warning("serving again: revocations and realm epochs confirmed current")
            else:
                log.error("NOT_SERVING: revocations and realm epochs not confirmed for %.1f s "
                          "(store.max_staleness %s s); redeems fail UNAVAILABLE until the "
                          "store answers", self._policy.confirmed_age(), self._max_staleness)
            for listener in self._listeners:
                try:
                    listener(serving)
                except Exception:
                    log.exception("a serving-state listener failed")
