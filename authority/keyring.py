"""The key ring: which key seals, which keys open, and the rules that move keys through their life.

Modelled on Vault transit's key policy: a single sealing (ACTIVE) key; DECRYPT_ONLY keys open
tickets until their window closes; unknown, destroyed, missing or out-of-window ids are refused
before any device call. Metadata lives in the store; the keys themselves only in the device.

Replicas (authority/cluster.py) share the ring through the store; one process alone is a
cluster of one and runs the same code:

- The ring has a version in the store. Every change of it (rotation, publication, retirement,
  destruction, MISSING/found) is computed from this replica's copy and committed with a
  compare-and-swap on the version (``Store.commit_ring``), in one transaction with the record
  changes; a replica whose copy was stale re-reads the ring and decides again (``_apply``). Two
  rotations at once: one commits, the other finds the ring moved, destroys the key it created
  and adopts the winner's (one new key, never two sealing keys).
- A new key is first PENDING: every replica opens tickets under it, none seals with it; the
  previous ACTIVE key keeps sealing. Each replica reports in its heartbeat the keys its own
  device holds (``loaded``, checked by listing the device: a key may one day reach a replica's
  token by another route); the key becomes ACTIVE once every live replica has reported it, or
  ``keys.publish_delay`` after its creation. With no other live replica it is ACTIVE at once.
- Seals are reserved in blocks from the store (``Store.reserve_seals``, atomic across replicas),
  so a key's nonce budget counts every replica's seals. A replica seals only while its copy of
  the ring was confirmed current within ``cluster.replica_timeout`` (its heartbeat confirms it);
  so when a key stops sealing, a replica that has not noticed yet stops within that bound, and
  the key's decryption window is that much longer when other replicas are live.
- A redeem under a key id the ring does not know re-reads the ring once (at most one re-read
  per ``UNKNOWN_KEY_REREAD_GAP`` seconds, so garbage tickets cannot hammer the store).

The ring is reconciled with the keys the device lists at start, at each maintenance pass and
when the device cannot find the sealing key (``_reconcile``): a key the device does not list is
MISSING, never marked destroyed for that (a lost key directory, a removed token object: it may
come back); a sealing key it does not list is replaced by a new one, ACTIVE at once. A key is
recorded CREATING before it is created in the device, so a crash or a timed-out create leaves a
record; the maintenance lease holder gives it up once ``CREATING_GRACE`` has passed (the record
first marked DESTROYED with a compare-and-swap, then the key destroyed, then the record
dropped). Device keys the ring never recorded are left alone (the token may be shared).
CREATING records are bookkeeping outside the ring's version: recording one does not move it.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from types import EllipsisType, MappingProxyType
from typing import Any

from authority.audit import SYSTEM, AuditHook
from authority.backends.base import KeyBackend
from authority.clock import Clock
from authority.cluster import ReplicaIdentity
from authority.config import ClusterSettings, KeyPolicy, TicketPolicy
from authority.errors import (
    AuthorityError,
    DeviceUnavailable,
    FailedPrecondition,
    InvalidTicket,
    KeyNotFound,
    NotFound,
)
from authority.keys import KeyRecord, KeyState
from authority.store.base import Fence, ReplicaRecord, Store
from authority.ticket_format import KEY_ID_LEN

log = logging.getLogger(__name__)

#: seconds a CREATING key waits for its creation to complete before it is given up: longer than
#: any device call (a TPM create may finish after its caller timed out)
CREATING_GRACE = 600.0
#: compare-and-swap attempts of one key ring change before it fails UNAVAILABLE
CAS_ATTEMPTS = 8
#: seconds between two re-reads of the key ring caused by tickets under unknown key ids
UNKNOWN_KEY_REREAD_GAP = 1.0
#: seconds a redeem waits for a key ring change in progress before it skips its re-read
_REREAD_WAIT = 2.0
#: the states of keys that open tickets (a replica reports those its device holds)
_OPENING = (KeyState.ACTIVE, KeyState.PENDING, KeyState.DECRYPT_ONLY)

_Event = tuple[str, str, dict[str, Any]]   # (actor, action, details) for the audit hook


def _no_audit(actor: str, action: str, details: Mapping[str, Any]) -> None:
    """The audit hook of a key ring built without one."""


def _age(record: KeyRecord) -> tuple[float, float, bool, bytes]:
    """Oldest first: by creation, then (keys made in the same instant) those that stopped
    sealing first, the ACTIVE key before the PENDING one."""
    ended = record.sealing_ended_at
    return (record.created_at, math.inf if ended is None else ended,
            record.state == KeyState.PENDING, record.key_id)


@dataclass
class _Change:
    """One key ring change: records to save and to delete, and what to audit before it
    commits."""

    save: list[KeyRecord] = field(default_factory=list)
    delete: list[bytes] = field(default_factory=list)
    events: list[_Event] = field(default_factory=list)


class KeyRing:
    """Thread-safe key ring over a backend and a store, as one replica sees it."""

    def __init__(self, backend: KeyBackend, store: Store, keys: KeyPolicy,
                 tickets: TicketPolicy, clock: Clock, audit: AuditHook | None = None,
                 cluster: ClusterSettings | None = None,
                 replica: ReplicaIdentity | None = None) -> None:
        self._backend = backend
        self._audit: AuditHook = audit or _no_audit   # called before a change is committed
        self._store = store
        self._policy = keys
        self._cluster = cluster or ClusterSettings()
        self._replica = replica or ReplicaIdentity.new(clock)
        self._max_lifetime = tickets.max_lifetime
        self._clock = clock
        # the ring as last read or committed (_change_lock): published records, CREATING ones
        self._records: Mapping[bytes, KeyRecord] = MappingProxyType({})
        self._creating: dict[bytes, KeyRecord] = {}
        self._version = -1                   # the ring version the copy reflects (-1: none)
        self._primary: bytes | None = None   # the ACTIVE key
        self._pending: bytes | None = None   # the PENDING key, if any
        self._verified: set[bytes] = set()   # keys this replica's device was seen to hold
        self._confirmed_at = -math.inf       # when the copy was last confirmed current
        self._reread_at = -math.inf          # when a redeem last made the ring be re-read
        self._block_key: bytes | None = None  # the key of the seal block (_seal_lock)
        self._next = 0                       # next seal number of the block (_seal_lock)
        self._end = 0                        # end of the block, exclusive (_seal_lock)
        self._seal_lock = threading.Lock()
        self._change_lock = threading.RLock()  # the copy, rotation, retirement, maintenance
        self._reread_lock = threading.Lock()

    # -- start-up, heartbeat, leaving ----------------------------------------------------------

    def load(self) -> None:
        """Read the ring, register this replica (a heartbeat), reconcile with the device, and
        make a first key if none seals.

        Raises: DeviceUnavailable, AuditUnavailable.
        """
        with self._change_lock:
            now = self._clock.now()
            self._reload()
            present = self._backend.list_keys()
            self._verified = set(present)
            self._heartbeat(now)
            self._confirmed_at = now
            self._reconcile(present)
            if self._primary is None:
                self.rotate(reason="first key", immediate=True, replacing=None)
            for key_id in sorted(present - self._records.keys() - self._creating.keys()):
                log.warning("device key %s has no key ring entry; it is not used", key_id.hex())

    def sync(self) -> None:
        """One heartbeat of this replica: re-read the ring if its version moved, check in the
        device the keys not yet seen there, report them (with the ring version) in the store,
        and publish the PENDING key if every live replica has it or its delay has passed.

        Raises: DeviceUnavailable (the store failed; a device failure is logged and the keys
        it could not check are reported at a later heartbeat), AuditUnavailable.
        """
        with self._change_lock:
            now = self._clock.now()
            self._refresh()
            self._verify_loaded()
            self._heartbeat(now)
            self._confirmed_at = now
            if self._pending is not None:
                self._apply(lambda: self._promotion(None))

    def leave(self) -> None:
        """Remove this replica from the store's registry (a clean stop): it no longer counts
        as live. Raises: DeviceUnavailable."""
        self._store.remove_replica(self._replica.replica_id)

    def _heartbeat(self, now: float) -> None:
        loaded = frozenset(self._verified & self._opening_ids())
        self._store.heartbeat(ReplicaRecord(
            self._replica.replica_id, self._replica.host, self._replica.pid,
            self._replica.started_at, now, self._version, loaded))

    def _verify_loaded(self) -> None:
        """List the device when the ring has opening keys it was not yet seen to hold."""
        if not self._opening_ids() - self._verified:
            return
        try:
            self._verified = set(self._backend.list_keys())
        except DeviceUnavailable as exc:
            log.warning("could not list the device's keys: %s", exc.message)

    def _confirm(self) -> None:
        """Confirm the copy of the ring is current (re-read it if not) and heartbeat, unless
        another thread just did. Raises: DeviceUnavailable."""
        with self._change_lock:
            now = self._clock.now()
            if now - self._confirmed_at <= self._cluster.replica_timeout:
                return
            self._refresh()
            self._heartbeat(now)
            self._confirmed_at = now

    # -- reading the ring ----------------------------------------------------------------------

    def _reload(self) -> None:
        """Read the whole ring (CREATING records too). Raises: DeviceUnavailable."""
        version, stored = self._store.load_ring()
        published = {r.key_id: r for r in stored if r.state != KeyState.CREATING}
        creating = {r.key_id: r for r in stored if r.state == KeyState.CREATING}
        self._install(published, creating, version)

    def _refresh(self) -> None:
        """Re-read the ring if its version moved. Raises: DeviceUnavailable."""
        if self._store.ring_version() != self._version:
            self._reload()

    def _install(self, records: dict[bytes, KeyRecord], creating: dict[bytes, KeyRecord],
                 version: int) -> None:
        self._records = MappingProxyType(dict(records))
        self._creating = creating
        self._version = version
        active = [r for r in records.values() if r.state == KeyState.ACTIVE]
        pending = [r for r in records.values() if r.state == KeyState.PENDING]
        primary = max(active, key=lambda r: r.created_at).key_id if active else None
        self._pending = max(pending, key=lambda r: r.created_at).key_id if pending else None
        with self._seal_lock:
            self._primary = primary
            if self._block_key != primary:   # never seal from a block of a key that stopped
                self._block_key, self._next, self._end = None, 0, 0

    def _opening_ids(self) -> set[bytes]:
        return {k for k, r in self._records.items() if r.state in _OPENING}

    def reread_unknown(self) -> None:
        """A redeem met a key id the ring does not know: re-read the ring if its version moved
        (a key made on another replica), at most once per ``UNKNOWN_KEY_REREAD_GAP`` seconds
        and without waiting long for a change in progress. Never raises (a failure is logged;
        the ticket is then INVALID)."""
        now = self._clock.now()
        with self._reread_lock:
            if self._reread_at <= now < self._reread_at + UNKNOWN_KEY_REREAD_GAP:
                return
            self._reread_at = now
        if not self._change_lock.acquire(timeout=_REREAD_WAIT):
            return
        try:
            self._refresh()
        except AuthorityError as exc:
            log.warning("could not re-read the key ring for an unknown key id: %s", exc.message)
        finally:
            self._change_lock.release()

    def knows(self, key_id: bytes) -> bool:
        """Whether the ring has a record of ``key_id`` (in any published state)."""
        return key_id in self._records

    # -- committing changes --------------------------------------------------------------------

    def _apply(self, build: Callable[[], _Change | None], fence: Fence | None = None,
               audited: list[_Event] | None = None) -> bool:
        """Commit the change ``build`` computes from the copy of the ring, with a
        compare-and-swap on its version; if the ring moved, re-read it and build again. Each
        event is audited once, before the commit. Callers hold ``_change_lock``.

        Returns False if ``build`` found nothing to do (None). Raises: DeviceUnavailable (also
        when the ring kept moving), StaleFence, AuditUnavailable.
        """
        audited = [] if audited is None else audited
        for _ in range(CAS_ATTEMPTS):
            change = build()
            if change is None:
                return False
            for event in change.events:
                if event not in audited:
                    self._audit(*event)
                    audited.append(event)
            version = self._store.commit_ring(self._version, change.save, change.delete, fence)
            if version is not None:
                self._install_change(change, version)
                return True
            self._reload()
        raise DeviceUnavailable(f"the key ring changed {CAS_ATTEMPTS} times during one update; "
                                "retry")

    def _install_change(self, change: _Change, version: int) -> None:
        records = dict(self._records)
        creating = dict(self._creating)
        for record in change.save:
            if record.state == KeyState.CREATING:
                creating[record.key_id] = record
            else:
                records[record.key_id] = record
                creating.pop(record.key_id, None)
        for key_id in change.delete:
            records.pop(key_id, None)
            creating.pop(key_id, None)
        self._install(records, creating, version)

    def _live_others(self, now: float) -> list[ReplicaRecord]:
        """The other replicas whose last heartbeat is within ``cluster.replica_timeout``.
        Raises: DeviceUnavailable."""
        bound = now - self._cluster.replica_timeout
        return [r for r in self._store.load_replicas()
                if r.replica_id != self._replica.replica_id and r.heartbeat_at >= bound]

    # -- the hot paths ---------------------------------------------------------------------------

    def sealing_key(self) -> bytes:
        """Return the ACTIVE key's id, with one seal counted against its nonce budget.

        Seals come from blocks reserved in the store; when the key's budget is spent it is
        rotated. Raises: DeviceUnavailable (no sealing key; the store failed; the spent key's
        successor is still pending publication: retry).
        """
        if self._clock.now() - self._confirmed_at > self._cluster.replica_timeout:
            self._confirm()
        with self._seal_lock:
            key_id = self._block_key
            if key_id is not None and self._next < self._end:
                self._next += 1
                return key_id
        return self._reserve()

    def _reserve(self) -> bytes:
        """Reserve a new block of seals (``keys.seal_reservation``) of the sealing key and take
        one. Raises: DeviceUnavailable."""
        with self._change_lock:
            for _ in range(3):
                with self._seal_lock:
                    if self._block_key is not None and self._next < self._end:
                        self._next += 1
                        return self._block_key
                primary = self._primary
                if primary is None:
                    raise DeviceUnavailable("no sealing key")
                grant = self._store.reserve_seals(primary, self._policy.seal_reservation,
                                                  self._policy.max_seals_per_key)
                if grant is not None:
                    self._reserved(primary, grant[1])
                    with self._seal_lock:
                        self._block_key, self._next, self._end = primary, grant[0] + 1, grant[1]
                    return primary
                self._reload()   # another replica replaced the key, or its budget is spent
                if self._primary != primary:
                    continue
                self.rotate(reason="seal budget reached", replacing=primary)
                if self._primary == primary:
                    raise DeviceUnavailable(
                        f"the seal budget of key {primary.hex()} is spent and its successor is "
                        "still pending publication to the replicas: retry")
            raise DeviceUnavailable("the sealing key kept changing; retry")

    def _reserved(self, key_id: bytes, count: int) -> None:
        """The copy of ``key_id``'s record counts at least ``count`` reserved seals (as the
        store does; its version does not move for a reservation)."""
        record = self._records.get(key_id)
        if record is not None and record.seal_count < count:
            records = dict(self._records)
            records[key_id] = replace(record, seal_count=count)
            self._records = MappingProxyType(records)

    def check_opens(self, key_id: bytes) -> KeyRecord:
        """Return the record of a key that may open a ticket now; no device call.

        Raises: InvalidTicket if the id is unknown, destroyed, missing or past its decryption
        window.
        """
        record = self._records.get(key_id)
        if record is None:
            raise InvalidTicket("unknown key id")
        if record.state == KeyState.DESTROYED:
            raise InvalidTicket("key destroyed")
        if record.state == KeyState.MISSING:
            raise InvalidTicket("key missing from the device")
        if record.opens_until is not None and self._clock.now() >= record.opens_until:
            raise InvalidTicket("key past its decryption window")
        return record

    def sealing_key_lost(self, key_id: bytes) -> DeviceUnavailable:
        """The device could not find ``key_id`` to seal with. If it is still the sealing key,
        reconcile the ring with the device: a sealing key the device no longer lists is
        replaced by a new one, ACTIVE at once (audited), so the next seal works.

        Returns the error to answer the call with. Raises: DeviceUnavailable,
        AuditUnavailable (the reconcile failed; the next seal that fails tries again).
        """
        with self._change_lock:
            self._refresh()
            if key_id == self._primary:
                self._reconcile(self._backend.list_keys())
            if key_id == self._primary:   # the device still lists it: not replaced
                log.error("the device could not find sealing key %s to seal with, yet lists "
                          "it; the key is kept", key_id.hex())
        return DeviceUnavailable(f"the device could not find sealing key {key_id.hex()}; the "
                                 "key ring was reconciled with the device: retry")

    # -- rotation and publication ----------------------------------------------------------------

    def rotate(self, reason: str = "operator", actor: str = SYSTEM, *, immediate: bool = False,
               fence: Fence | None = None, replacing: bytes | EllipsisType | None = ...,
               ) -> tuple[KeyRecord, KeyRecord | None]:
        """Generate a new key in the device (recorded CREATING first) and publish it: PENDING
        while other live replicas have not reported it (the ACTIVE key keeps sealing), ACTIVE
        at once when no other replica is live, ``keys.publish_delay`` is 0 or ``immediate``
        (no key seals). When it seals, the previous key becomes DECRYPT_ONLY for
        ``max_lifetime`` seconds (plus ``cluster.replica_timeout`` when other replicas are
        live; longer if the store's lifetime horizon, after a lowered maximum, is later).
        Audited (``key.created``, ``key.rotated``) before it is committed.

        A key already PENDING is the rotation in progress: no new key is made (``immediate``
        makes it ACTIVE). A rotation committed by another replica meanwhile wins: the key made
        here is destroyed, and the winner's key returned. With ``replacing`` (a key id, or None
        for no key), nothing is done unless that is still the sealing key (another replica
        already replaced it).
        Returns (the new key, the previous key) as the ring now stands: (PENDING, ACTIVE) or
        (ACTIVE, DECRYPT_ONLY or None). Raises: DeviceUnavailable, AuditUnavailable (nothing
        changed), FailedPrecondition (the device refused the new key), StaleFence.
        """
        with self._change_lock:
            self._refresh()
            if replacing is not ... and self._primary != replacing:
                return self._outcome()
            if self._pending is not None:
                if immediate:
                    self._apply(lambda: self._promotion(reason, actor), fence)
                return self._outcome()
            base = (self._primary, self._pending)
            key_id = self._create()
            audited: list[_Event] = []
            try:
                self._refresh()   # a rotation that won meanwhile: lose before auditing
                won = self._apply(lambda: self._rotation(key_id, base, reason, actor, immediate),
                                  fence, audited)
            except AuthorityError:
                self._discard(key_id)
                raise
            if won:
                new = self._records[key_id]
                log.info("key %s created (%s), %s; previous %s", key_id.hex(), reason,
                         new.state.name, base[0].hex() if base[0] else "none")
            else:
                self._lost(key_id, actor, bool(audited))
            return self._outcome()

    def _rotation(self, key_id: bytes, base: tuple[bytes | None, bytes | None], reason: str,
                  actor: str, immediate: bool) -> _Change | None:
        """The change that publishes ``key_id``; None if the rotation lost (the ring's sealing
        or pending key is no longer ``base``, or the CREATING record was given up)."""
        if key_id not in self._creating or (self._primary, self._pending) != base:
            return None
        now = self._clock.now()
        previous = self._records.get(self._primary) if self._primary else None
        others = self._live_others(now)
        details: dict[str, Any] = {"key_id": key_id.hex(), "reason": reason}
        if previous is None or immediate or not others or self._policy.publish_delay == 0:
            change = _Change([KeyRecord(key_id, KeyState.ACTIVE, now)],
                             events=[(actor, "key.created", details)])
            if previous is not None:
                self._demote(change, previous, key_id, now, actor, reason, bool(others))
            return change
        return _Change([KeyRecord(key_id, KeyState.PENDING, now)],
                       events=[(actor, "key.created", {**details, "state": "PENDING"})])

    def _promotion(self, forced: str | None, actor: str = SYSTEM) -> _Change | None:
        """The change that makes the PENDING key ACTIVE: when ``forced`` (its reason), or when
        every live replica has reported it loaded, or its publish delay has passed; None if
        there is none or it is not ready."""
        pending = self._records.get(self._pending) if self._pending else None
        if pending is None:
            return None
        now = self._clock.now()
        others = self._live_others(now)
        why = forced or self._publish_reason(pending, now, others)
        if why is None:
            return None
        change = _Change([replace(pending, state=KeyState.ACTIVE)],
                         events=[(actor, "key.published",
                                  {"key_id": pending.key_id.hex(), "reason": why})])
        previous = self._records.get(self._primary) if self._primary else None
        if previous is not None:
            self._demote(change, previous, pending.key_id, now, actor, why, bool(others))
        return change

    def _publish_reason(self, pending: KeyRecord, now: float,
                        others: list[ReplicaRecord]) -> str | None:
        """Why the PENDING key may seal now; None if it may not yet."""
        if now >= pending.created_at + self._policy.publish_delay:
            return "publish delay passed"
        if pending.key_id not in self._verified:
            return None
        if any(pending.key_id not in r.loaded for r in others):
            return None
        return "every live replica has it"

    def _demote(self, change: _Change, previous: KeyRecord, new_id: bytes, now: float,
                actor: str, reason: str, others_live: bool) -> None:
        """Add to ``change``: ``previous`` stops sealing (DECRYPT_ONLY) and opens for
        ``max_lifetime`` (plus ``cluster.replica_timeout`` while other replicas are live: one
        may seal with it until it notices), or until the lifetime horizon if later."""
        grace = self._cluster.replica_timeout if others_live else 0.0
        opens_until = max(now + self._max_lifetime + grace, self._store.lifetime_horizon())
        change.save.append(replace(previous, state=KeyState.DECRYPT_ONLY, sealing_ended_at=now,
                                   opens_until=opens_until))
        change.events.append((actor, "key.rotated", {
            "key_id": previous.key_id.hex(), "new_key_id": new_id.hex(),
            "state": "DECRYPT_ONLY", "opens_until": opens_until, "reason": reason}))

    def _outcome(self) -> tuple[KeyRecord, KeyRecord | None]:
        """(new, previous) as the ring stands: (PENDING, ACTIVE) during a publication, else
        (ACTIVE, the key that sealed last before it). Raises: DeviceUnavailable (no key)."""
        if self._pending is not None:
            return self._records[self._pending], (
                self._records[self._primary] if self._primary else None)
        if self._primary is None:
            raise DeviceUnavailable("no sealing key")
        ended = [r for r in self._records.values() if r.sealing_ended_at is not None]
        previous = max(ended, key=lambda r: r.sealing_ended_at or 0.0) if ended else None
        return self._records[self._primary], previous

    def _create(self) -> bytes:
        """A new key id, recorded CREATING, then created in the device; callers hold
        ``_change_lock``.

        Raises: DeviceUnavailable (the CREATING record stays: the key may still be made, and is
        swept after the grace), FailedPrecondition (the device refused: the record is dropped).
        """
        key_id = self._new_key_id()
        record = KeyRecord(key_id, KeyState.CREATING, self._clock.now())
        self._store.save_keys([record])
        self._creating[key_id] = record
        try:
            self._backend.create_key(key_id)
        except FailedPrecondition:   # the id is taken, or the key was refused and destroyed
            self._forget_creating(key_id)
            raise
        self._verified.add(key_id)
        return key_id

    def _lost(self, key_id: bytes, actor: str, audited: bool) -> None:
        """Another rotation won: destroy the key made here. Never raises."""
        if audited:
            try:
                self._audit(actor, "key.abandoned", {"key_id": key_id.hex(), "in_device": True,
                                                     "reason": "another rotation won"})
            except AuthorityError:
                log.exception("could not audit the abandoned key %s", key_id.hex())
        self._discard(key_id)
        log.info("key %s destroyed: another replica's rotation committed first (%s)",
                 key_id.hex(), (self._pending or self._primary or b"").hex())

    # -- retirement and destruction ------------------------------------------------------------

    def retire(self, key_id: bytes, actor: str = SYSTEM) -> KeyRecord:
        """Destroy a DECRYPT_ONLY or MISSING key in the device now (audited ``key.retired``
        first); a MISSING key the device does not have is marked DESTROYED.

        Raises: NotFound (unknown id), FailedPrecondition (the sealing key, or the key pending
        publication), DeviceUnavailable, AuditUnavailable (nothing changed).
        """
        with self._change_lock:
            self._refresh()
            record = self._records.get(key_id)
            if record is None:
                raise NotFound(f"key_id: no key {key_id.hex()}")
            if record.state == KeyState.ACTIVE:
                raise FailedPrecondition(f"key {key_id.hex()} is the sealing key; rotate first")
            if record.state == KeyState.PENDING:
                raise FailedPrecondition(f"key {key_id.hex()} is pending publication and will "
                                         "be the sealing key; rotate again once it seals, then "
                                         "retire it")
            if record.state == KeyState.DESTROYED:
                return record
            self._audit(actor, "key.retired", {"key_id": key_id.hex()})
            return self._destroy(record, reason="retired by operator", actor=actor)

    def _destroy(self, record: KeyRecord, reason: str, actor: str = SYSTEM,
                 fence: Fence | None = None) -> KeyRecord:
        """Destroy a DECRYPT_ONLY or MISSING key (states it never leaves but to DESTROYED, so
        a stale copy decides right) in the device, then record it DESTROYED.
        Raises: DeviceUnavailable, AuditUnavailable, StaleFence."""
        self._audit(actor, "key.destroyed", {"key_id": record.key_id.hex(), "reason": reason})
        try:
            self._backend.destroy_key(record.key_id)
        except DeviceUnavailable as exc:
            try:
                self._audit(actor, "key.destroy_failed", {"key_id": record.key_id.hex(),
                                                          "error": exc.message})
            except AuthorityError:
                log.exception("could not audit the failed destruction of %s",
                              record.key_id.hex())
            raise
        except KeyNotFound:
            log.warning("key %s was already gone from the device", record.key_id.hex())
        now = self._clock.now()
        self._apply(lambda: self._marked_destroyed(record.key_id, now), fence)
        log.info("key %s destroyed in the device (%s)", record.key_id.hex(), reason)
        return self._records.get(record.key_id) or replace(
            record, state=KeyState.DESTROYED, destroyed_at=now)

    def _marked_destroyed(self, key_id: bytes, now: float) -> _Change | None:
        current = self._records.get(key_id)
        if current is None or current.state == KeyState.DESTROYED:
            return None
        return _Change([replace(current, state=KeyState.DESTROYED, destroyed_at=now)])

    def _discard(self, key_id: bytes) -> None:
        """Destroy the key of a rotation that failed or lost after its creation and drop its
        CREATING record; if the device fails, the record stays for the sweep. Never raises."""
        try:
            self._backend.destroy_key(key_id)
        except DeviceUnavailable:
            log.exception("could not remove unrecorded key %s; removed after %d s", key_id.hex(),
                          CREATING_GRACE)
            return
        except KeyNotFound:
            pass
        self._forget_creating(key_id)

    def _forget_creating(self, key_id: bytes) -> None:
        """Drop a CREATING record whose key the device does not hold; if the store fails, the
        sweep drops it later. Never raises."""
        if key_id not in self._creating:
            return   # given up by the sweep meanwhile (it drops the record)
        try:
            self._store.delete_keys([key_id])
        except DeviceUnavailable:
            log.exception("could not drop the CREATING record of key %s", key_id.hex())
            return
        self._creating.pop(key_id, None)

    def _new_key_id(self) -> bytes:
        while True:
            key_id = secrets.token_bytes(KEY_ID_LEN)
            if key_id not in self._records and key_id not in self._creating:
                return key_id

    # -- maintenance -----------------------------------------------------------------------------

    def maintain(self, fence: Fence | None = None) -> None:
        """The periodic work, on the maintenance lease holder (``fence``, carried by every key
        ring write; None: unfenced, a process alone): reconcile with the device; give up
        CREATING keys past their grace; rotate a key that has sealed long enough; destroy keys
        whose window has closed (MISSING ones too: in the device if it has them again); publish
        a PENDING key that is ready.

        Raises: DeviceUnavailable, AuditUnavailable, StaleFence (another replica took the
        lease: stop) -- the next pass tries again.
        """
        with self._change_lock:
            self._reload()   # CREATING records are outside the version: read them all
            present = self._backend.list_keys()
            self._verified = set(present)
            self._reconcile(present, fence)
            self._destroy_found(present)
            self._sweep_creating(present, fence)
            now = self._clock.now()
            primary = self._records.get(self._primary) if self._primary else None
            period = self._policy.rotation_period
            if self._pending is None and (primary is None or (
                    period and now >= primary.created_at + period)):
                self.rotate(reason="scheduled", fence=fence, replacing=self._primary)
            for record in list(self._records.values()):
                if (record.state in (KeyState.DECRYPT_ONLY, KeyState.MISSING)
                        and record.opens_until is not None and now >= record.opens_until):
                    self._destroy(record, reason="decryption window closed", fence=fence)
            if self._pending is not None:
                self._apply(lambda: self._promotion(None), fence)
            for key_id in sorted(present - self._records.keys() - self._creating.keys()):
                log.debug("device key %s has no key ring entry; it is not used", key_id.hex())

    def _reconcile(self, present: set[bytes], fence: Fence | None = None) -> None:
        """Match the ring to the keys the device lists: a lost sealing key is replaced (the new
        key ACTIVE at once), DECRYPT_ONLY keys the device lacks become MISSING, MISSING keys it
        has DECRYPT_ONLY again. Callers hold ``_change_lock``.

        Raises: DeviceUnavailable, AuditUnavailable, StaleFence (what is done so far stays
        done).
        """
        if self._primary is not None and self._primary not in present:
            self.rotate(reason="sealing key missing from the device", immediate=True,
                        fence=fence, replacing=self._primary)
            present = present | ({self._primary} if self._primary else set())
        self._apply(lambda: self._presence(present), fence)

    def _presence(self, present: set[bytes]) -> _Change | None:
        change = _Change()
        for record in self._records.values():
            hex_id = record.key_id.hex()
            if record.state == KeyState.DECRYPT_ONLY and record.key_id not in present:
                change.events.append((SYSTEM, "key.missing",
                                      {"key_id": hex_id, "was": "DECRYPT_ONLY"}))
                change.save.append(replace(record, state=KeyState.MISSING))
            elif record.state == KeyState.MISSING and record.key_id in present:
                change.events.append((SYSTEM, "key.found",
                                      {"key_id": hex_id, "state": "DECRYPT_ONLY"}))
                change.save.append(replace(record, state=KeyState.DECRYPT_ONLY))
        for record in change.save:
            log.warning("key %s is %s", record.key_id.hex(),
                        "in the key ring but not in the device: MISSING until the device has "
                        "it again or it is retired" if record.state == KeyState.MISSING else
                        "in the device again: DECRYPT_ONLY")
        return change if change.save else None

    def _destroy_found(self, present: set[bytes]) -> None:
        """Destroy DESTROYED keys the device has again (a key directory back in place, a give-up
        whose device call failed); a device failure is logged and tried again at the next pass.
        Raises: AuditUnavailable."""
        for record in self._records.values():
            if record.state != KeyState.DESTROYED or record.key_id not in present:
                continue
            self._audit(SYSTEM, "key.destroyed", {"key_id": record.key_id.hex(),
                                                  "reason": "destroyed key found in the device"})
            try:
                self._backend.destroy_key(record.key_id)
            except KeyNotFound:
                pass
            except DeviceUnavailable as exc:
                log.error("could not destroy key %s found in the device: %s",
                          record.key_id.hex(), exc.message)

    def _sweep_creating(self, present: set[bytes], fence: Fence | None) -> None:
        """Give up CREATING keys older than ``CREATING_GRACE``: the record marked DESTROYED
        (audited ``key.abandoned``; a compare-and-swap, so a creation that completes meanwhile
        either wins, and the key is kept, or loses and destroys its key), then the key destroyed
        if the device has it, then the record dropped. A device failure leaves the DESTROYED
        record: the key is destroyed at a later pass.
        Raises: DeviceUnavailable, AuditUnavailable, StaleFence."""
        now = self._clock.now()
        for record in list(self._creating.values()):
            if now < record.created_at + CREATING_GRACE:
                continue
            key_id, in_device = record.key_id, record.key_id in present
            if not self._apply(partial(self._abandon, key_id, in_device, now), fence):
                continue
            if in_device:
                try:
                    self._backend.destroy_key(key_id)
                except KeyNotFound:
                    pass
                except DeviceUnavailable as exc:
                    log.error("could not destroy abandoned key %s: %s", key_id.hex(),
                              exc.message)
                    continue
            self._apply(partial(self._dropped, key_id), fence)
            log.warning("key %s was never completed: %s", key_id.hex(),
                        "destroyed in the device" if in_device else "not in the device")

    def _abandon(self, key_id: bytes, in_device: bool, now: float) -> _Change | None:
        record = self._creating.get(key_id)
        if record is None:
            return None
        return _Change([replace(record, state=KeyState.DESTROYED, destroyed_at=now)],
                       events=[(SYSTEM, "key.abandoned",
                                {"key_id": key_id.hex(), "in_device": in_device})])

    def _dropped(self, key_id: bytes) -> _Change | None:
        record = self._records.get(key_id)
        if record is None or record.state != KeyState.DESTROYED:
            return None
        return _Change(delete=[key_id])

    # -- views -----------------------------------------------------------------------------------

    @property
    def primary_id(self) -> bytes | None:
        """The sealing key's id."""
        return self._primary

    @property
    def pending_id(self) -> bytes | None:
        """The id of the key pending publication (None: none)."""
        return self._pending

    @property
    def version(self) -> int:
        """The key ring version this replica's copy reflects."""
        return self._version

    @property
    def replica(self) -> ReplicaIdentity:
        """This replica."""
        return self._replica

    def records(self) -> list[KeyRecord]:
        """Every key record, oldest first; the sealing key's count is this replica's next seal
        number once it has sealed (else the seals reserved in the store)."""
        out = sorted(self._records.values(), key=_age)
        with self._seal_lock:
            block_key, used = self._block_key, self._next
        return [replace(r, seal_count=used) if r.key_id == block_key else r for r in out]

    def rotates_at(self, record: KeyRecord) -> float | None:
        """When an ACTIVE key is scheduled to stop sealing (None: no scheduled rotation)."""
        if record.state != KeyState.ACTIVE or not self._policy.rotation_period:
            return None
        return record.created_at + self._policy.rotation_period

    @property
    def max_lifetime(self) -> int:
        """The longest ticket lifetime; a key opens tickets this long after it stops sealing."""
        return self._max_lifetime
