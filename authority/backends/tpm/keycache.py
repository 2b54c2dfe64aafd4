"""The ticket keys' loaded objects: an LRU of loaded pairs, saved contexts and parsed blobs.

swtpm (and many chips) guarantee only 3 transient object slots and, without a resource
manager, nobody else frees them. The primary is kept as a saved context and flushed as soon
as children are loaded. Ticket keys are loaded on demand into a small LRU whose size follows
from the slot count (3 slots: one key, as each key needs two). After the first load from the
blobs, each key's two objects are context-saved: reloading them later takes two
TPM2_ContextLoad calls (measured on swtpm: about 0.45 ms per key) instead of
ContextLoad(primary) + 2 x Load + Flush (about 1.8 ms). Saved contexts die with a TPM Reset;
a refused one is dropped and the key is loaded from its blobs again.

No crypto runs with a key that is not the backend's templates' (templates.key_problems): its
public blobs are compared with them when they are parsed, before any TPM2_Load, and after the
load the public areas the TPM reports (TPM2_ReadPublic, about 0.05 ms each on swtpm, on blob
loads only) must be those blobs. A key that fails is refused for the life of the process (or
until it is destroyed): logged once at ERROR with what differs, counted (``keys_refused``),
left out of :meth:`KeyCache.usable` (so of ``list_keys``), and every use of it raises
:class:`KeyRefused`. What was checked stays cached (parsed blobs, saved contexts), so blobs
swapped on disk after their key was first read are never loaded by this process.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from tpm2_pytss.types import (  # type: ignore[import-untyped, unused-ignore]
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
)

from authority.backends.tpm._errors import KeyRefused, Kind, TpmError
from authority.backends.tpm.blobs import BlobStore
from authority.backends.tpm.connection import Connection
from authority.backends.tpm.parent import Parent
from authority.backends.tpm.templates import key_problems, loaded_problems
from authority.errors import DeviceUnavailable, KeyNotFound

__all__ = ["KeyCache", "Pair"]

log = logging.getLogger(__name__)

_SAVED_CONTEXTS_MAX: Final = 1024   # keys whose saved contexts are kept (about 2 x 400 B each)
_PARSED_BLOBS_MAX: Final = 4096


@dataclass
class Pair:
    """The two loaded objects of one ticket key (ESYS_TR handles)."""

    aes: Any
    hmac: Any


@dataclass(frozen=True)
class _Blobs:
    """The parsed public and private parts of one ticket key."""

    aes_public: Any
    aes_private: Any
    hmac_public: Any
    hmac_private: Any

    @property
    def publics(self) -> dict[str, Any]:
        """The two public areas by prefix, as templates.key_problems takes them."""
        return {"aes": self.aes_public, "hmac": self.hmac_public}


class KeyCache:
    """Which ticket keys are loaded (LRU), their saved contexts and parsed blobs."""

    def __init__(self, conn: Connection, parent: Parent, store: BlobStore) -> None:
        self._conn = conn
        self._parent = parent
        self._store = store
        self._loaded: OrderedDict[bytes, Pair] = OrderedDict()
        self._saved: OrderedDict[bytes, tuple[Any, Any]] = OrderedDict()
        self._parsed: OrderedDict[bytes, _Blobs] = OrderedDict()
        self._refused: dict[bytes, tuple[str, ...]] = {}   # key id -> what differs
        self.slots = 3               # TPM_PT_HR_TRANSIENT_MIN, set at start-up

    @property
    def capacity(self) -> int:
        """Ticket keys kept loaded: two slots each, one slot kept for the primary."""
        return max(1, (self.slots - 1) // 2)

    @property
    def loaded_count(self) -> int:
        """How many ticket keys are loaded now."""
        return len(self._loaded)

    def hot_key(self) -> bytes | None:
        """The most recently used loaded ticket key (the worker schedules its jobs first)."""
        return next(reversed(self._loaded), None)

    def pair(self, key_id: bytes) -> Pair:
        """The key's two objects, loaded (LRU hit, saved contexts or blobs).

        Raises: KeyRefused (not the templates' key); KeyNotFound; TpmError; DeviceUnavailable
        (key dir).
        """
        refused = self._refused.get(key_id)
        if refused is not None:
            raise KeyRefused(key_id, refused)
        pair = self._loaded.get(key_id)
        if pair is not None:
            self._loaded.move_to_end(key_id)
            return pair
        saved = self._saved.get(key_id)
        if saved is not None:
            self.make_room(2)
            try:
                pair = self._load_saved(saved)
                self._saved.move_to_end(key_id)
            except TpmError as err:
                if err.kind is not Kind.STALE:
                    raise
                del self._saved[key_id]
        if pair is None:
            pair = self._load_blobs(key_id)
        self._loaded[key_id] = pair
        return pair

    def make_room(self, slots: int) -> None:
        """Evict least recently used keys until ``slots`` transient slots are free."""
        while self._loaded and 2 * len(self._loaded) + slots > self.slots:
            _, pair = self._loaded.popitem(last=False)
            self._flush_pair(pair)
            self._conn.counters["evictions"] += 1

    def drop_loaded(self, flush: bool) -> None:
        """Forget every loaded object (flushing it if ``flush``)."""
        while self._loaded:
            _, pair = self._loaded.popitem(last=False)
            if flush:
                self._flush_pair(pair)

    def reset(self, flush: bool) -> None:
        """The TPM lost our objects: forget loaded objects (flushing them if ``flush``), saved
        contexts and the primary's saved context; the next use loads from the blobs."""
        self.drop_loaded(flush)
        self._saved.clear()
        self._parent.forget()

    def forget(self, key_id: bytes) -> None:
        """Flush the key's objects (if connected) and drop its saved contexts, parsed blobs
        and refusal."""
        pair = self._loaded.pop(key_id, None)
        if pair is not None and self._conn.esapi is not None:
            self._flush_pair(pair)
        self._saved.pop(key_id, None)
        self._parsed.pop(key_id, None)
        self._refused.pop(key_id, None)

    def usable(self, key_ids: set[bytes]) -> set[bytes]:
        """``key_ids`` without the keys refused, each not yet checked checked now from its
        public blobs (no TPM call). A key whose blobs cannot be read or parsed is kept: its
        use fails as a device error, as before this check. Never raises."""
        usable = set()
        for key_id in key_ids:
            try:
                self._blobs(key_id)
            except KeyNotFound:          # refused, or its files gone meanwhile
                continue
            except DeviceUnavailable as err:
                log.debug("key %s not checked: %s", key_id.hex(), err)
            usable.add(key_id)
        return usable

    def _blobs(self, key_id: bytes) -> _Blobs:
        """The parsed blobs of a key (cached), their public areas checked against the
        templates. Raises: KeyRefused; KeyNotFound; DeviceUnavailable (TpmError: damaged)."""
        refused = self._refused.get(key_id)
        if refused is not None:
            raise KeyRefused(key_id, refused)
        parsed = self._parsed.get(key_id)
        if parsed is not None:
            self._parsed.move_to_end(key_id)
            return parsed
        raw = self._store.read(key_id)
        parsed = _Blobs(
            aes_public=self._unmarshal(TPM2B_PUBLIC, raw["aes.pub"], key_id),
            aes_private=self._unmarshal(TPM2B_PRIVATE, raw["aes.priv"], key_id),
            hmac_public=self._unmarshal(TPM2B_PUBLIC, raw["hmac.pub"], key_id),
            hmac_private=self._unmarshal(TPM2B_PRIVATE, raw["hmac.priv"], key_id),
        )
        problems = key_problems(parsed.publics)
        if problems:
            self._refuse(key_id, problems, "its public blobs differ from the backend's templates")
        self._parsed[key_id] = parsed
        if len(self._parsed) > _PARSED_BLOBS_MAX:
            self._parsed.popitem(last=False)
        return parsed

    def _unmarshal(self, cls: Any, data: bytes, key_id: bytes) -> Any:
        """Parse one blob file. Raises: TpmError (damaged file)."""
        value, used = self._conn.call(f"parsing the blobs of key {key_id.hex()}", cls.unmarshal,
                                      data)
        if used != len(data):
            raise TpmError(f"tpm: key blob of {key_id.hex()} has {len(data) - used} trailing "
                           "octets (damaged file)", Kind.OTHER, 0)
        return value

    def _load_saved(self, saved: tuple[Any, Any]) -> Pair:
        """ContextLoad both objects. Raises: TpmError (STALE if the contexts are refused)."""
        conn = self._conn
        aes = conn.call("loading a saved key context", conn.esapi.context_load, saved[0],
                        saved_context=True)
        try:
            mac = conn.call("loading a saved key context", conn.esapi.context_load, saved[1],
                            saved_context=True)
        except BaseException:
            conn.flush_quietly(aes)
            raise
        conn.counters["context_loads"] += 1
        return Pair(aes, mac)

    def _load_blobs(self, key_id: bytes) -> Pair:
        """Load both objects from their blobs under the parent, then save their contexts.

        Raises: KeyNotFound; TpmError.
        """
        blobs = self._blobs(key_id)
        self.make_room(3)
        pair = self._load_under_parent(key_id, blobs)
        self._conn.counters["blob_loads"] += 1
        try:
            problems = loaded_problems(self._conn, {"aes": pair.aes, "hmac": pair.hmac},
                                       blobs.publics)
        except BaseException:
            self._flush_pair(pair)
            raise
        if problems:
            self._flush_pair(pair)
            self._refuse(key_id, problems, "the TPM loaded other objects than its checked blobs")
        self._save_contexts(key_id, pair)
        return pair

    def _refuse(self, key_id: bytes, problems: list[str], why: str) -> NoReturn:
        """Never use ``key_id`` again (until it is destroyed): log once at ERROR, count it.
        Raises: KeyRefused."""
        refused = tuple(problems)
        self.forget(key_id)     # what an earlier read of its blobs left loaded or saved
        self._refused[key_id] = refused
        self._conn.counters["keys_refused"] += 1
        log.error("tpm key %s refused, never used: %s (%s). Not a key the authority made "
                  "(its blobs in %s swapped, or restored from elsewhere?): tickets under it "
                  "are INVALID, and the key ring no longer finds it in the device (a sealing "
                  "key is replaced, any other becomes MISSING)", key_id.hex(), why,
                  ", ".join(refused), self._store.directory)
        raise KeyRefused(key_id, refused)

    def _load_under_parent(self, key_id: bytes, blobs: _Blobs) -> Pair:
        """TPM2_Load both objects under the (opened, then released) parent. Raises: TpmError."""
        conn = self._conn
        what = f"loading key {key_id.hex()} from its blobs"
        parent = self._parent.open()
        try:
            aes = conn.call(what, conn.esapi.load, parent, blobs.aes_private, blobs.aes_public)
            try:
                mac = conn.call(what, conn.esapi.load, parent, blobs.hmac_private,
                                blobs.hmac_public)
            except BaseException:
                conn.flush_quietly(aes)
                raise
        finally:
            self._parent.release(parent)
        return Pair(aes, mac)

    def _save_contexts(self, key_id: bytes, pair: Pair) -> None:
        """Keep the pair's saved contexts for cheap reloads; a failure only costs speed."""
        conn = self._conn
        try:
            saved = (conn.call("saving a key context", conn.esapi.context_save, pair.aes),
                     conn.call("saving a key context", conn.esapi.context_save, pair.hmac))
        except TpmError as err:
            log.debug("key %s: contexts not saved (%s)", key_id.hex(), err)
            return
        self._saved[key_id] = saved
        if len(self._saved) > _SAVED_CONTEXTS_MAX:
            self._saved.popitem(last=False)

    def _flush_pair(self, pair: Pair) -> None:
        self._conn.flush_quietly(pair.aes)
        self._conn.flush_quietly(pair.hmac)
