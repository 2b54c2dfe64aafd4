"""This replica's copy of the key ring: what it holds, how it is read from the store, and
how a change of it is committed (a compare-and-swap on the ring's version, ``RingCopy._apply``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, cast

from authority.audit import AuditHook
from authority.backends.base import KeyBackend
from authority.clock import Clock
from authority.cluster import ReplicaIdentity
from authority.config import ClusterSettings, KeyPolicy, TicketPolicy
from authority.errors import AuthorityError, DeviceUnavailable, KeyNotFound, StartupError
from authority.keys import KeyRecord, KeyState
from authority.store.base import Fence, ReplicaRecord, Store

log = logging.getLogger("authority.keyring")

#: seconds a CREATING key waits for its creation to complete before it is given up: longer than
#: any device call (a TPM create may finish after its caller timed out)
CREATING_GRACE = 600.0
#: compare-and-swap attempts of one key ring change before it fails UNAVAILABLE
CAS_ATTEMPTS = 8
#: the states of keys that open tickets (a replica reports those its device holds)
OPENING = (KeyState.ACTIVE, KeyState.PENDING, KeyState.DECRYPT_ONLY)

Event = tuple[str, str, dict[str, Any]]   # (actor, action, details) for the audit hook


class Wrapping(Protocol):
    """What a backend does for per-node tokens (``cluster.per_node_tokens``): ticket keys
    copied between tokens under the cluster KEK (authority/backends/pkcs11/_wrap.py)."""

    def create_wrappable_key(self, key_id: bytes) -> None: ...

    def wrap_key(self, key_id: bytes, kek_label: str = ...) -> bytes: ...

    def key_check(self, key_id: bytes) -> bytes: ...

    def unwrap_key(self, key_id: bytes, blob: bytes, check: bytes,
                   kek_label: str = ...) -> None: ...

    def kek_attributes(self, kek_label: str = ...) -> dict[str, bool]: ...


_WRAPPING = ("create_wrappable_key", "wrap_key", "key_check", "unwrap_key", "kek_attributes")


def wrapping_backend(cluster: ClusterSettings, backend: object) -> Wrapping | None:
    """``backend`` as a :class:`Wrapping` when ``cluster.per_node_tokens`` is on, else None.

    Raises: StartupError (on, and the backend cannot wrap keys: the TPM)."""
    if not cluster.per_node_tokens:
        return None
    lacking = [name for name in _WRAPPING if not callable(getattr(backend, name, None))]
    if lacking:
        raise StartupError("cluster.per_node_tokens: the backend cannot copy keys between "
                           f"tokens (no {', '.join(lacking)}); use backend pkcs11")
    return cast(Wrapping, backend)


def _no_audit(actor: str, action: str, details: Mapping[str, Any]) -> None:
    """The audit hook of a key ring built without one."""


@dataclass
class Change:
    """One key ring change: records to save and to delete, and what to audit before it
    commits."""

    save: list[KeyRecord] = field(default_factory=list)
    delete: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class RingCopy:
    """The state of a ``KeyRing`` and the primitives every part of it uses; thread-safe
    through its locks (see ``__init__``)."""

    # -- state -------------------------------------------------------------------------------------

    def __init__(self, backend: KeyBackend, store: Store, keys: KeyPolicy,
                 tickets: TicketPolicy, clock: Clock, audit: AuditHook | None = None,
                 cluster: ClusterSettings | None = None,
                 replica: ReplicaIdentity | None = None,
                 wrapper: Wrapping | None = None) -> None:
        self._backend = backend
        # per-node tokens: keys are made wrappable, their blobs stored, copies unwrapped here
        self._wrapper = wrapper
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
        # keys (and their states then) still absent after a refresh of the device's view
        self._absent: dict[bytes, KeyState] = {}
        self._not_mine: set[bytes] = set()   # copies: their blobs are not this replica's to
                                             # re-wrap (``rewrap``)
        self._confirmed_at = -math.inf       # when the copy was last confirmed current
        self._reread_at = -math.inf          # when a redeem last made the ring be re-read
        self._reread_ok = True               # whether that re-read reached the store
        self._block_key: bytes | None = None  # the key of the seal block (_seal_lock)
        self._next = 0                       # next seal number of the block (_seal_lock)
        self._end = 0                        # end of the block, exclusive (_seal_lock)
        self._seal_lock = threading.Lock()
        self._change_lock = threading.RLock()  # the copy, rotation, retirement, maintenance
        self._reread_lock = threading.Lock()

    # -- reading the ring --------------------------------------------------------------------------

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

    def opening_ids(self) -> frozenset[bytes]:
        """The ids of the keys that open tickets (ACTIVE, PENDING, DECRYPT_ONLY), as last read.
        Never raises."""
        return frozenset(self._opening_ids())

    def _opening_ids(self) -> set[bytes]:
        return {k for k, r in self._records.items() if r.state in OPENING}

    def _expected(self) -> dict[bytes, KeyState]:
        """Keys the device should hold, with their states: those that open tickets, and
        CREATING ones (whose creation may have completed)."""
        expected = {k: r.state for k, r in self._records.items() if r.state in OPENING}
        expected.update((k, KeyState.CREATING) for k in self._creating)
        return expected

    # -- the device's keys -------------------------------------------------------------------------

    def _list_device(self) -> set[bytes]:
        """The keys the device lists, recorded as verified. When it lacks a key the ring
        expects, the backend's view of the device is refreshed and the device listed again
        before anything concludes the key is absent (another process may have made it: a view
        can be stale, backends/base.py ``refresh``); with per-node tokens, a key that opens
        tickets and is still absent is then unwrapped from its blob in the store
        (``_unwrap_copies``). A key still absent is not refreshed for (nor unwrapped) again
        while its state stays the same, unless the store or device failed. Callers hold
        ``_change_lock``.

        Raises: DeviceUnavailable.
        """
        present = self._backend.list_keys()
        lacking = {k: s for k, s in self._expected().items() if k not in present}
        new = lacking.items() - self._absent.items()
        if new:
            self._backend.refresh()
            present = self._backend.list_keys()
            lacking = {k: s for k, s in lacking.items() if k not in present}
            copied, retry = self._unwrap_copies(k for k, _ in new if k in lacking)
            present |= copied
            lacking = {k: s for k, s in lacking.items() if k not in copied}
            self._absent = {k: s for k, s in lacking.items() if k not in retry}
        else:
            self._absent = lacking
        self._verified = set(present)
        return present

    def _unwrap_copies(self, lacking: Iterable[bytes]) -> tuple[set[bytes], set[bytes]]:
        """Per-node tokens: unwrap into this replica's token a copy of each key of ``lacking``
        that opens tickets, from its blob in the store, checked against its check value
        (``unwrap_key``). Returns (the keys copied, those to try again at the next listing:
        the store or the device was unavailable). A key without a blob, or that cannot be
        unwrapped (no KEK, a tampered blob, another check value, the device failed) is logged
        and stays absent: this replica does not report it loaded (a PENDING key then waits for
        ``keys.publish_delay``). Callers hold ``_change_lock``. Never raises."""
        wanted = [k for k in lacking if k in self._records
                  and self._records[k].state in OPENING]
        if self._wrapper is None or not wanted:
            return set(), set()
        try:
            blobs = self._store.load_wrapped(wanted)
        except DeviceUnavailable as exc:
            log.warning("could not read the wrapped keys: %s", exc.message)
            return set(), set(wanted)
        copied: set[bytes] = set()
        retry: set[bytes] = set()
        for key_id in wanted:
            wrapped = blobs.get(key_id)
            if wrapped is None:
                log.error("key %s is not in this replica's token and the store has no wrapped "
                          "copy of it", key_id.hex())
                continue
            try:
                self._wrapper.unwrap_key(key_id, wrapped.blob, wrapped.check, wrapped.kek_id)
            except AuthorityError as exc:
                log.error("could not unwrap a copy of key %s into this replica's token "
                          "(%s): %s; not reported loaded", key_id.hex(), type(exc).__name__,
                          exc.message)
                if isinstance(exc, DeviceUnavailable):
                    retry.add(key_id)
                continue
            log.info("key %s copied into this replica's token (check value matches)",
                     key_id.hex())
            copied.add(key_id)
        return copied, retry

    def _destroy_in_device(self, key_id: bytes, what: str) -> bool:
        """Destroy ``key_id`` in this replica's device: True once it is gone (also when the
        device did not have it), False after a device failure, logged as "could not destroy
        ``what``" (the caller's next pass tries again). Never raises."""
        try:
            self._backend.destroy_key(key_id)
        except KeyNotFound:
            pass
        except DeviceUnavailable as exc:
            log.error("could not destroy %s: %s", what, exc.message)
            return False
        return True

    # -- committing changes ------------------------------------------------------------------------

    def _apply(self, build: Callable[[], Change | None], fence: Fence | None = None,
               audited: list[Event] | None = None) -> bool:
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

    def _install_change(self, change: Change, version: int) -> None:
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
