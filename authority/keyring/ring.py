"""``KeyRing``: the key ring as the rest of the service uses it -- start-up, the hot paths
(``sealing_key`` from reserved seal blocks, ``check_opens``), the re-read for unknown key ids,
and the views. Built on its layers: reconcile.py, lifecycle.py, publish.py, core.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from types import MappingProxyType

from authority.cluster import ReplicaIdentity
from authority.errors import AuthorityError, DeviceUnavailable, InvalidTicket
from authority.keyring.reconcile import Reconciliation
from authority.keys import KeyRecord, KeyState

log = logging.getLogger("authority.keyring")

#: seconds between two re-reads of the key ring caused by tickets under unknown key ids
UNKNOWN_KEY_REREAD_GAP = 1.0
#: seconds a redeem waits for a key ring change in progress before it skips its re-read
_REREAD_WAIT = 2.0


def _age(record: KeyRecord) -> tuple[float, float, bool, bytes]:
    """Oldest first: by creation, then (keys made in the same instant) those that stopped
    sealing first, the ACTIVE key before the PENDING one."""
    ended = record.sealing_ended_at
    return (record.created_at, math.inf if ended is None else ended,
            record.state == KeyState.PENDING, record.key_id)


class KeyRing(Reconciliation):
    """Thread-safe key ring over a backend and a store, as one replica sees it."""

    # -- start-up ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the ring, register this replica (a heartbeat), reconcile with the device, and
        make a first key if none seals.

        Raises: DeviceUnavailable, AuditUnavailable.
        """
        with self._change_lock:
            now = self._clock.now()
            self._reload()
            present = self._list_device()
            self._heartbeat(now)
            self._confirmed_at = now
            self._reconcile(present)
            if self._primary is None:
                self.rotate(reason="first key", immediate=True, replacing=None)
            for key_id in sorted(present - self._records.keys() - self._creating.keys()):
                log.warning("device key %s has no key ring entry; it is not used", key_id.hex())

    # -- the hot paths -----------------------------------------------------------------------------

    def sealing_key(self) -> bytes:
        """Return the ACTIVE key's id, with one seal counted against its nonce budget.

        Seals come from blocks reserved in the store; when the key's budget is spent it is
        rotated. Raises: DeviceUnavailable (no sealing key; the store failed; the spent key's
        successor is still pending publication: retry).
        """
        if self._clock.now() - self._confirmed_at > self._cluster.replica_timeout:
            self._confirm()
        key_id = self._take_seal()
        return key_id if key_id is not None else self._reserve()

    def _take_seal(self) -> bytes | None:
        """One seal from the reserved block: its key's id; None if the block is spent."""
        with self._seal_lock:
            key_id = self._block_key
            if key_id is not None and self._next < self._end:
                self._next += 1
                return key_id
        return None

    def _reserve(self) -> bytes:
        """Reserve a new block of seals (``keys.seal_reservation``) of the sealing key and take
        one. Raises: DeviceUnavailable."""
        with self._change_lock:
            for _ in range(3):
                taken = self._take_seal()   # another thread may have reserved meanwhile
                if taken is not None:
                    return taken
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
                self._reconcile(self._list_device())
            if key_id == self._primary:   # the device still lists it: not replaced
                log.error("the device could not find sealing key %s to seal with, yet lists "
                          "it; the key is kept", key_id.hex())
        return DeviceUnavailable(f"the device could not find sealing key {key_id.hex()}; the "
                                 "key ring was reconciled with the device: retry")

    # -- unknown key ids ---------------------------------------------------------------------------

    def reread_unknown(self) -> bool:
        """A redeem met a key id the ring does not know: re-read the ring if its version moved
        (a key made on another replica), at most once per ``UNKNOWN_KEY_REREAD_GAP`` seconds
        and without waiting long for a change in progress.

        Returns whether the ring is confirmed current: this re-read (or, within the gap, the
        last one) reached the store. False: the store could not be asked (a failure, logged),
        or a change in progress held the ring too long. Never raises."""
        now = self._clock.now()
        with self._reread_lock:
            if self._reread_at <= now < self._reread_at + UNKNOWN_KEY_REREAD_GAP:
                return self._reread_ok
            self._reread_at = now
        if not self._change_lock.acquire(timeout=_REREAD_WAIT):
            return False
        try:
            self._refresh()
            self._reread_ok = True
        except AuthorityError as exc:
            self._reread_ok = False
            log.warning("could not re-read the key ring for an unknown key id: %s", exc.message)
        finally:
            self._change_lock.release()
        return self._reread_ok

    def knows(self, key_id: bytes) -> bool:
        """Whether the ring has a record of ``key_id`` (in any published state)."""
        return key_id in self._records

    # -- views -------------------------------------------------------------------------------------

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
