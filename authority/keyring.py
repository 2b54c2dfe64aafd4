"""The key ring: which key seals, which keys open, and the rules that move keys through their life.

Modelled on Vault transit's key policy: a single sealing (ACTIVE) key; DECRYPT_ONLY keys open
tickets until their window closes; unknown, destroyed, missing or out-of-window ids are refused
before any device call. Metadata lives in the store; the keys themselves only in the device.

The ring is reconciled with the keys the device lists at start, at each maintenance pass and
when the device cannot find the sealing key (``_reconcile``): a key the device does not list is
MISSING, never marked destroyed for that (a lost key directory, a removed token object: it may
come back); a sealing key it does not list is replaced by a new one. A key is recorded CREATING
before it is created in the device, so a crash or a timed-out create leaves a record, and the
key is destroyed and the record dropped once ``CREATING_GRACE`` has passed. Device keys the ring
never recorded are left alone (the token may be shared).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from authority.audit import SYSTEM, AuditHook
from authority.backends.base import KeyBackend
from authority.clock import Clock
from authority.config import KeyPolicy, TicketPolicy
from authority.errors import (
    AuthorityError,
    DeviceUnavailable,
    FailedPrecondition,
    InvalidTicket,
    KeyNotFound,
    NotFound,
    ResourceExhausted,
)
from authority.keys import KeyRecord, KeyState
from authority.store.base import Store
from authority.ticket_format import KEY_ID_LEN

log = logging.getLogger(__name__)

#: seconds a CREATING key waits for its creation to complete before it is given up: longer than
#: any device call (a TPM create may finish after its caller timed out)
CREATING_GRACE = 600.0


def _no_audit(actor: str, action: str, details: Mapping[str, Any]) -> None:
    """The audit hook of a key ring built without one."""


class KeyRing:
    """Thread-safe key ring over a backend and a store."""

    def __init__(self, backend: KeyBackend, store: Store, keys: KeyPolicy,
                 tickets: TicketPolicy, clock: Clock, audit: AuditHook | None = None) -> None:
        self._backend = backend
        self._audit: AuditHook = audit or _no_audit   # called before a change is committed
        self._store = store
        self._policy = keys
        self._max_lifetime = tickets.max_lifetime
        self._clock = clock
        self._records: Mapping[bytes, KeyRecord] = MappingProxyType({})
        self._creating: dict[bytes, KeyRecord] = {}  # CREATING, not published; _change_lock
        self._primary: bytes | None = None
        self._used = 0                       # seals made under the primary (this process)
        self._seal_lock = threading.Lock()   # guards _used and seal reservations
        self._change_lock = threading.RLock()  # serialises rotation, retirement, maintenance

    # -- start-up ------------------------------------------------------------------------------

    def load(self) -> None:
        """Load metadata, reconcile it with the device, and make a first key if none seals.

        Raises: DeviceUnavailable, AuditUnavailable.
        """
        with self._change_lock:
            records: dict[bytes, KeyRecord] = {}
            self._creating = {}
            for record in self._store.load_keys():
                kept = self._creating if record.state == KeyState.CREATING else records
                kept[record.key_id] = record
            self._install(records)
            self._reconcile(at_start=True)
            if self._primary is None:
                self.rotate(reason="first key")

    def sealing_key_lost(self, key_id: bytes) -> DeviceUnavailable:
        """The device could not find ``key_id`` to seal with. If it is still the sealing key,
        reconcile the ring with the device: a sealing key the device no longer lists is
        replaced by a new one (audited), so the next seal works.

        Returns the error to answer the call with. Raises: DeviceUnavailable,
        AuditUnavailable (the reconcile failed; the next seal that fails tries again).
        """
        with self._change_lock:
            if key_id == self._primary:
                self._reconcile()
            if key_id == self._primary:   # the device still lists it: not replaced
                log.error("the device could not find sealing key %s to seal with, yet lists "
                          "it; the key is kept", key_id.hex())
        return DeviceUnavailable(f"the device could not find sealing key {key_id.hex()}; the "
                                 "key ring was reconciled with the device: retry")

    def _reconcile(self, at_start: bool = False) -> None:
        """Match the ring to the keys the device lists; callers hold ``_change_lock``.

        Raises: DeviceUnavailable, AuditUnavailable (what is done so far stays done).
        """
        present = self._backend.list_keys()
        if self._primary is not None and self._primary not in present:
            new, _ = self.rotate(reason="sealing key missing from the device")
            present = present | {new.key_id}
        self._mark_presence(present)
        self._destroy_found(present)
        self._sweep_creating(present)
        for key_id in sorted(present - self._records.keys() - self._creating.keys()):
            (log.warning if at_start else log.debug)(
                "device key %s has no key ring entry; it is not used", key_id.hex())

    def _mark_presence(self, present: set[bytes]) -> None:
        """DECRYPT_ONLY keys the device lacks become MISSING; MISSING keys it has are
        DECRYPT_ONLY again. Audited first. Raises: DeviceUnavailable, AuditUnavailable."""
        changed = []
        for record in self._records.values():
            hex_id = record.key_id.hex()
            if record.state == KeyState.DECRYPT_ONLY and record.key_id not in present:
                self._audit(SYSTEM, "key.missing", {"key_id": hex_id, "was": "DECRYPT_ONLY"})
                log.warning("key %s is in the key ring but not in the device: MISSING until the "
                            "device has it again or it is retired", hex_id)
                changed.append(replace(record, state=KeyState.MISSING))
            elif record.state == KeyState.MISSING and record.key_id in present:
                self._audit(SYSTEM, "key.found", {"key_id": hex_id, "state": "DECRYPT_ONLY"})
                log.warning("key %s is in the device again: DECRYPT_ONLY", hex_id)
                changed.append(replace(record, state=KeyState.DECRYPT_ONLY))
        if changed:
            with self._seal_lock:
                self._commit(changed)

    def _destroy_found(self, present: set[bytes]) -> None:
        """Destroy DESTROYED keys the device has again (a key directory back in place); a
        device failure is logged and tried again at the next reconcile.
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

    def _sweep_creating(self, present: set[bytes]) -> None:
        """Give up CREATING keys older than ``CREATING_GRACE``: destroy the key if the device has
        it, then drop the record (audited ``key.abandoned`` first).
        Raises: DeviceUnavailable, AuditUnavailable (the record stays; tried again later)."""
        now = self._clock.now()
        for record in list(self._creating.values()):
            if now < record.created_at + CREATING_GRACE:
                continue
            in_device = record.key_id in present
            self._audit(SYSTEM, "key.abandoned", {"key_id": record.key_id.hex(),
                                                  "in_device": in_device})
            if in_device:
                with contextlib.suppress(KeyNotFound):
                    self._backend.destroy_key(record.key_id)
            self._store.delete_keys([record.key_id])
            del self._creating[record.key_id]
            log.warning("key %s was never completed: %s", record.key_id.hex(),
                        "destroyed in the device" if in_device else "not in the device")

    def _install(self, records: dict[bytes, KeyRecord]) -> None:
        active = [r for r in records.values() if r.state == KeyState.ACTIVE]
        self._records = MappingProxyType(dict(records))
        primary = max(active, key=lambda r: r.created_at).key_id if active else None
        if primary != self._primary:
            self._primary = primary
            self._used = records[primary].seal_count if primary else 0

    # -- the hot paths ---------------------------------------------------------------------------

    def sealing_key(self) -> bytes:
        """Return the ACTIVE key's id, with one seal counted against its nonce budget.

        Rotates first when the budget is spent. Raises: DeviceUnavailable, ResourceExhausted.
        """
        with self._seal_lock:
            key_id = self._reserve_one()
            if key_id is not None:
                return key_id
            spent = self._primary
        with self._change_lock:
            if self._primary == spent:  # another thread may have rotated already
                self.rotate(reason="seal budget reached")
        with self._seal_lock:
            key_id = self._reserve_one()
        if key_id is None:
            raise ResourceExhausted("seal budget of the new key already spent")
        return key_id

    def _reserve_one(self) -> bytes | None:
        primary = self._primary
        if primary is None:
            raise DeviceUnavailable("no sealing key")
        record = self._records[primary]
        if self._used < record.seal_count:
            self._used += 1
            return primary
        grant = min(record.seal_count + self._policy.seal_reservation,
                    self._policy.max_seals_per_key)
        if grant <= record.seal_count:
            return None
        self._commit([replace(record, seal_count=grant)])
        self._used += 1
        return primary

    def check_opens(self, key_id: bytes) -> KeyRecord:
        """Return the record of a key that may open a ticket now; no device call.

        Raises: InvalidTicket if the id is unknown, destroyed or past its decryption window.
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

    # -- lifecycle -------------------------------------------------------------------------------

    def rotate(self, reason: str = "operator",
               actor: str = SYSTEM) -> tuple[KeyRecord, KeyRecord | None]:
        """Generate a new key in the device (recorded CREATING first) and make it the sealing
        key.

        The previous key becomes DECRYPT_ONLY for ``max_lifetime`` seconds (longer if the
        store's lifetime horizon, after a lowered maximum, is later). The change is
        audited (``key.created``, ``key.rotated``) before it is committed.
        Returns (new, previous). Raises: DeviceUnavailable, AuditUnavailable (nothing changed),
        FailedPrecondition (the device refused the new key).
        """
        with self._change_lock:
            key_id = self._create()
            now = self._clock.now()
            new = KeyRecord(key_id, KeyState.ACTIVE, now)
            changed = [new]
            previous = self._records.get(self._primary) if self._primary else None
            if previous is not None:
                # its tickets may carry a longer lifetime granted before a lowered maximum
                opens_until = max(now + self._max_lifetime, self._store.lifetime_horizon())
                previous = replace(previous, state=KeyState.DECRYPT_ONLY, sealing_ended_at=now,
                                   opens_until=opens_until)
                changed.append(previous)
            try:
                self._audit(actor, "key.created", {"key_id": key_id.hex(), "reason": reason})
                if previous is not None:
                    self._audit(actor, "key.rotated", {
                        "key_id": previous.key_id.hex(), "new_key_id": key_id.hex(),
                        "state": "DECRYPT_ONLY", "opens_until": previous.opens_until,
                        "reason": reason})
                with self._seal_lock:
                    self._commit(changed)   # the ACTIVE record replaces the CREATING one
                self._creating.pop(key_id, None)
            except AuthorityError:
                self._discard(key_id)
                raise
            log.info("key %s created and now seals (%s); previous %s", key_id.hex(), reason,
                     previous.key_id.hex() if previous else "none")
            return new, previous

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
        return key_id

    def retire(self, key_id: bytes, actor: str = SYSTEM) -> KeyRecord:
        """Destroy a DECRYPT_ONLY or MISSING key in the device now (audited ``key.retired``
        first); a MISSING key the device does not have is marked DESTROYED.

        Raises: NotFound (unknown id), FailedPrecondition (the sealing key), DeviceUnavailable,
        AuditUnavailable (nothing changed).
        """
        with self._change_lock:
            record = self._records.get(key_id)
            if record is None:
                raise NotFound(f"key_id: no key {key_id.hex()}")
            if record.state == KeyState.ACTIVE:
                raise FailedPrecondition(f"key {key_id.hex()} is the sealing key; rotate first")
            if record.state == KeyState.DESTROYED:
                return record
            self._audit(actor, "key.retired", {"key_id": key_id.hex()})
            return self._destroy(record, reason="retired by operator", actor=actor)

    def maintain(self) -> None:
        """Reconcile with the device; rotate a key that has sealed long enough; destroy keys
        whose window has closed (MISSING ones too: in the device if it has them again).

        Raises: DeviceUnavailable, AuditUnavailable (the next call tries again).
        """
        with self._change_lock:
            self._reconcile()
            now = self._clock.now()
            primary = self._records.get(self._primary) if self._primary else None
            period = self._policy.rotation_period
            if primary is None or (period and now >= primary.created_at + period):
                self.rotate(reason="scheduled")
            for record in list(self._records.values()):
                if (record.state in (KeyState.DECRYPT_ONLY, KeyState.MISSING)
                        and record.opens_until is not None and now >= record.opens_until):
                    self._destroy(record, reason="decryption window closed")

    def _destroy(self, record: KeyRecord, reason: str, actor: str = SYSTEM) -> KeyRecord:
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
        done = replace(record, state=KeyState.DESTROYED, destroyed_at=self._clock.now())
        with self._seal_lock:
            self._commit([done])
        log.info("key %s destroyed in the device (%s)", record.key_id.hex(), reason)
        return done

    def _discard(self, key_id: bytes) -> None:
        """Destroy the key of a rotation that failed after its creation and drop its CREATING
        record; if the device fails, the record stays for the sweep. Never raises."""
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
        try:
            self._store.delete_keys([key_id])
        except DeviceUnavailable:
            log.exception("could not drop the CREATING record of key %s", key_id.hex())
            return
        self._creating.pop(key_id, None)

    def _commit(self, changed: list[KeyRecord]) -> None:
        """Persist then publish; callers hold ``_seal_lock``."""
        self._store.save_keys(changed)
        merged = dict(self._records)
        merged.update({r.key_id: r for r in changed})
        self._install(merged)

    def _new_key_id(self) -> bytes:
        while True:
            key_id = secrets.token_bytes(KEY_ID_LEN)
            if key_id not in self._records and key_id not in self._creating:
                return key_id

    # -- views -----------------------------------------------------------------------------------

    @property
    def primary_id(self) -> bytes | None:
        """The sealing key's id."""
        return self._primary

    def records(self) -> list[KeyRecord]:
        """Every key record, oldest first, with the live seal count for the sealing key."""
        out = sorted(self._records.values(), key=lambda r: r.created_at)
        return [replace(r, seal_count=self._used) if r.key_id == self._primary else r
                for r in out]

    def rotates_at(self, record: KeyRecord) -> float | None:
        """When an ACTIVE key is scheduled to stop sealing (None: no scheduled rotation)."""
        if record.state != KeyState.ACTIVE or not self._policy.rotation_period:
            return None
        return record.created_at + self._policy.rotation_period

    @property
    def max_lifetime(self) -> int:
        """The longest ticket lifetime; a key opens tickets this long after it stops sealing."""
        return self._max_lifetime
