"""The TPM itself, through one tpm2-pytss ESAPI connection: confined to the backend's worker thread.

Nothing here is thread-safe and nothing needs to be: :class:`Device` is created, used and closed
by the one worker thread of :class:`authority.backends.tpm.backend.TpmBackend`.

Objects
    A storage primary key (ECC NIST P-256, owner hierarchy, restricted decrypt, AES-128-CFB
    protection) is recreated at start-up from a fixed template, which yields the same key every
    time for the same owner seed, so no persistent handle is needed. Under it each ticket key is
    two ordinary objects made by TPM2_Create: an AES-256 key (CFB, decrypt + sign/encrypt) and an
    HMAC-SHA256 keyed-hash key, both fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth
    | noDA, neither restricted nor duplicable, with an empty authorisation (their use is guarded
    by access to this TPM and the key directory; noDA means a wrong guess never locks anything).

Slots
    swtpm (and many chips) guarantee only 3 transient object slots and, without a resource
    manager, nobody else frees them. The primary is kept as a saved context and flushed as soon
    as children are loaded. Ticket keys are loaded on demand into a small LRU whose size follows
    from the slot count (3 slots: one key, as each key needs two). After the first load from the
    blobs, each key's two objects are context-saved: reloading them later takes two
    TPM2_ContextLoad calls (measured on swtpm: about 0.45 ms per key) instead of
    ContextLoad(primary) + 2 x Load + Flush (about 1.8 ms). Saved contexts die with a TPM Reset;
    a refused one is dropped and the key is loaded from its blobs again.

Recovery
    TPM_RC_RETRY / YIELDED / TESTING are resubmitted ``retries`` times with a short backoff. A
    handle or saved context the TPM no longer knows (it was restarted) drops every loaded object
    and the operation runs once more from the blobs; out of object memory evicts our LRU and
    runs once more; a lost TCTI connection reconnects (flushing transient objects left behind)
    before the next operation.
"""

from __future__ import annotations

import hmac as hmac_mod
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-untyped, unused-ignore]
from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_SU,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (  # type: ignore[import-untyped, unused-ignore]
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMS_KEYEDHASH_PARMS,
    TPMS_SCHEME_HASH,
    TPMS_SYMCIPHER_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_PUBLIC_PARMS,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SCHEME_KEYEDHASH,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from authority.backends.tpm._errors import (
    Ctx,
    Kind,
    Phase,
    TpmError,
    TpmStartupError,
    translate,
)
from authority.backends.tpm.blobs import BlobStore
from authority.backends.tpm.capabilities import TpmCapabilities, check_capabilities
from authority.config import Secret
from authority.errors import FailedPrecondition, KeyNotFound, StartupError, UnsealFailed

__all__ = ["IV_LEN", "MAC_LEN", "Device", "DeviceInfo"]

log = logging.getLogger(__name__)

T = TypeVar("T")

IV_LEN: Final = 16
MAC_LEN: Final = 32
KEY_ID_LEN: Final = 8
_SAVED_CONTEXTS_MAX: Final = 1024   # keys whose saved contexts are kept (about 2 x 400 B each)
_PARSED_BLOBS_MAX: Final = 4096
_BACKOFF_FIRST: Final = 0.005
_BACKOFF_MAX: Final = 0.25
_RECOVERIES: Final = 2
_TSS_MAX_BUFFER: Final = 1024       # TPM2B_MAX_BUFFER in the TSS headers (MAX_DIGEST_BUFFER)

# TPM_PT properties (Part 2, table 23)
_PT_FIXED: Final = 0x100
_PT_MANUFACTURER: Final = 0x105
_PT_VENDOR_STRING_1: Final = 0x106
_PT_FIRMWARE_VERSION_1: Final = 0x10B
_PT_FIRMWARE_VERSION_2: Final = 0x10C
_PT_INPUT_BUFFER: Final = 0x10D
_PT_HR_TRANSIENT_MIN: Final = 0x10E
_PT_VAR: Final = 0x200
_PT_PERMANENT: Final = 0x200
_PT_LOCKOUT_COUNTER: Final = 0x20E
_PT_MAX_AUTH_FAIL: Final = 0x20F
_PERMANENT_IN_LOCKOUT: Final = 1 << 9     # TPMA_PERMANENT.inLockout
_TRANSIENT_FIRST: Final = 0x80000000
_CC_FIRST: Final = 0x11F
_CC_TEST_PARMS: Final = 0x18A

_BASE_ATTRIBUTES: Final = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
)
#: key_attributes() names and the TPMA_OBJECT bit each reports
ATTRIBUTE_FLAGS: Final[dict[str, int]] = {
    "fixed_tpm": int(TPMA_OBJECT.FIXEDTPM),
    "fixed_parent": int(TPMA_OBJECT.FIXEDPARENT),
    "sensitive_data_origin": int(TPMA_OBJECT.SENSITIVEDATAORIGIN),
    "user_with_auth": int(TPMA_OBJECT.USERWITHAUTH),
    "admin_with_policy": int(TPMA_OBJECT.ADMINWITHPOLICY),
    "no_da": int(TPMA_OBJECT.NODA),
    "encrypted_duplication": int(TPMA_OBJECT.ENCRYPTEDDUPLICATION),
    "restricted": int(TPMA_OBJECT.RESTRICTED),
    "decrypt": int(TPMA_OBJECT.DECRYPT),
    "sign_encrypt": int(TPMA_OBJECT.SIGN_ENCRYPT),
}


def _aes256_cfb() -> Any:
    return TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=256),
                               mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))


def _hmac_sha256_scheme() -> Any:
    return TPMT_KEYEDHASH_SCHEME(
        scheme=TPM2_ALG.HMAC,
        details=TPMU_SCHEME_KEYEDHASH(hmac=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )


def primary_template() -> Any:
    """TPM2B_PUBLIC of the storage primary: ECC P-256, restricted decrypt, AES-128-CFB, noDA.

    The same as ``tpm2_createprimary -C o -g sha256 -G ecc256:aes128cfb -a
    'restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda'``.
    """
    return TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_BASE_ATTRIBUTES | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                          keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                          mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
    ))


def aes_template() -> Any:
    """TPM2B_PUBLIC of a ticket AES key: AES-256-CFB, decrypt + sign/encrypt, not restricted."""
    return TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.SYMCIPHER,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_BASE_ATTRIBUTES | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.SIGN_ENCRYPT,
        parameters=TPMU_PUBLIC_PARMS(symDetail=TPMS_SYMCIPHER_PARMS(sym=_aes256_cfb())),
    ))


def hmac_template() -> Any:
    """TPM2B_PUBLIC of a ticket HMAC key: keyed hash, HMAC-SHA256, sign only."""
    return TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_BASE_ATTRIBUTES | TPMA_OBJECT.SIGN_ENCRYPT,
        parameters=TPMU_PUBLIC_PARMS(
            keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=_hmac_sha256_scheme())
        ),
    ))


@dataclass(frozen=True)
class DeviceInfo:
    """What start-up learnt about the TPM."""

    tcti: str
    manufacturer: str
    vendor: str
    firmware: str
    max_buffer: int          # TPM_PT_INPUT_BUFFER: most octets per EncryptDecrypt2/HMAC call
    transient_slots: int     # TPM_PT_HR_TRANSIENT_MIN
    lru_keys: int            # ticket keys kept loaded at once
    stale_flushed: int       # transient objects of earlier clients flushed at start-up
    lockout_counter: int

    @property
    def token(self) -> str:
        return f"{self.manufacturer} {self.vendor} firmware {self.firmware}"


@dataclass
class _Pair:
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


class Device:
    """One ESAPI connection to the TPM and the objects loaded through it. Worker thread only."""

    def __init__(self, tcti: str, owner_auth: Secret, blobs: BlobStore, retries: int,
                 parent: int | None = None) -> None:
        self._tcti = tcti
        self._parent = parent      # a persistent storage key, or None: our own ECC primary
        self._owner_auth = owner_auth
        self._store = blobs
        self._retries = retries
        self._esapi: Any = None
        self._primary_ctx: Any = None                     # TPMS_CONTEXT of the primary
        self._loaded: OrderedDict[bytes, _Pair] = OrderedDict()
        self._saved: OrderedDict[bytes, tuple[Any, Any]] = OrderedDict()
        self._parsed: OrderedDict[bytes, _Blobs] = OrderedDict()
        self._slots = 3
        self._needs_reconnect = False
        self.info: DeviceInfo | None = None
        self.counters: dict[str, int] = {
            "blob_loads": 0, "context_loads": 0, "evictions": 0, "resyncs": 0, "reconnects": 0,
            "retries": 0,
        }

    # -- the one way TPM calls are made ---------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any,
              phase: Phase = Phase.OPERATION, saved_context: bool = False) -> T:
        """Run one tpm2-pytss call, resubmitting on RETRY/YIELDED/TESTING.

        Raises: TpmError (serving) or TpmStartupError (start-up), made by ``translate``.
        """
        attempt = 0
        while True:
            try:
                return fn(*args)
            except TSS2_Exception as exc:
                err = translate(exc, Ctx(phase, what, self._tcti, saved_context))
                if err.kind is Kind.BUSY and attempt < self._retries:
                    time.sleep(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** attempt))
                    attempt += 1
                    self.counters["retries"] += 1
                    continue
                if err.kind in (Kind.UNREACHABLE, Kind.CLIENT):
                    self._needs_reconnect = True
                raise err from exc

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> DeviceInfo:
        """Connect, check capabilities, flush stale objects, make the storage primary.

        Raises: StartupError (TpmStartupError) naming tpm.tcti or tpm.owner_auth.
        """
        self._connect(Phase.CONNECT)
        fixed = self._properties(_PT_FIXED, Phase.CONNECT)
        variable = self._properties(_PT_VAR, Phase.STARTUP)
        self._slots = fixed.get(_PT_HR_TRANSIENT_MIN, 3)
        caps = self._capabilities(self._slots)
        check_capabilities(caps, self._tcti)
        flushed = self._flush_stale(Phase.STARTUP)
        if variable.get(_PT_PERMANENT, 0) & _PERMANENT_IN_LOCKOUT:
            log.warning(
                "the TPM at %s is in dictionary-attack lockout (%d of %d failures); the ticket "
                "keys are noDA and unaffected", self._tcti, variable.get(_PT_LOCKOUT_COUNTER, 0),
                variable.get(_PT_MAX_AUTH_FAIL, 0))
        if self._parent is None:
            primary = self._create_primary(Phase.STARTUP)
            self._primary_ctx = self._call("saving the storage primary's context",
                                           self._esapi.context_save, primary, phase=Phase.STARTUP)
            self._call("flushing the storage primary", self._esapi.flush_context, primary,
                       phase=Phase.STARTUP)
        else:
            self._check_parent()
        self.info = DeviceInfo(
            tcti=self._tcti,
            manufacturer=_ascii(fixed.get(_PT_MANUFACTURER, 0)),
            vendor=" ".join("".join(_ascii(fixed.get(_PT_VENDOR_STRING_1 + i, 0), strip=False)
                                    for i in range(4)).split()),
            firmware=_firmware(fixed.get(_PT_FIRMWARE_VERSION_1, 0),
                               fixed.get(_PT_FIRMWARE_VERSION_2, 0)),
            max_buffer=min(fixed.get(_PT_INPUT_BUFFER, _TSS_MAX_BUFFER), _TSS_MAX_BUFFER),
            transient_slots=self._slots,
            lru_keys=self.lru_capacity,
            stale_flushed=flushed,
            lockout_counter=variable.get(_PT_LOCKOUT_COUNTER, 0),
        )
        return self.info

    @property
    def lru_capacity(self) -> int:
        """Ticket keys kept loaded: two slots each, one slot kept for the primary."""
        return max(1, (self._slots - 1) // 2)

    def _connect(self, phase: Phase) -> None:
        """Open the TCTI and ESAPI; send TPM2_Startup if the TPM was never started.

        Raises: TpmStartupError (CONNECT phase) or TpmError.
        """
        self._esapi = self._call("loading the TCTI", ESAPI, self._tcti, phase=phase)
        if self._owner_auth.reveal():
            self._call("setting the owner authorisation", self._esapi.tr_set_auth,
                       ESYS_TR.OWNER, self._owner_auth.reveal(), phase=phase)
        try:
            self._call("probing the TPM", self._esapi.get_random, 8, phase=phase)
        except (TpmError, TpmStartupError) as err:
            if err.kind is not Kind.INITIALIZE:
                raise
            log.info("the TPM at %s was not started; sending TPM2_Startup(CLEAR)", self._tcti)
            self._call("TPM2_Startup", self._esapi.startup, TPM2_SU.CLEAR, phase=phase)
        self._needs_reconnect = False

    def close(self) -> None:
        """Flush every object we loaded and close the connection; never raises."""
        if self._esapi is None:
            return
        self._drop_loaded(flush=True)
        try:
            self._esapi.close()
        except TSS2_Exception as exc:
            log.warning("closing the TPM connection: %s", translate(exc, Ctx(
                Phase.OPERATION, "closing the connection", self._tcti)))
        self._esapi = None

    def _reconnect(self) -> None:
        """After a lost connection: a fresh ESAPI, stale transients flushed, state dropped.

        Raises: TpmError (the TPM is still unreachable).
        """
        log.warning("reconnecting to the TPM at %s", self._tcti)
        self.counters["reconnects"] += 1
        self._drop_loaded(flush=False)
        self._primary_ctx = None
        self._saved.clear()
        old, self._esapi = self._esapi, None
        if old is not None:
            try:
                old.close()
            except TSS2_Exception as exc:
                log.debug("closing the old connection: %s", translate(exc, Ctx(
                    Phase.OPERATION, "closing the connection", self._tcti)))
        self._connect(Phase.OPERATION)
        self._flush_stale(Phase.OPERATION)

    # -- start-up helpers ----------------------------------------------------------------------

    def _properties(self, first: int, phase: Phase) -> dict[int, int]:
        """TPM_PT properties from ``first`` up to the end of its group. Raises: TpmStartupError."""
        out: dict[int, int] = {}
        prop, more = first, True
        while more and prop < first + 0x100:
            more, data = self._call("reading TPM properties", self._esapi.get_capability,
                                    TPM2_CAP.TPM_PROPERTIES, prop, 64, phase=phase)
            props = [(int(p.property), int(p.value)) for p in data.data.tpmProperties]
            if not props:
                break
            out.update((k, v) for k, v in props if first <= k < first + 0x100)
            prop = props[-1][0] + 1
        return out

    def _capabilities(self, slots: int) -> TpmCapabilities:
        """Commands, algorithms, curves and TestParms results. Raises: TpmStartupError."""
        commands = self._capability_list(TPM2_CAP.COMMANDS, _CC_FIRST,
                                         lambda d: [int(c) & 0xFFFF for c in d.command])
        algorithms = self._capability_list(TPM2_CAP.ALGS, 0,
                                           lambda d: [int(a.alg) for a in d.algorithms])
        curves = self._capability_list(TPM2_CAP.ECC_CURVES, 0,
                                       lambda d: [int(c) for c in d.eccCurves])
        if _CC_TEST_PARMS in commands:
            aes_ok = self._test_parms(TPMT_PUBLIC_PARMS(
                type=TPM2_ALG.SYMCIPHER,
                parameters=TPMU_PUBLIC_PARMS(symDetail=TPMS_SYMCIPHER_PARMS(sym=_aes256_cfb())),
            ))
            hmac_ok = self._test_parms(TPMT_PUBLIC_PARMS(
                type=TPM2_ALG.KEYEDHASH,
                parameters=TPMU_PUBLIC_PARMS(
                    keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=_hmac_sha256_scheme())
                ),
            ))
        else:  # cannot ask; the algorithm lists must do
            aes_ok = hmac_ok = True
        return TpmCapabilities.of(commands, algorithms, curves, aes_ok, hmac_ok, slots)

    def _capability_list(self, cap: Any, first: int,
                         extract: Callable[[Any], list[int]]) -> list[int]:
        """Every value of one capability (following ``moreData``). Raises: TpmStartupError."""
        out: list[int] = []
        prop, more = first, True
        while more:
            more, data = self._call("reading TPM capabilities", self._esapi.get_capability,
                                    cap, prop, 256, phase=Phase.STARTUP)
            values = extract(data.data)
            if not values:
                break
            out += values
            prop = values[-1] + 1
        return out

    def _test_parms(self, parms: Any) -> bool:
        """True if TPM2_TestParms accepts ``parms``. Raises: TpmStartupError (other failures)."""
        try:
            self._call("TPM2_TestParms", self._esapi.test_parms, parms, phase=Phase.STARTUP)
        except TpmStartupError as err:
            if err.kind in (Kind.UNSUPPORTED, Kind.OTHER):
                return False
            raise
        return True

    def _flush_stale(self, phase: Phase) -> int:
        """Flush transient objects left in the TPM by a killed client; return how many.

        Without a resource manager they stay loaded and fill the few slots. (Behind a resource
        manager, such as /dev/tpmrm0, we see only our own, so there is nothing to flush.)
        Raises: TpmError / TpmStartupError.
        """
        handles = self._transient_handles(phase)
        for handle in handles:
            tr = self._call("flushing a stale object", self._esapi.tr_from_tpmpublic, handle,
                            phase=phase)
            self._call("flushing a stale object", self._esapi.flush_context, tr, phase=phase)
        if handles:
            log.warning("flushed %d transient object(s) left in the TPM by an earlier client: %s",
                        len(handles), ", ".join(f"0x{h:08x}" for h in handles))
        return len(handles)

    def _transient_handles(self, phase: Phase) -> list[int]:
        """Loaded transient object handles, copied to ints while the capability result is
        alive (its handle list points into it). Raises: TpmError / TpmStartupError."""
        _more, data = self._call("listing transient handles", self._esapi.get_capability,
                                 TPM2_CAP.HANDLES, _TRANSIENT_FIRST, 256, phase=phase)
        handles = [int(h) for h in data.data.handles]
        return [h for h in handles if h >> 24 == _TRANSIENT_FIRST >> 24]

    def _create_primary(self, phase: Phase) -> Any:
        """TPM2_CreatePrimary of the storage key (deterministic from the owner seed).

        Raises: TpmStartupError naming tpm.owner_auth if refused; TpmError while serving.
        """
        handle, _public, _data, _digest, _ticket = self._call(
            "creating the storage primary key", self._esapi.create_primary, None,
            primary_template(), ESYS_TR.OWNER, phase=phase)
        return handle

    # -- objects -------------------------------------------------------------------------------

    def hot_key(self) -> bytes | None:
        """The most recently used loaded ticket key (the worker schedules its jobs first)."""
        return next(reversed(self._loaded), None)

    def _check_parent(self) -> None:
        """The configured persistent parent exists and is a storage key (restricted decrypt).

        Raises: StartupError naming tpm.parent.
        """
        where = f"tpm.parent: 0x{self._parent:08x}"
        try:
            handle = self._call("opening the persistent parent", self._esapi.tr_from_tpmpublic,
                                self._parent, phase=Phase.STARTUP)
            public, _name, _qualified = self._call("reading the persistent parent",
                                                   self._esapi.read_public, handle,
                                                   phase=Phase.STARTUP)
        except StartupError as err:
            raise StartupError(f"{where}: no usable persistent object ({err})") from err
        attrs = int(public.publicArea.objectAttributes)
        needed = int(TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
        if attrs & needed != needed:
            raise StartupError(f"{where}: not a storage key (needs restricted and decrypt)")
        self._release_primary(handle)

    def _release_primary(self, handle: Any) -> None:
        """Flush our transient primary; only forget the ESYS handle of a persistent parent."""
        if self._parent is None:
            self._flush_quietly(handle)
            return
        try:
            self._call("forgetting the persistent parent", self._esapi.tr_close, handle)
        except TpmError as err:
            log.debug("forgetting the persistent parent: %s", err)

    def _primary(self) -> Any:
        """The parent of the ticket keys: the persistent parent if configured, else the storage
        primary, loaded (from its saved context, or recreated). Release with _release_primary.

        Raises: TpmError.
        """
        if self._parent is not None:
            return self._call("opening the persistent parent", self._esapi.tr_from_tpmpublic,
                              self._parent)
        if self._primary_ctx is not None:
            try:
                return self._call("loading the storage primary", self._esapi.context_load,
                                  self._primary_ctx, saved_context=True)
            except TpmError as err:
                if err.kind is not Kind.STALE:
                    raise
                log.info("the storage primary's saved context was refused; recreating it")
                self._primary_ctx = None
        handle = self._create_primary(Phase.OPERATION)
        try:
            self._primary_ctx = self._call("saving the storage primary's context",
                                           self._esapi.context_save, handle)
        except BaseException:
            self._flush_quietly(handle)
            raise
        return handle

    def _blobs(self, key_id: bytes) -> _Blobs:
        """The parsed blobs of a key (cached). Raises: KeyNotFound; DeviceUnavailable."""
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
        self._parsed[key_id] = parsed
        if len(self._parsed) > _PARSED_BLOBS_MAX:
            self._parsed.popitem(last=False)
        return parsed

    def _unmarshal(self, cls: Any, data: bytes, key_id: bytes) -> Any:
        """Parse one blob file. Raises: TpmError (damaged file)."""
        value, used = self._call(f"parsing the blobs of key {key_id.hex()}", cls.unmarshal, data)
        if used != len(data):
            raise TpmError(f"tpm: key blob of {key_id.hex()} has {len(data) - used} trailing "
                           "octets (damaged file)", Kind.OTHER, 0)
        return value

    def _pair(self, key_id: bytes) -> _Pair:
        """The key's two objects, loaded (LRU hit, saved contexts or blobs).

        Raises: KeyNotFound; TpmError; DeviceUnavailable (key dir).
        """
        pair = self._loaded.get(key_id)
        if pair is not None:
            self._loaded.move_to_end(key_id)
            return pair
        saved = self._saved.get(key_id)
        if saved is not None:
            self._make_room(2)
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

    def _load_saved(self, saved: tuple[Any, Any]) -> _Pair:
        """ContextLoad both objects. Raises: TpmError (STALE if the contexts are refused)."""
        aes = self._call("loading a saved key context", self._esapi.context_load, saved[0],
                         saved_context=True)
        try:
            mac = self._call("loading a saved key context", self._esapi.context_load, saved[1],
                             saved_context=True)
        except BaseException:
            self._flush_quietly(aes)
            raise
        self.counters["context_loads"] += 1
        return _Pair(aes, mac)

    def _load_blobs(self, key_id: bytes) -> _Pair:
        """Load both objects from their blobs under the primary, then save their contexts.

        Raises: KeyNotFound; TpmError.
        """
        blobs = self._blobs(key_id)
        self._make_room(3)
        what = f"loading key {key_id.hex()} from its blobs"
        primary = self._primary()
        try:
            aes = self._call(what, self._esapi.load, primary, blobs.aes_private,
                             blobs.aes_public)
            try:
                mac = self._call(what, self._esapi.load, primary, blobs.hmac_private,
                                 blobs.hmac_public)
            except BaseException:
                self._flush_quietly(aes)
                raise
        finally:
            self._release_primary(primary)
        pair = _Pair(aes, mac)
        self.counters["blob_loads"] += 1
        try:
            saved = (self._call("saving a key context", self._esapi.context_save, aes),
                     self._call("saving a key context", self._esapi.context_save, mac))
        except TpmError as err:
            log.debug("key %s: contexts not saved (%s)", key_id.hex(), err)
            return pair
        self._saved[key_id] = saved
        if len(self._saved) > _SAVED_CONTEXTS_MAX:
            self._saved.popitem(last=False)
        return pair

    def _make_room(self, slots: int) -> None:
        """Evict least recently used keys until ``slots`` transient slots are free."""
        while self._loaded and 2 * len(self._loaded) + slots > self._slots:
            _, pair = self._loaded.popitem(last=False)
            self._flush_pair(pair)
            self.counters["evictions"] += 1

    def _flush_pair(self, pair: _Pair) -> None:
        self._flush_quietly(pair.aes)
        self._flush_quietly(pair.hmac)

    def _flush_quietly(self, handle: Any) -> None:
        """Flush an object; if the TPM no longer has it, just forget the ESYS_TR. Never raises."""
        try:
            self._call("flushing an object", self._esapi.flush_context, handle)
        except TpmError:
            try:
                self._call("forgetting an object", self._esapi.tr_close, handle)
            except TpmError as err:
                log.debug("forgetting a TPM object: %s", err)

    def _drop_loaded(self, flush: bool) -> None:
        """Forget every loaded object (flushing it if ``flush``)."""
        while self._loaded:
            _, pair = self._loaded.popitem(last=False)
            if flush:
                self._flush_pair(pair)

    def _recovering(self, op: Callable[[], T]) -> T:
        """Run ``op``; after a stale handle, TPM restart or full object memory, recover and run
        it again (at most twice). Raises: what ``op`` raises."""
        if self._needs_reconnect:
            self._reconnect()
        attempt = 0
        while True:
            try:
                return op()
            except TpmError as err:
                if attempt >= _RECOVERIES:
                    raise
                attempt += 1
                if err.kind in (Kind.STALE, Kind.INITIALIZE):
                    self._resync(err)
                elif err.kind is Kind.MEMORY:
                    log.warning("TPM object memory full; flushing our %d loaded key(s)",
                                len(self._loaded))
                    self._drop_loaded(flush=True)
                else:
                    raise

    def _resync(self, err: TpmError) -> None:
        """The TPM lost our objects (restart/reset): start over from the blobs."""
        self.counters["resyncs"] += 1
        log.warning("%s; reloading TPM objects from the key blobs", err.message)
        if err.kind is Kind.INITIALIZE:
            try:
                self._call("TPM2_Startup", self._esapi.startup, TPM2_SU.CLEAR)
            except TpmError as again:
                if again.kind is not Kind.INITIALIZE:  # already started meanwhile: fine
                    raise
        self._drop_loaded(flush=True)
        self._saved.clear()
        self._primary_ctx = None

    # -- key management ------------------------------------------------------------------------

    def create_key(self, key_id: bytes) -> None:
        """Create the key's AES and HMAC objects under the primary and store their blobs.

        Raises: FailedPrecondition (id taken); TpmError; DeviceUnavailable (key dir).
        """
        if self._store.exists(key_id):
            raise FailedPrecondition(f"key {key_id.hex()} already exists in the TPM key dir")

        def op() -> dict[str, bytes]:
            self._make_room(2)  # the primary, and a scratch slot TPM2_Create may need
            primary = self._primary()
            try:
                what = f"creating key {key_id.hex()}"
                aes_priv, aes_pub, *_ = self._call(what, self._esapi.create, primary, None,
                                                   aes_template())
                mac_priv, mac_pub, *_ = self._call(what, self._esapi.create, primary, None,
                                                   hmac_template())
            finally:
                self._release_primary(primary)
            return {"aes.pub": aes_pub.marshal(), "aes.priv": aes_priv.marshal(),
                    "hmac.pub": mac_pub.marshal(), "hmac.priv": mac_priv.marshal()}

        self._store.write(key_id, self._recovering(op))

    def destroy_key(self, key_id: bytes) -> None:
        """Flush the key's objects, drop its saved contexts and delete its blobs.

        Raises: KeyNotFound; DeviceUnavailable (key dir).
        """
        pair = self._loaded.pop(key_id, None)
        if pair is not None and self._esapi is not None:
            self._flush_pair(pair)
        self._saved.pop(key_id, None)
        self._parsed.pop(key_id, None)
        if len(key_id) != KEY_ID_LEN or not self._store.delete(key_id):
            raise KeyNotFound(key_id)

    def list_keys(self) -> set[bytes]:
        """Ids of the keys whose blobs are present. Raises: DeviceUnavailable."""
        return self._store.list()

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """Both objects' TPMA_OBJECT bits as the TPM reports them (TPM2_ReadPublic).

        Raises: KeyNotFound; TpmError.
        """
        def op() -> dict[str, bool]:
            pair = self._pair(key_id)
            out: dict[str, bool] = {}
            for prefix, handle in (("aes", pair.aes), ("hmac", pair.hmac)):
                public, _name, _qualified = self._call("TPM2_ReadPublic",
                                                       self._esapi.read_public, handle)
                bits = int(public.publicArea.objectAttributes)
                out.update({f"{prefix}.{name}": bool(bits & flag)
                            for name, flag in ATTRIBUTE_FLAGS.items()})
            return out

        return self._recovering(op)

    # -- seal / unseal -------------------------------------------------------------------------

    def seal(self, key_id: bytes, aad: bytes, iv: bytes, plaintext: bytes) -> bytes:
        """iv | AES-256-CFB(plaintext) | HMAC-SHA256(aad | iv | ciphertext), both in the TPM.

        Raises: KeyNotFound; TpmError.
        """
        def op() -> bytes:
            pair = self._pair(key_id)
            if plaintext:
                out, _iv_out = self._call("TPM2_EncryptDecrypt2 (encrypt)",
                                          self._esapi.encrypt_decrypt_2, pair.aes, False,
                                          TPM2_ALG.CFB, iv, plaintext)
                ciphertext = bytes(out)
            else:
                ciphertext = b""
            mac = self._call("TPM2_HMAC", self._esapi.hmac, pair.hmac, aad + iv + ciphertext,
                             TPM2_ALG.SHA256)
            return iv + ciphertext + bytes(mac)

        return self._recovering(op)

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Check the HMAC in the TPM (constant-time compare), then decrypt in the TPM.

        Raises: UnsealFailed (MAC mismatch); KeyNotFound; TpmError.
        """
        if len(sealed) < IV_LEN + MAC_LEN:
            raise UnsealFailed()
        iv, ciphertext, tag = sealed[:IV_LEN], sealed[IV_LEN:-MAC_LEN], sealed[-MAC_LEN:]

        def op() -> bytes:
            pair = self._pair(key_id)
            mac = self._call("TPM2_HMAC", self._esapi.hmac, pair.hmac, aad + iv + ciphertext,
                             TPM2_ALG.SHA256)
            if not hmac_mod.compare_digest(bytes(mac), tag):
                raise UnsealFailed()
            if not ciphertext:
                return b""
            out, _iv_out = self._call("TPM2_EncryptDecrypt2 (decrypt)",
                                      self._esapi.encrypt_decrypt_2, pair.aes, True,
                                      TPM2_ALG.CFB, iv, ciphertext)
            return bytes(out)

        return self._recovering(op)

    def grouped(self, key_ids: Sequence[bytes]) -> list[int]:
        """Indices of ``key_ids`` ordered to load each key once: the loaded key first, then by
        key, in arrival order within a key."""
        hot = self.hot_key()
        return sorted(range(len(key_ids)), key=lambda i: (key_ids[i] != hot, key_ids[i]))


def _ascii(value: int, strip: bool = True) -> str:
    """A TPM_PT value holding four ASCII characters (NULs as spaces), trimmed if ``strip``."""
    text = value.to_bytes(4, "big").replace(b"\0", b" ").decode("ascii", "replace")
    return text.strip() if strip else text


def _firmware(first: int, second: int) -> str:
    """TPM_PT_FIRMWARE_VERSION_1/2 as major.minor.build.patch plus the raw words."""
    return (f"{first >> 16}.{first & 0xFFFF}.{second >> 16}.{second & 0xFFFF} "
            f"(0x{first:08x}:{second:08x})")

