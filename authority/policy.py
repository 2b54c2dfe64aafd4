"""Revocations and realm policy epochs: durable in the store, checked in memory on every redeem.

A revocation covers the tickets of one selector (the identity id_i, the old IKE SA, one ticket
id, or every ticket) issued before its ``issued_before`` time; it is kept until every covered
ticket has expired (``issued_before`` + the maximum lifetime) and purged by maintenance. A
realm's policy epoch starts at 0; bumping it makes every ticket of that realm sealed under an
older epoch REVOKED. Changes are persisted first, then published as a new immutable index, so a
redeem reads one snapshot without a store query.

Replicas sharing the store see each other's changes through the store's policy version, which
every change moves in its transaction: ``refresh`` reads it (one row) and reloads revocations
and epochs when it moved. The authority calls it at each notification of a change (PostgreSQL)
and every ``cluster.heartbeat_interval`` (authority/app.py). Once ``enforce_staleness`` is on,
the copy is trusted for ``store.max_staleness`` seconds after it was last confirmed current
(a successful ``refresh``): past that, ``is_revoked`` raises DeviceUnavailable, so a replica
cut off from its store stops vouching for tickets instead of ignoring revocations it cannot
see.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from authority.audit import SYSTEM, AuditHook
from authority.clock import Clock
from authority.errors import DeviceUnavailable, InvalidArgument
from authority.state import ID_MAX_LEN, ID_MIN_LEN, SPI_LEN
from authority.store.base import RevocationRecord, Store
from authority.ticket_format import MAX_REALM_LEN, TICKET_ID_LEN, TicketContents

BY_ID_I = "id_i"
BY_OLD_SA = "old_sa"
BY_TICKET_ID = "ticket_id"
BY_ISSUED_BEFORE = "issued_before"
KINDS = (BY_ID_I, BY_OLD_SA, BY_TICKET_ID, BY_ISSUED_BEFORE)
MAX_REASON_LEN = 256


def _no_audit(actor: str, action: str, details: Mapping[str, Any]) -> None:
    """The audit hook of a Policy built without one."""


def _check_value(kind: str, value: bytes) -> None:
    """Raises: InvalidArgument naming the selector field if ``value`` cannot select ``kind``."""
    if kind == BY_ID_I and not ID_MIN_LEN <= len(value) <= ID_MAX_LEN:
        raise InvalidArgument("id_i", f"{ID_MIN_LEN} to {ID_MAX_LEN} octets, got {len(value)}")
    if kind == BY_OLD_SA and len(value) != 2 * SPI_LEN:
        raise InvalidArgument("old_sa", f"spi_i | spi_r: {2 * SPI_LEN} octets, got {len(value)}")
    if kind == BY_TICKET_ID and len(value) != TICKET_ID_LEN:
        raise InvalidArgument("ticket_id", f"must be {TICKET_ID_LEN} octets")


def check_realm(realm: str, field_name: str = "realm") -> str:
    """Return ``realm`` if it may name a realm ("" is the default realm).

    Raises: InvalidArgument naming ``field_name``.
    """
    if len(realm.encode("utf-8", "surrogatepass")) > MAX_REALM_LEN:
        raise InvalidArgument(field_name, f"at most {MAX_REALM_LEN} octets of UTF-8")
    if not realm.isprintable():
        raise InvalidArgument(field_name, "control characters are not allowed")
    return realm


@dataclass(frozen=True)
class _Index:
    """One immutable snapshot: per selector value, the latest ``issued_before`` cutoff."""

    by_kind: Mapping[str, Mapping[bytes, float]] = field(
        default_factory=lambda: MappingProxyType({k: MappingProxyType({}) for k in KINDS}))
    epochs: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    revocations: bool = False  # any revocation at all (the hot path skips the lookups if not)


def _build(records: list[RevocationRecord], epochs: dict[str, int]) -> _Index:
    by_kind: dict[str, dict[bytes, float]] = {k: {} for k in KINDS}
    for r in records:
        table = by_kind[r.kind]
        table[r.value] = max(table.get(r.value, -math.inf), r.issued_before)
    return _Index(MappingProxyType({k: MappingProxyType(v) for k, v in by_kind.items()}),
                  MappingProxyType(dict(epochs)), bool(records))


class Policy:
    """Thread-safe revocation list and realm epochs over a store."""

    def __init__(self, store: Store, clock: Clock, max_lifetime: int,
                 audit: AuditHook | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._monotonic = monotonic   # staleness is measured on it, not on ``clock``
        self._audit: AuditHook = audit or _no_audit  # called after validation, before a commit
        self._clock = clock
        self._max_lifetime = max_lifetime
        self._horizon = 0.0  # until when tickets granted a longer lifetime may be live
        self._lock = threading.Lock()  # serialises changes; readers use the published snapshot
        self._records: list[RevocationRecord] = []
        self._epochs: dict[str, int] = {}
        self._index = _Index()
        self._version = -1                  # the store's policy version the copy reflects
        self._confirmed_at = -math.inf      # when the copy was last known current (monotonic)
        self._max_staleness: float | None = None   # set by ``enforce_staleness``
        self._fresh_until = math.inf        # ``is_revoked`` refuses past this (monotonic)

    def load(self) -> None:
        """Record this start's maximum lifetime in the store (which gives the lifetime
        horizon), then read revocations and epochs. Raises: DeviceUnavailable."""
        with self._lock:
            started = self._monotonic()
            now = self._clock.now()
            self._horizon = self._store.record_max_lifetime(self._max_lifetime, now)
            self._reload(now)
        self._confirmed(started)

    def refresh(self) -> bool:
        """Confirm the copy is current: read the store's policy version and, if it moved (a
        change made by another replica, or by this one), read revocations and epochs again.
        Returns whether they were read again.

        Raises: DeviceUnavailable (the copy stays as it was, unconfirmed: it ages).
        """
        started = self._monotonic()
        moved = self._store.policy_version() != self._version
        if moved:
            with self._lock:
                self._reload(self._clock.now())
        self._confirmed(started)
        return moved

    def _reload(self, now: float) -> None:
        """Read version, revocations and epochs (in that order: the copy is at least as new
        as the version it records); callers hold ``_lock``. Raises: DeviceUnavailable."""
        version = self._store.policy_version()
        self._records = self._store.load_revocations(now)
        self._epochs = self._store.load_epochs()
        self._version = version
        self._publish()

    def _confirmed(self, at: float) -> None:
        """The copy was current at ``at`` (monotonic)."""
        with self._lock:
            self._confirmed_at = max(self._confirmed_at, at)
            if self._max_staleness is not None:
                self._fresh_until = self._confirmed_at + self._max_staleness

    def enforce_staleness(self, max_staleness: float) -> None:
        """From now on ``is_revoked`` raises DeviceUnavailable when the copy was last confirmed
        current more than ``max_staleness`` seconds ago (someone must ``refresh`` it more often
        than that: authority/app.py's policy watch)."""
        with self._lock:
            self._max_staleness = max_staleness
            self._fresh_until = self._confirmed_at + max_staleness

    def fresh(self) -> bool:
        """Whether the copy may be used: confirmed within the staleness bound (always, while it
        is not enforced)."""
        return self._monotonic() <= self._fresh_until

    @property
    def enforcing(self) -> bool:
        """Whether the staleness bound is enforced (``enforce_staleness``)."""
        return self._max_staleness is not None

    @property
    def max_staleness(self) -> float | None:
        """The enforced staleness bound in seconds (None: not enforced)."""
        return self._max_staleness

    @property
    def confirmed_at(self) -> float:
        """When (monotonic) the copy was last confirmed current (-inf: never)."""
        return self._confirmed_at

    def confirmed_age(self) -> float:
        """Seconds since the copy was last confirmed current (inf: never)."""
        return self._monotonic() - self._confirmed_at

    def stale_error(self) -> DeviceUnavailable:
        """What a call that needs a fresh copy is refused with."""
        return DeviceUnavailable(
            f"revocations and realm epochs were last confirmed {self.confirmed_age():.1f} s "
            f"ago, more than store.max_staleness ({self._max_staleness} s): the state store "
            "cannot be reached from this replica; retry on another")

    def _publish(self) -> None:
        self._index = _build(self._records, self._epochs)

    def retention(self, since: float) -> float:
        """Until when something about tickets issued before ``since`` must be kept (a
        revocation, a consumed entry): every such ticket has expired by then, whatever maximum
        lifetime it was granted under (``since`` + the current maximum, or the store's lifetime
        horizon after a lowered maximum, whichever is later)."""
        return max(math.ceil(since) + self._max_lifetime, self._horizon)

    # -- the hot path ----------------------------------------------------------------------------

    def epoch(self, realm: str) -> int:
        """The realm's current policy epoch (0 if never bumped)."""
        return self._index.epochs.get(realm, 0)

    def is_revoked(self, contents: TicketContents) -> bool:
        """True if a revocation covers the ticket or its realm's epoch has moved past it.

        Raises: DeviceUnavailable if the copy is past the enforced staleness bound.
        """
        if self._monotonic() > self._fresh_until:
            raise self.stale_error()
        index = self._index
        if contents.policy_epoch < index.epochs.get(contents.realm, 0):
            return True
        if not index.revocations:
            return False
        issued = contents.issued_at
        s = contents.state
        for kind, value in ((BY_ISSUED_BEFORE, b""), (BY_ID_I, s.id_i),
                            (BY_OLD_SA, s.spi_i + s.spi_r), (BY_TICKET_ID, contents.ticket_id)):
            cutoff = index.by_kind[kind].get(value)
            if cutoff is not None and issued < cutoff:
                return True
        return False

    # -- changes ---------------------------------------------------------------------------------

    def revoke(self, kind: str, value: bytes, issued_before: float | None = None,
               reason: str = "", actor: str = SYSTEM) -> RevocationRecord:
        """Revoke the tickets of a selector issued before ``issued_before`` (default: now, i.e.
        every such ticket issued so far). The request is validated completely, then audited
        (``tickets.revoke`` by ``actor``), then stored: a refused request leaves no audit line.

        Raises: InvalidArgument (naming the selector field or ``reason``), AuditUnavailable
        (nothing stored), DeviceUnavailable.
        """
        record = self._revocation(kind, value, issued_before, reason)
        self._audit(actor, "tickets.revoke", {
            "selector": record.kind, "value": record.value.hex(),
            "issued_before": record.issued_before, "reason": record.reason,
            "expires_at": record.expires_at})
        with self._lock:
            record = self._store.add_revocation(record)
            self._records = [*self._records, record]
            self._publish()
        return record

    def _revocation(self, kind: str, value: bytes, issued_before: float | None,
                    reason: str) -> RevocationRecord:
        """The revocation a request asks for, every field checked.

        Raises: InvalidArgument naming the selector field or ``reason``.
        """
        now = self._clock.now()
        if kind not in KINDS:
            raise InvalidArgument("selector", f"unknown kind {kind!r}")
        if len(reason) > MAX_REASON_LEN:
            raise InvalidArgument("reason", f"at most {MAX_REASON_LEN} characters, "
                                            f"got {len(reason)}")
        if kind == BY_ISSUED_BEFORE:
            if issued_before is None or issued_before <= 0:
                raise InvalidArgument("issued_before", "required")
            if issued_before > now:
                raise InvalidArgument("issued_before", "must not be in the future")
            value = b""
        else:
            _check_value(kind, value)
            # Tickets are stamped with whole seconds: the next second covers the current one.
            issued_before = math.floor(now) + 1
        return RevocationRecord(0, kind, value, issued_before, now, self.retention(issued_before),
                                reason)

    def bump_epoch(self, realm: str, actor: str = SYSTEM) -> int:
        """Move a realm to its next policy epoch; older tickets of that realm become REVOKED.
        The realm is checked, then the bump audited (``policy.epoch_bump`` by ``actor``), then
        stored: a refused request leaves no audit line.

        Raises: InvalidArgument (realm), AuditUnavailable (nothing changed), DeviceUnavailable.
        """
        check_realm(realm)
        self._audit(actor, "policy.epoch_bump", {"realm": realm})
        with self._lock:
            epoch = self._store.bump_epoch(realm, self._clock.now())
            self._epochs = {**self._epochs, realm: epoch}
            self._publish()
        return epoch

    def purge(self) -> int:
        """Forget revocations whose tickets have all expired. Raises: DeviceUnavailable."""
        now = self._clock.now()
        with self._lock:
            purged = self._store.purge_revocations(now)
            live = [r for r in self._records if r.expires_at > now]
            if len(live) != len(self._records):
                self._records = live
                self._publish()
        return purged

    # -- views -----------------------------------------------------------------------------------

    def revocations(self) -> list[RevocationRecord]:
        """The live revocations, oldest first."""
        now = self._clock.now()
        return [r for r in self._records if r.expires_at > now]

    def epochs(self) -> dict[str, int]:
        """Every realm with an epoch above 0."""
        return dict(self._index.epochs)
