"""A key's life: rotation (a key recorded CREATING, created in the device, then published with
a compare-and-swap; a rotation that lost destroys its key), retirement and destruction.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from types import EllipsisType
from typing import Any

from authority import crashpoints
from authority.audit import SYSTEM
from authority.errors import (
    AuthorityError,
    DeviceUnavailable,
    FailedPrecondition,
    KeyNotFound,
    NotFound,
)
from authority.keyring.core import CREATING_GRACE, Change, Event, Wrapping
from authority.keyring.publish import Publication
from authority.keys import KeyRecord, KeyState
from authority.store.base import Fence
from authority.ticket_format import KEY_ID_LEN

log = logging.getLogger("authority.keyring")


class Lifecycle(Publication):
    """Rotation, retirement and destruction (a layer of ``KeyRing``)."""

    # -- rotation ----------------------------------------------------------------------------------

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
                sealing = self._primary
                if immediate and self._apply(lambda: self._promotion(reason, actor), fence):
                    return self._outcome(replaced=sealing)
                return self._outcome()
            base = (self._primary, self._pending)
            key_id = self._create()
            audited: list[Event] = []
            try:
                self._refresh()   # a rotation that won meanwhile: lose before auditing
                won = self._apply(lambda: self._rotation(key_id, base, reason, actor, immediate),
                                  fence, audited)
            except AuthorityError as exc:   # the commit refused (StaleFence) or failed
                self._lost(key_id, actor, bool(audited),
                           f"not committed: {type(exc).__name__}: {exc.message}")
                raise
            if not won:
                self._lost(key_id, actor, bool(audited))
                return self._outcome()
            crashpoints.reached(crashpoints.ROTATE_AFTER_RECORD)
            new = self._records[key_id]
            log.info("key %s created (%s), %s; previous %s", key_id.hex(), reason,
                     new.state.name, base[0].hex() if base[0] else "none")
            return self._outcome(replaced=base[0])

    def _rotation(self, key_id: bytes, base: tuple[bytes | None, bytes | None], reason: str,
                  actor: str, immediate: bool) -> Change | None:
        """The change that publishes ``key_id``; None if the rotation lost (the ring's sealing
        or pending key is no longer ``base``, or the CREATING record was given up)."""
        if key_id not in self._creating or (self._primary, self._pending) != base:
            return None
        now = self._clock.now()
        previous = self._records.get(self._primary) if self._primary else None
        others = self._live_others(now)
        details: dict[str, Any] = {"key_id": key_id.hex(), "reason": reason}
        if previous is None or immediate or not others or self._policy.publish_delay == 0:
            change = Change([KeyRecord(key_id, KeyState.ACTIVE, now)],
                             events=[(actor, "key.created", details)])
            if previous is not None:
                self._demote(change, previous, key_id, now, actor, reason, bool(others))
            return change
        return Change([KeyRecord(key_id, KeyState.PENDING, now)],
                       events=[(actor, "key.created", {**details, "state": "PENDING"})])

    def _outcome(self, replaced: bytes | EllipsisType | None = ...
                 ) -> tuple[KeyRecord, KeyRecord | None]:
        """(new, previous) as the ring stands: (PENDING, ACTIVE) during a publication, else
        (ACTIVE, ``replaced``: the key this rotation made stop sealing, None for none). Without
        ``replaced`` (this call changed nothing), the key that stopped sealing last (of two
        that stopped in the same instant, the later created: keys seal in creation order).
        Raises: DeviceUnavailable (no key)."""
        if self._pending is not None:
            return self._records[self._pending], (
                self._records[self._primary] if self._primary else None)
        if self._primary is None:
            raise DeviceUnavailable("no sealing key")
        if replaced is not ...:
            return self._records[self._primary], (
                self._records.get(replaced) if replaced is not None else None)
        ended = [r for r in self._records.values() if r.sealing_ended_at is not None]
        previous = max(ended, key=lambda r: (r.sealing_ended_at or 0.0, r.created_at),
                       default=None)
        return self._records[self._primary], previous

    def _create(self) -> bytes:
        """A new key id, recorded CREATING, then created in the device; callers hold
        ``_change_lock``. With per-node tokens the key is made wrappable and its blob (under
        the cluster KEK, with its check value) stored before this returns, so before the key
        can leave CREATING: every replica that sees it published finds its blob.

        Raises: DeviceUnavailable (the CREATING record stays: the key may still be made, and is
        swept after the grace), FailedPrecondition (the device refused: the record is dropped;
        per-node tokens: no KEK, or the key could not be wrapped: it is destroyed).
        """
        key_id = self._new_key_id()
        record = KeyRecord(key_id, KeyState.CREATING, self._clock.now())
        self._store.save_keys([record])
        self._creating[key_id] = record
        crashpoints.reached(crashpoints.ROTATE_BEFORE_CREATE)
        try:
            if self._wrapper is None:
                self._backend.create_key(key_id)
            else:
                self._wrapper.create_wrappable_key(key_id)
        except FailedPrecondition:   # the id is taken, or the key was refused and destroyed
            self._forget_creating(key_id)
            raise
        self._verified.add(key_id)
        crashpoints.reached(crashpoints.ROTATE_AFTER_CREATE)
        if self._wrapper is not None:
            try:
                self._store_blob(self._wrapper, key_id)
            except AuthorityError:
                self._discard(key_id)
                raise
        return key_id

    def _store_blob(self, wrapper: Wrapping, key_id: bytes) -> None:
        """Per-node tokens: store the new key's blob under the cluster KEK with its check value
        (its CREATING record is stored, a live record: ``Store.save_wrapped``).

        Raises: FailedPrecondition (no KEK, or the key cannot be wrapped), DeviceUnavailable
        (also: the record was given up meanwhile, nothing stored)."""
        from authority.backends.pkcs11._wrap import KEK_LABEL

        kek_id = self._store.cluster_kek() or KEK_LABEL
        check = wrapper.key_check(key_id)
        blob = wrapper.wrap_key(key_id, kek_id)
        if not self._store.save_wrapped(key_id, kek_id, blob, check):
            raise DeviceUnavailable(f"key {key_id.hex()}: its record was given up before its "
                                    "wrapped copy was stored; retry")
        log.info("key %s wrapped under the cluster KEK %r and stored", key_id.hex(), kek_id)

    def rewrap(self, kek_id: str) -> list[bytes]:
        """Per-node tokens, after the cluster KEK was replaced by ``kek_id`` (a node removed):
        store again, under ``kek_id``, the blob of every live key whose ORIGINAL is in this
        replica's token and whose blob is under an older KEK (same check value: the store
        refuses another), so that a node joining later, which receives only ``kek_id``, can
        unwrap it. A copy cannot be wrapped again (never extractable): its blob is the
        original's node's to replace, and a key whose original was on the removed node keeps
        its old blob (members still hold the old KEK; rotation retires it). Returns the keys
        re-wrapped.

        Raises: DeviceUnavailable (the store or the device failed: call again)."""
        if self._wrapper is None:
            return []
        live = sorted(self._opening_ids())
        stale = [w for w in self._store.load_wrapped(live).values()
                 if w.kek_id != kek_id and w.key_id not in self._not_mine]
        done: list[bytes] = []
        for wrapped in stale:
            try:
                blob = self._wrapper.wrap_key(wrapped.key_id, kek_id)
            except (KeyNotFound, FailedPrecondition):   # a copy, or not in this token
                self._not_mine.add(wrapped.key_id)
                continue
            if self._store.save_wrapped(wrapped.key_id, kek_id, blob, wrapped.check):
                done.append(wrapped.key_id)
                log.info("key %s re-wrapped under the cluster KEK %r", wrapped.key_id.hex(),
                         kek_id)
        return done

    def _lost(self, key_id: bytes, actor: str, audited: bool,
              reason: str = "another rotation won") -> None:
        """The key made here will not be committed (another rotation won, or the commit was
        refused or failed): destroy it, and if its creation was audited, audit that it was
        abandoned (the chain never keeps a ``key.created`` for a key that is in no ring).
        Never raises."""
        if audited:
            try:
                self._audit(actor, "key.abandoned", {"key_id": key_id.hex(), "in_device": True,
                                                     "reason": reason})
            except AuthorityError:
                log.exception("could not audit the abandoned key %s", key_id.hex())
        self._discard(key_id)
        log.info("key %s destroyed: %s (sealing key %s)", key_id.hex(), reason,
                 (self._pending or self._primary or b"").hex())

    def _new_key_id(self) -> bytes:
        while True:
            key_id = secrets.token_bytes(KEY_ID_LEN)
            if key_id not in self._records and key_id not in self._creating:
                return key_id

    # -- retirement and destruction ----------------------------------------------------------------

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
        crashpoints.reached(crashpoints.DESTROY_AFTER_DEVICE)
        self._verified.discard(record.key_id)
        now = self._clock.now()
        self._apply(lambda: self._marked_destroyed(record.key_id, now), fence)
        log.info("key %s destroyed in the device (%s)", record.key_id.hex(), reason)
        return self._records.get(record.key_id) or replace(
            record, state=KeyState.DESTROYED, destroyed_at=now)

    def _marked_destroyed(self, key_id: bytes, now: float) -> Change | None:
        current = self._records.get(key_id)
        if current is None or current.state == KeyState.DESTROYED:
            return None
        return Change([replace(current, state=KeyState.DESTROYED, destroyed_at=now)])

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
