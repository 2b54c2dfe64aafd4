"""Maintenance and device reconciliation: keys the device lacks become MISSING (and found
again), a lost sealing key is replaced, DESTROYED keys found in the device are destroyed,
CREATING keys past ``CREATING_GRACE`` are given up; scheduled rotation and closed windows.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from authority.audit import SYSTEM
from authority.keyring.core import CREATING_GRACE, Change
from authority.keyring.lifecycle import Lifecycle
from authority.keys import KeyState
from authority.store.base import Fence

log = logging.getLogger("authority.keyring")


class Reconciliation(Lifecycle):
    """The maintenance pass and reconciliation with the device (a layer of ``KeyRing``)."""

    # -- maintenance -------------------------------------------------------------------------------

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
            present = self._list_device()
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

    # -- reconciliation with the device ------------------------------------------------------------

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

    def _presence(self, present: set[bytes]) -> Change | None:
        change = Change()
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
            if not self._destroy_in_device(
                    record.key_id, f"key {record.key_id.hex()} found in the device"):
                continue
            self._verified.discard(record.key_id)

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
            if in_device and not self._destroy_in_device(
                    key_id, f"abandoned key {key_id.hex()}"):
                continue
            self._apply(partial(self._dropped, key_id), fence)
            log.warning("key %s was never completed: %s", key_id.hex(),
                        "destroyed in the device" if in_device else "not in the device")

    def _abandon(self, key_id: bytes, in_device: bool, now: float) -> Change | None:
        record = self._creating.get(key_id)
        if record is None:
            return None
        return Change([replace(record, state=KeyState.DESTROYED, destroyed_at=now)],
                       events=[(SYSTEM, "key.abandoned",
                                {"key_id": key_id.hex(), "in_device": in_device})])

    def _dropped(self, key_id: bytes) -> Change | None:
        record = self._records.get(key_id)
        if record is None or record.state != KeyState.DESTROYED:
            return None
        return Change(delete=[key_id])
