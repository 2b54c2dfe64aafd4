"""Heartbeats and publication: this replica reports the keys its device holds, and a PENDING
key becomes ACTIVE once every live replica has it or ``keys.publish_delay`` has passed (the
key it replaces then stops sealing: ``Publication._demote``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from authority.audit import SYSTEM
from authority.errors import DeviceUnavailable
from authority.keyring.core import Change, RingCopy
from authority.keys import KeyRecord, KeyState
from authority.store.base import ReplicaRecord

log = logging.getLogger("authority.keyring")


class Publication(RingCopy):
    """The heartbeat and the publication of a PENDING key (a layer of ``KeyRing``)."""

    # -- heartbeat, leaving ------------------------------------------------------------------------

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
            if self._wrapper is not None:
                self._destroy_copies()
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
            self._list_device()
        except DeviceUnavailable as exc:
            log.warning("could not list the device's keys: %s", exc.message)

    def _destroy_copies(self) -> None:
        """Per-node tokens: destroy in this replica's token the keys it was seen to hold that
        the ring records DESTROYED (the replica that destroyed a key destroyed only its own
        copy; the lease holder's pass does the same, ``_destroy_found``). A device failure is
        logged and tried again at the next heartbeat. Raises: AuditUnavailable."""
        for key_id in sorted(self._verified):
            record = self._records.get(key_id)
            if record is None or record.state != KeyState.DESTROYED:
                continue
            self._audit(SYSTEM, "key.destroyed", {
                "key_id": key_id.hex(), "replica_id": self._replica.replica_id,
                "reason": "destroyed key's copy in this replica's token"})
            if not self._destroy_in_device(
                    key_id, f"this replica's copy of key {key_id.hex()}"):
                continue
            self._verified.discard(key_id)
            log.info("this replica's copy of destroyed key %s destroyed", key_id.hex())

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

    # -- publication -------------------------------------------------------------------------------

    def _promotion(self, forced: str | None, actor: str = SYSTEM) -> Change | None:
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
        change = Change([replace(pending, state=KeyState.ACTIVE)],
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

    def _demote(self, change: Change, previous: KeyRecord, new_id: bytes, now: float,
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
