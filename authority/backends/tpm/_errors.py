"""The one translation of tpm2-pytss exceptions into the authority's errors: :func:`translate`.

Every ``TSS2_Exception`` raised by a TPM call is turned into one of ours here and nowhere else.
The result carries a :class:`Kind` so the device layer can decide what to do without looking at
response codes itself: resubmit (``BUSY``), reload its objects (``STALE``, ``INITIALIZE``), free
slots (``MEMORY``) or give up. While serving, the result is a :class:`TpmError` (a
DeviceUnavailable); during start-up a :class:`TpmStartupError` naming the setting to look at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Final

from authority.errors import DeviceUnavailable, KeyNotFound, StartupError

__all__ = [
    "Ctx",
    "KeyRefused",
    "Kind",
    "Phase",
    "TpmError",
    "TpmStartupError",
    "kind_of",
    "translate",
]

log = logging.getLogger(__name__)

# Response-code layers (TSS2_RC_LAYER_MASK) and the TPM codes we interpret, from TCG TPM 2.0
# Part 2 (section 6.6) and the TSS response-code specification; the same values as tpm2-pytss'
# TPM2_RC / TSS2_RC constants.
_LAYER_MASK: Final = 0xFF0000
_TPM_LAYER: Final = 0x000000
_RESMGR_TPM_LAYER: Final = 0x0C0000      # a resource manager relaying a TPM code
_TCTI_LAYER: Final = 0x0A0000
_ESAPI_LAYER: Final = 0x070000
_SYS_LAYER: Final = 0x080000
_MU_LAYER: Final = 0x090000              # (un)marshalling: a malformed structure
_FMT1: Final = 0x080

_BASE_NO_CONNECTION: Final = 0x8
_BASE_TRY_AGAIN: Final = 0x9
_BASE_IO_ERROR: Final = 0xA

_RC_INITIALIZE: Final = 0x100
_RC_FAILURE: Final = 0x101
_RC_COMMAND_CODE: Final = 0x143
_RC_ASYMMETRIC: Final = 0x081
_RC_HASH: Final = 0x083
_RC_VALUE: Final = 0x084
_RC_KEY_SIZE: Final = 0x087
_RC_MODE: Final = 0x089
_RC_TYPE: Final = 0x08A
_RC_HANDLE: Final = 0x08B
_RC_AUTH_FAIL: Final = 0x08E
_RC_SCHEME: Final = 0x092
_RC_SIZE: Final = 0x095
_RC_SYMMETRIC: Final = 0x096
_RC_INTEGRITY: Final = 0x09F
_RC_BAD_AUTH: Final = 0x0A2
_RC_CURVE: Final = 0x0A6
_RC_OBJECT_MEMORY: Final = 0x902
_RC_SESSION_MEMORY: Final = 0x903
_RC_MEMORY: Final = 0x904
_RC_SESSION_HANDLES: Final = 0x905
_RC_OBJECT_HANDLES: Final = 0x906
_RC_YIELDED: Final = 0x908
_RC_TESTING: Final = 0x90A
_RC_REFERENCE_H0: Final = 0x910
_RC_REFERENCE_H6: Final = 0x916
_RC_NV_RATE: Final = 0x920
_RC_LOCKOUT: Final = 0x921
_RC_RETRY: Final = 0x922


class Kind(Enum):
    """What a TPM failure means to the caller."""

    BUSY = "busy"                # RETRY, YIELDED, TESTING, NV_RATE, TCTI try-again: resubmit
    LOCKOUT = "lockout"          # dictionary-attack lockout
    MEMORY = "memory"            # no free object/session slot or TPM memory
    STALE = "stale"              # a handle or saved context of ours no longer exists (TPM reset)
    INITIALIZE = "initialize"    # the TPM wants TPM2_Startup (it was restarted)
    UNREACHABLE = "unreachable"  # the TCTI cannot talk to the TPM
    CLIENT = "client"            # the TSS stack (ESAPI/SAPI) failed: reconnect before reuse
    AUTH = "auth"                # authorisation refused
    UNSUPPORTED = "unsupported"  # command, algorithm, mode, size or curve not implemented
    FAILURE = "failure"          # the TPM is in failure mode
    OTHER = "other"


class TpmError(DeviceUnavailable):
    """A TPM failure while serving (gRPC UNAVAILABLE), with its classification."""

    def __init__(self, message: str, kind: Kind, rc: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.rc = rc


class KeyRefused(KeyNotFound):
    """A ticket key whose public area is not the backend's templates': the backend never uses
    it (a KeyNotFound: it holds no usable key with that id). ``problems`` names what differs
    ("aes.fixed_tpm is false", ...)."""

    def __init__(self, key_id: bytes, problems: tuple[str, ...]) -> None:
        super().__init__(key_id)
        self.problems = problems
        self.cause = (f"key {key_id.hex()} refused: not the backend's templates "
                      f"({', '.join(problems)})")
        self.args = (self.cause,)


class TpmStartupError(StartupError):
    """A TPM failure while opening the backend, with its classification."""

    def __init__(self, message: str, kind: Kind, rc: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.rc = rc


class Phase(Enum):
    """Where the call was made; decides the error type and the setting named."""

    CONNECT = "connect"      # loading the TCTI, the first commands
    STARTUP = "startup"      # capability check, flushing, the storage primary
    OPERATION = "operation"  # serving


@dataclass(frozen=True)
class Ctx:
    """What was being done, for the message and the mapping."""

    phase: Phase
    what: str
    tcti: str = ""
    saved_context: bool = False   # TPM2_ContextLoad of a saved context: a refusal means stale


_REASONS: Final[dict[Kind, str]] = {
    Kind.BUSY: "the TPM stayed busy (retry/yielded/testing) after every retry",
    Kind.LOCKOUT: (
        "the TPM is in dictionary-attack lockout; objects without noDA and hierarchy "
        "authorisations are refused until the lockout recovery time passes or the lockout "
        "hierarchy clears it (tpm2_dictionarylockout --clear-lockout)"
    ),
    Kind.MEMORY: (
        "the TPM is out of object or session memory (transient slots held by another client "
        "without a resource manager? flush them with tpm2_flushcontext -t)"
    ),
    Kind.STALE: "a loaded object or saved context is no longer valid (was the TPM restarted?)",
    Kind.INITIALIZE: "the TPM has not been started (TPM2_Startup)",
    Kind.UNREACHABLE: "the TPM cannot be reached through the TCTI",
    Kind.CLIENT: "the TSS client stack failed",
    Kind.AUTH: "authorisation refused",
    Kind.UNSUPPORTED: "not supported by this TPM",
    Kind.FAILURE: "the TPM is in failure mode and needs a reset",
    Kind.OTHER: "TPM error",
}

_UNSUPPORTED: Final = frozenset({
    _RC_COMMAND_CODE, _RC_ASYMMETRIC, _RC_HASH, _RC_KEY_SIZE, _RC_MODE, _RC_TYPE, _RC_SCHEME,
    _RC_SYMMETRIC, _RC_CURVE,
})
_MEMORY: Final = frozenset({
    _RC_OBJECT_MEMORY, _RC_SESSION_MEMORY, _RC_MEMORY, _RC_SESSION_HANDLES, _RC_OBJECT_HANDLES,
})
_BUSY: Final = frozenset({_RC_RETRY, _RC_YIELDED, _RC_TESTING, _RC_NV_RATE})
_REFUSED_CONTEXT: Final = frozenset({_RC_INTEGRITY, _RC_VALUE, _RC_SIZE, _RC_HANDLE})


_INTEGRITY_REASON: Final = (
    "integrity check failed: the key blob was damaged, or made by another TPM or before this "
    "TPM's owner hierarchy was cleared"
)


def _classify(rc: int, saved_context: bool) -> Kind:
    """The kind of a full TSS2 response code (layer included)."""
    layer = rc & _LAYER_MASK
    if layer not in (_TPM_LAYER, _RESMGR_TPM_LAYER):
        base = rc & 0xFFFF
        if base == _BASE_TRY_AGAIN:
            return Kind.BUSY
        if layer == _TCTI_LAYER and base in (_BASE_IO_ERROR, _BASE_NO_CONNECTION):
            return Kind.UNREACHABLE
        if layer in (_ESAPI_LAYER, _SYS_LAYER):
            return Kind.CLIENT
        return Kind.OTHER
    code = rc & 0xFFFF
    if code & _FMT1:
        base = _FMT1 | (code & 0x3F)
        if saved_context and base in _REFUSED_CONTEXT:
            return Kind.STALE
        if base == _RC_HANDLE:
            return Kind.STALE
        if base in (_RC_AUTH_FAIL, _RC_BAD_AUTH):
            return Kind.AUTH
        return Kind.UNSUPPORTED if base in _UNSUPPORTED else Kind.OTHER
    if code in _BUSY:
        return Kind.BUSY
    if code == _RC_LOCKOUT:
        return Kind.LOCKOUT
    if code in _MEMORY:
        return Kind.MEMORY
    if _RC_REFERENCE_H0 <= code <= _RC_REFERENCE_H6:
        return Kind.STALE
    if code == _RC_INITIALIZE:
        return Kind.INITIALIZE
    if code == _RC_FAILURE:
        return Kind.FAILURE
    if code == _RC_COMMAND_CODE:
        return Kind.UNSUPPORTED
    return Kind.OTHER


def translate(exc: Exception, ctx: Ctx) -> TpmError | TpmStartupError:
    """Return the authority error for a tpm2-pytss exception (``TSS2_Exception``) raised in ``ctx``.

    The only place TPM response codes are interpreted. Start-up phases give TpmStartupError
    naming tpm.tcti (or tpm.owner_auth for a refused owner authorisation); serving gives
    TpmError (DeviceUnavailable). Lockout and out-of-memory are logged with their cause.
    """
    rc = int(getattr(exc, "rc", 0) or 0)
    kind = _classify(rc, ctx.saved_context)
    reason = _REASONS[kind]
    if kind is Kind.OTHER and _is_integrity(rc):
        reason = _INTEGRITY_REASON
    elif rc & _LAYER_MASK == _MU_LAYER:
        reason = "malformed TPM structure (a damaged key blob file?)"
    detail = f"{reason} (0x{rc:x}: {exc})"
    if kind in (Kind.LOCKOUT, Kind.MEMORY, Kind.FAILURE):
        log.warning("tpm %s: %s", ctx.what, detail)
    if ctx.phase is Phase.OPERATION:
        return TpmError(f"tpm {ctx.what}: {detail}", kind, rc)
    if kind is Kind.AUTH and ctx.phase is Phase.STARTUP:
        return TpmStartupError(
            f"tpm.owner_auth: the TPM at '{ctx.tcti}' refused the owner hierarchy "
            f"authorisation while {ctx.what} (0x{rc:x}: {exc})", kind, rc)
    if ctx.phase is Phase.CONNECT:
        return TpmStartupError(f"tpm.tcti: cannot use the TPM at '{ctx.tcti}': {ctx.what}: "
                               f"{detail}", kind, rc)
    return TpmStartupError(f"tpm.tcti: {ctx.what} failed on the TPM at '{ctx.tcti}': {detail}",
                           kind, rc)


def _is_integrity(rc: int) -> bool:
    """TPM_RC_INTEGRITY (a format-one code) from the TPM or relayed by a resource manager."""
    code = rc & 0xFFFF
    return (rc & _LAYER_MASK in (_TPM_LAYER, _RESMGR_TPM_LAYER) and bool(code & _FMT1)
            and _FMT1 | (code & 0x3F) == _RC_INTEGRITY)


def kind_of(err: BaseException) -> Kind | None:
    """The Kind of an error made by :func:`translate`; None for any other exception."""
    if isinstance(err, TpmError | TpmStartupError):
        return err.kind
    return None
