"""PKCS#11 key backend: ticket keys are AES-256 token objects; seal and unseal run in the token.

This is the only module of the authority that imports python-pkcs11. It also reaches the same shared
library through ctypes for the few calls python-pkcs11 gets wrong or lacks (measured on SoftHSM2,
see docs/devices.md):

* python-pkcs11 calls ``C_Initialize(NULL)``, so SoftHSM2 switches its locking off and crashes
  when threads share the module. Right after loading we ``C_Finalize`` and ``C_Initialize`` again
  with ``CKF_OS_LOCKING_OK``.
* ``C_GetSessionInfo`` (the liveness probe and the "is this session logged in" check),
  ``C_Login``/``C_Logout`` on a raw handle, and ``C_InitToken`` (provisioning).

Every python-pkcs11 exception becomes one of ours in :func:`_translate`, and nowhere else.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, cast

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11x
from pkcs11.mechanisms import GCMParams

from authority.backends.base import BackendInfo
from authority.config import Pkcs11Settings, Secret
from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    KeyNotFound,
    StartupError,
    UnsealFailed,
)

__all__ = ["KEY_LABEL_PREFIX", "Pkcs11Backend", "initialize_token_if_missing"]

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_LABEL_PREFIX: Final = "ita-"
KEY_ID_LEN: Final = 8
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
_TOKEN_LABEL_MAX: Final = 32

# --------------------------------------------------------------------------------------------
# ctypes view of the same module (only what python-pkcs11 lacks)
# --------------------------------------------------------------------------------------------

_CKF_OS_LOCKING_OK: Final = 0x2
_CKU_USER: Final = 1
_CKS_RO_USER_FUNCTIONS: Final = 1
_CKS_RW_USER_FUNCTIONS: Final = 3
_CKR_OK: Final = 0x0
_CKR_CRYPTOKI_NOT_INITIALIZED: Final = 0x190

_RV = ctypes.c_ulong
_ULONG = ctypes.c_ulong

# Return codes of the ctypes calls, turned into python-pkcs11's exception classes so that
# _translate stays the one place where device errors are interpreted.
_RV_EXCEPTIONS: Final[dict[int, type[p11x.PKCS11Error]]] = {
    0x05: p11x.GeneralError,
    0x06: p11x.FunctionFailed,
    0x07: p11x.ArgumentsBad,
    0x30: p11x.DeviceError,
    0x31: p11x.DeviceMemory,
    0x32: p11x.DeviceRemoved,
    0x54: p11x.FunctionNotSupported,
    0xA0: p11x.PinIncorrect,
    0xA1: p11x.PinInvalid,
    0xA2: p11x.PinLenRange,
    0xA3: p11x.PinExpired,
    0xA4: p11x.PinLocked,
    0xB0: p11x.SessionClosed,
    0xB1: p11x.SessionCount,
    0xB3: p11x.SessionHandleInvalid,
    0xB5: p11x.SessionReadOnly,
    0xB6: p11x.SessionExists,
    0xE0: p11x.TokenNotPresent,
    0xE1: p11x.TokenNotRecognised,
    0xE2: p11x.TokenWriteProtected,
    0x100: p11x.UserAlreadyLoggedIn,
    0x101: p11x.UserNotLoggedIn,
    0x102: p11x.UserPinNotInitialized,
    0x104: p11x.AnotherUserAlreadyLoggedIn,
}


def _check_rv(rv: int) -> None:
    """Raise the python-pkcs11 exception for a raw CK_RV (PKCS11Error for unlisted codes)."""
    if rv == _CKR_OK:
        return
    exc_type = _RV_EXCEPTIONS.get(rv)
    if exc_type is None:
        raise p11x.PKCS11Error(f"CKR 0x{rv:x}")
    raise exc_type()


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", _ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class _CkSessionInfo(ctypes.Structure):
    _fields_ = [
        ("slotID", _ULONG),
        ("state", _ULONG),
        ("flags", _ULONG),
        ("ulDeviceError", _ULONG),
    ]


_F_INITIALIZE = ctypes.CFUNCTYPE(_RV, ctypes.POINTER(_CkInitializeArgs))
_F_FINALIZE = ctypes.CFUNCTYPE(_RV, ctypes.c_void_p)
_F_INIT_TOKEN = ctypes.CFUNCTYPE(_RV, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p)
_F_CLOSE_SESSION = ctypes.CFUNCTYPE(_RV, _ULONG)
_F_GET_SESSION_INFO = ctypes.CFUNCTYPE(_RV, _ULONG, ctypes.POINTER(_CkSessionInfo))
_F_LOGIN = ctypes.CFUNCTYPE(_RV, _ULONG, _ULONG, ctypes.c_char_p, _ULONG)
_F_LOGOUT = ctypes.CFUNCTYPE(_RV, _ULONG)


class _CkFunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST (PKCS#11 v2.40 order), up to C_Logout."""

    _fields_ = [
        ("version", ctypes.c_ubyte * 2),
        ("C_Initialize", _F_INITIALIZE),
        ("C_Finalize", _F_FINALIZE),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", _F_INIT_TOKEN),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", _F_CLOSE_SESSION),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", _F_GET_SESSION_INFO),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _F_LOGIN),
        ("C_Logout", _F_LOGOUT),
    ]


class _Cryptoki:
    """Raw calls into the module python-pkcs11 has loaded (the same dlopen handle)."""

    def __init__(self, path: str) -> None:
        """Load ``path`` and fetch its function list.

        Raises: OSError if the library cannot be loaded; a PKCS11Error if C_GetFunctionList fails.
        """
        self._dll = ctypes.CDLL(path)
        get_list = self._dll.C_GetFunctionList
        get_list.restype = _RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionList))]
        ptr = ctypes.POINTER(_CkFunctionList)()
        _check_rv(get_list(ctypes.byref(ptr)))
        self._f: _CkFunctionList = ptr.contents

    def reinitialize_with_os_locking(self) -> None:
        """C_Finalize (if initialised), then C_Initialize with CKF_OS_LOCKING_OK.

        Raises: PKCS11Error subclasses from C_Initialize.
        """
        rv = self._f.C_Finalize(None)
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_NOT_INITIALIZED):
            _check_rv(rv)
        args = _CkInitializeArgs(flags=_CKF_OS_LOCKING_OK)
        _check_rv(self._f.C_Initialize(ctypes.byref(args)))

    def finalize_quietly(self) -> None:
        """C_Finalize, ignoring every error (used when switching modules)."""
        self._f.C_Finalize(None)

    def session_state(self, handle: int) -> int:
        """Return CK_SESSION_INFO.state of a session. Raises: PKCS11Error subclasses."""
        info = _CkSessionInfo()
        _check_rv(self._f.C_GetSessionInfo(handle, ctypes.byref(info)))
        return int(info.state)

    def login_user(self, handle: int, pin: Secret) -> None:
        """C_Login as CKU_USER on a session. Raises: PKCS11Error subclasses (PinIncorrect, ...)."""
        data = pin.reveal().encode("utf-8")
        _check_rv(self._f.C_Login(handle, _CKU_USER, data, len(data)))

    def logout(self, handle: int) -> None:
        """C_Logout through one session. Raises: PKCS11Error subclasses."""
        _check_rv(self._f.C_Logout(handle))

    def close_session(self, handle: int) -> None:
        """C_CloseSession on a raw handle. Raises: PKCS11Error subclasses."""
        _check_rv(self._f.C_CloseSession(handle))

    def init_token(self, slot_id: int, so_pin: Secret, label: str) -> None:
        """C_InitToken: (re)initialise the token in ``slot_id`` with an SO PIN and a label.

        Raises: PKCS11Error subclasses.
        """
        data = so_pin.reveal().encode("utf-8")
        padded = label.encode("utf-8").ljust(_TOKEN_LABEL_MAX, b" ")
        _check_rv(self._f.C_InitToken(slot_id, data, len(data), padded))


# --------------------------------------------------------------------------------------------
# The one translation of python-pkcs11 exceptions
# --------------------------------------------------------------------------------------------


class _Phase(Enum):
    """Where a device error happened; decides what it means to the caller."""

    MODULE = "module"        # loading/initialising the shared library
    TOKEN = "token"  # noqa: S105 - finding the token, opening the first sessions
    LOGIN = "login"          # C_Login at start-up
    PROVISION = "provision"  # initialising a token (embedded SoftHSM)
    OPERATION = "operation"  # any call while serving
    DECRYPT = "decrypt"      # the GCM decrypt of unseal


@dataclass(frozen=True)
class _Ctx:
    """What was being done, for the error message and mapping."""

    phase: _Phase
    what: str
    subject: str = ""                       # module path or token label
    key_id: bytes | None = None
    probe: Callable[[], bool] | None = None  # liveness check of the session, DECRYPT only


_KEY_GONE: Final = (p11x.KeyHandleInvalid, p11x.ObjectHandleInvalid, p11x.NoSuchKey)
_AMBIGUOUS_DECRYPT: Final = (
    p11x.GeneralError,
    p11x.EncryptedDataInvalid,
    p11x.EncryptedDataLenRange,
)
_PIN_PROBLEMS: Final[dict[type[p11x.PKCS11Error], str]] = {
    p11x.PinIncorrect: "PIN incorrect",
    p11x.PinInvalid: "PIN incorrect",
    p11x.PinLenRange: "PIN incorrect",
    p11x.PinLocked: "PIN locked",
    p11x.PinExpired: "PIN expired",
    p11x.UserPinNotInitialized: "the token has no user PIN set",
}


def _name(exc: BaseException) -> str:
    """Short description of a device exception (its class, and its text if it has one)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _translate(exc: p11x.PKCS11Error, ctx: _Ctx) -> Exception:
    """Return the authority error for a python-pkcs11 exception raised during ``ctx``.

    The only place device errors are interpreted. Start-up phases give StartupError naming the
    setting; serving gives KeyNotFound, UnsealFailed, FailedPrecondition or DeviceUnavailable.
    For an ambiguous decrypt failure (a bad GCM tag is CKR_GENERAL_ERROR in SoftHSM2, as a
    device fault could be) the session is probed: alive means the blob failed authentication.
    """
    if ctx.phase is _Phase.MODULE:
        return StartupError(f"pkcs11.module: cannot use {ctx.subject}: {_name(exc)}")
    if ctx.phase is _Phase.LOGIN and type(exc) in _PIN_PROBLEMS:
        problem = _PIN_PROBLEMS[type(exc)]
        return StartupError(f"pkcs11.pin: login to token '{ctx.subject}' refused: {problem}")
    if ctx.phase in (_Phase.TOKEN, _Phase.LOGIN, _Phase.PROVISION):
        return StartupError(
            f"pkcs11.token_label: {ctx.what} on token '{ctx.subject}' failed: {_name(exc)}"
        )
    if isinstance(exc, _KEY_GONE) and ctx.key_id is not None:
        return KeyNotFound(ctx.key_id)
    if ctx.phase is _Phase.DECRYPT and isinstance(exc, _AMBIGUOUS_DECRYPT):
        if ctx.probe is not None and ctx.probe():
            return UnsealFailed()
        return DeviceUnavailable(f"pkcs11 {ctx.what}: device failed ({_name(exc)})")
    if isinstance(exc, p11x.MultipleObjectsReturned):
        return FailedPrecondition(f"pkcs11 {ctx.what}: several objects match ({_name(exc)})")
    return DeviceUnavailable(f"pkcs11 {ctx.what} failed: {_name(exc)}")


@contextmanager
def _device_errors(ctx: _Ctx) -> Iterator[None]:
    """Run a block of device calls, translating python-pkcs11 exceptions via :func:`_translate`.

    Raises: whatever _translate returns for a PKCS11Error raised inside the block.
    """
    try:
        yield
    except p11x.PKCS11Error as exc:
        raise _translate(exc, ctx) from exc


# --------------------------------------------------------------------------------------------
# Process-wide module state
# --------------------------------------------------------------------------------------------


@dataclass
class _Module:
    """The loaded module: python-pkcs11's handle and our ctypes view of the same library."""

    path: str
    lib: Any  # pkcs11._pkcs11.lib (a Cython class)
    ck: _Cryptoki


class _ModuleRegistry:
    """One PKCS#11 module per process, the SOFTHSM2_CONF it was initialised with, open users.

    SoftHSM2 reads SOFTHSM2_CONF at C_Initialize, so one token directory is in force at a time;
    another can be switched to only while nobody uses the module. The first user after an idle
    spell re-initialises the module (a few ms), which also recovers one finalised behind our back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: _Module | None = None
        self._conf: str | None = None
        self._users = 0
        self._logins: dict[int, int] = {}

    def acquire(self, module: Path, conf: Path | None) -> _Module:
        """Load/initialise ``module`` with ``conf`` in force and count one more user.

        The module is identified by its real path (Debian's /usr/lib/softhsm/libsofthsm2.so is a
        symlink, and dlopen gives one handle per file).
        Raises: StartupError naming pkcs11.module (missing, unloadable, another module busy) or
        pkcs11.softhsm2_conf (another conf in force for a user still open).
        """
        if not module.is_file():
            raise StartupError(f"pkcs11.module: {module} does not exist or is not a file")
        path = os.path.realpath(module)
        want = str(conf.resolve()) if conf is not None else None
        with self._lock:
            current = self._module
            if self._users:
                current = self._check_compatible(current, path, want)
            elif current is None or current.path != path:
                self._unload()
                current = self._module = self._load(path, want)
            else:
                self._reinitialize(current, want)
            self._users += 1
            return current

    def release(self) -> None:
        """Count one user fewer (the module stays initialised)."""
        with self._lock:
            self._users = max(0, self._users - 1)

    def note_login(self, slot_id: int) -> None:
        """Record that one more backend relies on the user login of ``slot_id``."""
        with self._lock:
            self._logins[slot_id] = self._logins.get(slot_id, 0) + 1

    def drop_login(self, slot_id: int) -> bool:
        """Record one backend fewer on ``slot_id``; True when it was the last (log out now)."""
        with self._lock:
            left = self._logins.get(slot_id, 0) - 1
            if left > 0:
                self._logins[slot_id] = left
                return False
            self._logins.pop(slot_id, None)
            return True

    def _describe(self) -> str:
        module = self._module.path if self._module else "no module"
        return f"{module} (SOFTHSM2_CONF={self._conf})"

    def _unload(self) -> None:
        """Finalize the current module (no user left); the next acquire loads afresh."""
        if self._module is not None:
            self._module.ck.finalize_quietly()
        self._module = None
        self._conf = None
        self._logins.clear()

    def _load(self, path: str, want: str | None) -> _Module:
        """Load ``path`` and initialise it with OS locking. Raises: StartupError."""
        if want is not None:
            os.environ["SOFTHSM2_CONF"] = want
        ctx = _Ctx(_Phase.MODULE, "load", subject=path)
        try:
            with _device_errors(ctx):
                lib = pkcs11.lib(path)
                ck = _Cryptoki(path)
                ck.reinitialize_with_os_locking()
        except OSError as exc:
            raise StartupError(f"pkcs11.module: cannot load {path}: {exc}") from exc
        self._conf = os.environ.get("SOFTHSM2_CONF")
        log.info("pkcs11 module %s initialised (SOFTHSM2_CONF=%s)", path, self._conf)
        return _Module(path=path, lib=lib, ck=ck)

    def _check_compatible(self, current: _Module | None, path: str, want: str | None) -> _Module:
        """With users open, only the same module and conf can be shared; return the module.

        Raises: StartupError.
        """
        if current is None or current.path != path:
            raise StartupError(
                f"pkcs11.module: {path} requested but {self._describe()} is still in use in "
                "this process"
            )
        if want is not None and want != self._conf:
            raise StartupError(
                f"pkcs11.softhsm2_conf: {want} requested but {self._conf} is in force for a "
                "backend still open in this process; close it first"
            )
        return current

    def _reinitialize(self, module: _Module, want: str | None) -> None:
        """Nobody uses the module: finalize and initialise it again (with ``want`` exported).

        This also recovers a module finalised behind our back. Raises: StartupError.
        """
        if want is not None:
            os.environ["SOFTHSM2_CONF"] = want
        self._logins.clear()
        try:
            with _device_errors(_Ctx(_Phase.MODULE, "re-initialise", subject=module.path)):
                module.ck.reinitialize_with_os_locking()
        except BaseException:
            self._unload()
            raise
        self._conf = os.environ.get("SOFTHSM2_CONF")
        log.debug("pkcs11 module %s re-initialised (SOFTHSM2_CONF=%s)", module.path, self._conf)


_REGISTRY: Final = _ModuleRegistry()


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def _tokens(module: _Module) -> list[Any]:
    """Every initialised token present. Raises: PKCS11Error subclasses."""
    found = []
    for slot in module.lib.get_slots(token_present=True):
        token = slot.get_token()
        if token.flags & TokenFlag.TOKEN_INITIALIZED:
            found.append(token)
    return found


def _find_token(module: _Module, label: str) -> Any:
    """The one token labelled ``label``. Raises: StartupError naming pkcs11.token_label."""
    with _device_errors(_Ctx(_Phase.TOKEN, "listing tokens", subject=label)):
        tokens = _tokens(module)
    matches = [t for t in tokens if t.label == label]
    if len(matches) == 1:
        return matches[0]
    present = ", ".join(repr(t.label) for t in tokens) or "none"
    if not matches:
        raise StartupError(
            f"pkcs11.token_label: no token labelled {label!r} in {module.path}; "
            f"tokens present: {present}"
        )
    raise StartupError(f"pkcs11.token_label: {len(matches)} tokens labelled {label!r}")


def _check_mechanisms(token: Any, label: str) -> None:
    """Refuse a token without AES key generation or AES-GCM. Raises: StartupError."""
    with _device_errors(_Ctx(_Phase.TOKEN, "listing mechanisms", subject=label)):
        mechanisms = set(token.slot.get_mechanisms())
    missing = {Mechanism.AES_KEY_GEN, Mechanism.AES_GCM} - mechanisms
    if missing:
        names = ", ".join(sorted(m.name for m in missing))
        raise StartupError(f"pkcs11.token_label: token {label!r} lacks {names}")


def initialize_token_if_missing(
    module: Path, softhsm2_conf: Path | None, label: str, so_pin: Secret, user_pin: Secret
) -> bool:
    """Initialise a free slot's token as ``label`` with these PINs unless such a token exists.

    For the embedded SoftHSM2 token (authority.backends.softhsm); PINs travel only in memory.
    Also sets the user PIN of an existing token whose user PIN was never set. Returns True if
    it initialised something.
    Raises: StartupError (module unusable, no free slot, label too long, device refusal).
    """
    if not label or len(label.encode("utf-8")) > _TOKEN_LABEL_MAX:
        raise StartupError("pkcs11.token_label: must be 1 to 32 bytes of UTF-8")
    mod = _REGISTRY.acquire(module, softhsm2_conf)
    try:
        with _device_errors(_Ctx(_Phase.PROVISION, "initialise", subject=label)):
            existing = [t for t in _tokens(mod) if t.label == label]
            if existing and existing[0].flags & TokenFlag.USER_PIN_INITIALIZED:
                return False
            if not existing:
                mod.ck.init_token(_free_slot_id(mod), so_pin, label)
            token = next((t for t in _tokens(mod) if t.label == label), None)
            if token is None:
                raise StartupError(f"pkcs11.token_label: no token {label!r} after C_InitToken")
            so_session = token.open(rw=True, so_pin=so_pin.reveal())
            try:
                so_session.init_pin(user_pin.reveal())
            finally:
                so_session.close()
        log.info("initialised token %r", label)
        return True
    finally:
        _REGISTRY.release()


def _free_slot_id(module: _Module) -> int:
    """Slot id of a present but uninitialised token. Raises: StartupError, PKCS11Error."""
    for slot in module.lib.get_slots(token_present=True):
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
            return int(slot.slot_id)
    raise StartupError(f"pkcs11.token_label: {module.path} has no free slot to initialise")


# --------------------------------------------------------------------------------------------
# Session pool
# --------------------------------------------------------------------------------------------


class _AesKey(Protocol):
    """The part of a python-pkcs11 secret key object we use."""

    def encrypt(self, data: bytes, buffer_size: int = ..., **kwargs: Any) -> Any: ...
    def decrypt(self, data: bytes, buffer_size: int = ..., **kwargs: Any) -> Any: ...
    def get_attributes(self, keys: list[Attribute]) -> dict[Attribute, Any]: ...
    def destroy(self) -> None: ...


@dataclass(eq=False)
class _PooledSession:
    """One logged-in session and the key handles found in it (a handle belongs to its session)."""

    session: Any  # pkcs11 Session
    keys: dict[bytes, _AesKey] = field(default_factory=dict)

    @property
    def handle(self) -> int:
        return int(self.session.handle)


@dataclass(eq=False)
class _Waiter:
    """A borrower queued for a session; served in arrival order."""

    event: threading.Event = field(default_factory=threading.Event)
    slot: _PooledSession | None = None
    served: bool = False


class _SessionPool:
    """``size`` sessions lent one borrower at a time, first come first served.

    A returned session goes straight to the longest waiter (python's queue.Queue lets a thread
    that gives back and asks again overtake a waiter: under load some waited out the timeout).
    A slot holding None stands for a session still to be opened (at start, or after one broke).
    """

    def __init__(self, opener: Callable[[], _PooledSession], size: int, timeout: float) -> None:
        self._opener = opener
        self._timeout = timeout
        self._lock = threading.Lock()
        self._idle: deque[_PooledSession | None] = deque([None] * size)
        self._waiters: deque[_Waiter] = deque()
        self._live: list[_PooledSession] = []
        self._closed = False

    def fill(self) -> None:
        """Open every session not yet open (start-up). Raises: what the opener raises."""
        with self._lock:
            taken = list(self._idle)
            self._idle.clear()
        try:
            for i, slot in enumerate(taken):
                if slot is None:
                    taken[i] = self._open()
        finally:
            with self._lock:
                for slot in taken:
                    self._hand(slot)

    def live(self) -> list[_PooledSession]:
        """A snapshot of every open pooled session (lent or not)."""
        with self._lock:
            return list(self._live)

    @contextmanager
    def session(self) -> Iterator[_PooledSession]:
        """Borrow a session for one operation.

        Raises: DeviceUnavailable when none is free within the timeout, the pool is closed, or a
        replacement cannot be opened. A DeviceUnavailable raised by the caller's block drops the
        session; a replacement is opened by the next borrower.
        """
        pooled = self.take()
        broken = False
        try:
            yield pooled
        except DeviceUnavailable:
            broken = True
            raise
        finally:
            self.give_back(pooled, broken)

    def drain(self) -> list[_PooledSession]:
        """Close the pool to borrowers; return the idle sessions (the caller closes them)."""
        with self._lock:
            self._closed = True
            idle = [slot for slot in self._idle if slot is not None]
            self._idle.clear()
            for waiter in self._waiters:
                waiter.served = True
                waiter.event.set()
            self._waiters.clear()
        return idle

    def forget(self, pooled: _PooledSession) -> None:
        """Stop tracking a session (closed by the caller)."""
        with self._lock:
            if pooled in self._live:
                self._live.remove(pooled)

    def take(self) -> _PooledSession:
        """A session of our own: an idle one, or a newly opened one for an empty slot.

        Raises: DeviceUnavailable (closed, timeout, replacement failed).
        """
        slot = self._claim()
        if slot is not None:
            return slot
        try:
            return self._open()
        except BaseException:
            with self._lock:
                self._hand(None)
            raise

    def _claim(self) -> _PooledSession | None:
        """Wait (in turn) for a slot. Raises: DeviceUnavailable (closed, timeout)."""
        with self._lock:
            if self._closed:
                raise DeviceUnavailable("pkcs11 backend is closed")
            if self._idle:
                return self._idle.popleft()
            waiter = _Waiter()
            self._waiters.append(waiter)
        waiter.event.wait(self._timeout)
        with self._lock:
            served = waiter.served
            if not served:
                self._waiters.remove(waiter)
        if not served:
            raise DeviceUnavailable(f"no device session free within {self._timeout:g}s")
        if self._closed:  # drained while we waited
            if waiter.slot is not None:
                self.forget(waiter.slot)
                _close_quietly(waiter.slot)
            raise DeviceUnavailable("pkcs11 backend is closed")
        return waiter.slot

    def _hand(self, slot: _PooledSession | None) -> None:
        """Give a slot to the longest waiter, else make it idle. Call with the lock held."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.slot = slot
            waiter.served = True
            waiter.event.set()
        elif not self._closed:
            self._idle.append(slot)

    def _open(self) -> _PooledSession:
        pooled = self._opener()
        with self._lock:
            self._live.append(pooled)
        return pooled

    def give_back(self, pooled: _PooledSession, broken: bool) -> None:
        """Return a borrowed session; a broken one is closed and its slot left to reopen."""
        slot: _PooledSession | None = pooled
        if broken or self._closed:
            self.forget(pooled)
            _close_quietly(pooled)
            if broken:
                log.warning("pkcs11 session %d dropped after a device error", pooled.handle)
            slot = None
        with self._lock:
            self._hand(slot)


def _close_quietly(pooled: _PooledSession) -> None:
    """Close a session, ignoring device errors (it may already be gone)."""
    with suppress(p11x.PKCS11Error):
        pooled.session.close()


class _ObjectLock:
    """Shared for using or finding keys, exclusive for creating or destroying them.

    SoftHSM2 (file object store) is not safe here: C_GenerateKey of a token object while other
    sessions run C_FindObjects failed with CKR_GENERAL_ERROR, and using a handle while its key was
    being destroyed gave CKR_MECHANISM_INVALID or CKR_KEY_FUNCTION_NOT_PERMITTED. Writers are
    preferred, so a create or destroy waits only for the operations already in flight. Take it
    after borrowing a session (a writer never waits for a session held by a blocked reader).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_shared(self) -> None:
        """Wait until no writer holds or wants the lock, then hold it shared."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        """Release a shared hold."""
        with self._cond:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for the block."""
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock exclusively for the block."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------

_ATTRIBUTES: Final[dict[str, Attribute]] = {
    "sensitive": Attribute.SENSITIVE,
    "extractable": Attribute.EXTRACTABLE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "token": Attribute.TOKEN,
    "private": Attribute.PRIVATE,
    "encrypt": Attribute.ENCRYPT,
    "decrypt": Attribute.DECRYPT,
    "wrap": Attribute.WRAP,
    "unwrap": Attribute.UNWRAP,
    "sign": Attribute.SIGN,
    "derive": Attribute.DERIVE,
    "modifiable": Attribute.MODIFIABLE,
}

_KEY_TEMPLATE: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
    Attribute.COPYABLE: False,
}


def key_label(key_id: bytes) -> str:
    """The CKA_LABEL of the ticket key ``key_id``."""
    return KEY_LABEL_PREFIX + key_id.hex()


def _gcm(nonce: bytes, aad: bytes) -> dict[str, Any]:
    return {"mechanism": Mechanism.AES_GCM, "mechanism_param": GCMParams(nonce, aad, TAG_LEN * 8)}


def _buffer_for(data: bytes) -> int:
    return max(len(data) + 2 * TAG_LEN, 64)


class Pkcs11Backend:
    """Ticket keys in a PKCS#11 token; seal/unseal with CKM_AES_GCM inside it. Thread-safe."""

    name = "pkcs11"
    format_version = 1

    def __init__(self, settings: Pkcs11Settings, module: _Module, token: Any) -> None:
        """Use :meth:`open`. Takes over one registry user of ``module``."""
        self._settings = settings
        self._module = module
        self._token = token
        self._label = settings.token_label
        self._slot_id = int(token.slot.slot_id)
        self._objects = _ObjectLock()
        self._closed = False
        self._logged_in = False
        self._pool = _SessionPool(self._open_session, settings.sessions, settings.session_timeout)

    def __repr__(self) -> str:
        return f"<Pkcs11Backend token={self._label!r} module={str(self._settings.module)!r}>"

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: Pkcs11Settings) -> Pkcs11Backend:
        """Load the module, find the token, log in once and open the session pool.

        Raises: StartupError naming pkcs11.module, pkcs11.softhsm2_conf, pkcs11.token_label or
        pkcs11.pin (never containing the PIN).
        """
        if settings.sessions < 1:
            raise StartupError("pkcs11.sessions: must be at least 1")
        if not settings.session_timeout > 0:
            raise StartupError("pkcs11.session_timeout: must be a positive number of seconds")
        module = _REGISTRY.acquire(settings.module, settings.softhsm2_conf)
        try:
            token = _find_token(module, settings.token_label)
            _check_mechanisms(token, settings.token_label)
            _check_pin_flags(token, settings.token_label)
            backend = cls(settings, module, token)
            backend._start()
        except BaseException:
            _REGISTRY.release()
            raise
        log.info("pkcs11 backend open: %s", backend.describe())
        return backend

    def _start(self) -> None:
        """Open the first session (logging in), then the rest. Raises: StartupError."""
        try:
            with self._pool.session():
                pass  # the first open logs in, with start-up error messages
            self._pool.fill()
        except DeviceUnavailable as exc:
            self._shutdown_sessions()
            raise StartupError(f"pkcs11.token_label: {exc.message}") from exc
        except BaseException:
            self._shutdown_sessions()
            raise

    def close(self) -> None:
        """Close every idle session, log out once (if last on the token), release the module."""
        if self._closed:
            return
        self._closed = True
        self._shutdown_sessions()
        _REGISTRY.release()

    def _shutdown_sessions(self) -> None:
        idle = self._pool.drain()
        if self._logged_in and _REGISTRY.drop_login(self._slot_id) and idle:
            with suppress(p11x.PKCS11Error):
                self._module.ck.logout(idle[0].handle)
        self._logged_in = False
        for pooled in idle:
            self._pool.forget(pooled)
            _close_quietly(pooled)

    def _open_session(self) -> _PooledSession:
        """Open a RW session; log in if the token is not logged in (first one, or all lost).

        Raises: StartupError for a refused login before the backend is up, else
        DeviceUnavailable.
        """
        phase = _Phase.OPERATION if self._logged_in else _Phase.LOGIN
        ctx = _Ctx(phase, "opening a session", subject=self._label)
        with _device_errors(ctx):
            session = self._token.open(rw=True)
            try:
                self._ensure_login(int(session.handle))
            except BaseException:
                with suppress(p11x.PKCS11Error):
                    session.close()
                raise
        if not self._logged_in:
            self._logged_in = True
            _REGISTRY.note_login(self._slot_id)
        return _PooledSession(session)

    def _ensure_login(self, handle: int) -> None:
        """C_Login on ``handle`` unless the token already is. Raises: PKCS11Error subclasses."""
        state = self._module.ck.session_state(handle)
        if state in (_CKS_RO_USER_FUNCTIONS, _CKS_RW_USER_FUNCTIONS):
            return
        with suppress(p11x.UserAlreadyLoggedIn):
            self._module.ck.login_user(handle, self._settings.pin)

    # -- keys --------------------------------------------------------------------------------

    def create_key(self, key_id: bytes) -> None:
        """Generate a non-extractable AES-256 token key labelled ``ita-<hex id>``.

        Raises: InvalidArgument (id not 8 bytes); FailedPrecondition (id taken);
        DeviceUnavailable.
        """
        _check_key_id(key_id)
        ctx = _Ctx(_Phase.OPERATION, "create_key", key_id=key_id)
        with self._pool.session() as pooled, self._objects.exclusive(), _device_errors(ctx):
            if self._search(pooled, key_id, by_label_only=False):
                raise FailedPrecondition(f"key {key_id.hex()} already exists in the token")
            pooled.session.generate_key(
                KeyType.AES,
                256,
                id=key_id,
                label=key_label(key_id),
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template=_KEY_TEMPLATE,
            )
        log.info("created key %s", key_id.hex())

    def destroy_key(self, key_id: bytes) -> None:
        """Destroy the token key(s) with this id and forget their handles in every session.

        Raises: KeyNotFound; DeviceUnavailable.
        """
        ctx = _Ctx(_Phase.OPERATION, "destroy_key", key_id=key_id)
        with self._pool.session() as pooled, self._objects.exclusive(), _device_errors(ctx):
            found = self._search(pooled, key_id, by_label_only=False) if _valid_id(key_id) else []
            if not found:
                raise KeyNotFound(key_id)
            for other in self._pool.live():
                other.keys.pop(key_id, None)
            for key in found:
                key.destroy()
        log.info("destroyed key %s", key_id.hex())

    def list_keys(self) -> set[bytes]:
        """Ids of every secret key labelled ``ita-...``. Raises: DeviceUnavailable."""
        ctx = _Ctx(_Phase.OPERATION, "list_keys")
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY}
        ids: set[bytes] = set()
        with self._pool.session() as pooled, self._objects.shared(), _device_errors(ctx):
            for obj in pooled.session.get_objects(template):
                attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
                if str(attrs.get(Attribute.LABEL, "")).startswith(KEY_LABEL_PREFIX):
                    ids.add(bytes(attrs.get(Attribute.ID, b"")))
        return ids

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """The key's protection attributes as the token reports them (never CKA_VALUE).

        Raises: KeyNotFound; DeviceUnavailable.
        """
        names = list(_ATTRIBUTES)
        wanted = [_ATTRIBUTES[n] for n in names]
        values = self._run(key_id, "key_attributes", lambda key: key.get_attributes(wanted))
        return {n: bool(values.get(_ATTRIBUTES[n], False)) for n in names}

    # -- seal / unseal -----------------------------------------------------------------------

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """AES-256-GCM in the token: nonce (12, random) | ciphertext | tag (16).

        Raises: KeyNotFound; DeviceUnavailable.
        """
        nonce = os.urandom(NONCE_LEN)
        params = _gcm(nonce, aad)
        size = _buffer_for(plaintext)
        body = self._run(
            key_id, "seal", lambda key: key.encrypt(plaintext, buffer_size=size, **params)
        )
        return nonce + bytes(body)

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Verify and decrypt a body made by :meth:`seal`; one decrypt call in the token.

        Raises: UnsealFailed (short body, bad tag, tampering, wrong key); KeyNotFound;
        DeviceUnavailable (the device itself failed).
        """
        if len(sealed) < NONCE_LEN + TAG_LEN:
            raise UnsealFailed()
        params = _gcm(sealed[:NONCE_LEN], aad)
        body = sealed[NONCE_LEN:]
        size = _buffer_for(body)
        plain = self._run(
            key_id,
            "unseal",
            lambda key: key.decrypt(body, buffer_size=size, **params),
            decrypt=True,
        )
        return bytes(plain)

    # -- status ------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        """Module path and description, token label and serial, pool size."""
        lib = self._module.lib
        major, minor = lib.library_version
        library = (
            f"{self._settings.module} ({lib.manufacturer_id} {lib.library_description} "
            f"{major}.{minor})"
        )
        serial = bytes(self._token.serial).decode("ascii", "replace").strip()
        return BackendInfo(
            backend=self.name,
            library=library,
            token=f"{self._label} (serial {serial})",
            sessions=self._settings.sessions,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _run(
        self, key_id: bytes, what: str, op: Callable[[_AesKey], T], decrypt: bool = False
    ) -> T:
        """Borrow a session, hold the object lock shared and run ``op`` on the key there.

        The hot path of seal and unseal: plain try blocks, no generator context managers.
        Raises: KeyNotFound; UnsealFailed (decrypt only); DeviceUnavailable.
        """
        pooled = self._pool.take()
        broken = False
        try:
            self._objects.acquire_shared()
            try:
                return self._with_key(pooled, key_id, what, op, decrypt)
            finally:
                self._objects.release_shared()
        except DeviceUnavailable:
            broken = True
            raise
        finally:
            self._pool.give_back(pooled, broken)

    def _with_key(
        self,
        pooled: _PooledSession,
        key_id: bytes,
        what: str,
        op: Callable[[_AesKey], T],
        decrypt: bool,
    ) -> T:
        """Run ``op`` on the session's handle for ``key_id``; a stale cached handle is looked up
        once more (the key may have been destroyed and re-created).

        Raises: KeyNotFound; UnsealFailed (decrypt only); DeviceUnavailable.
        """
        cached = key_id in pooled.keys
        key = self._key(pooled, key_id, what)
        try:
            return op(key)
        except p11x.PKCS11Error as exc:
            error = _translate(exc, self._op_ctx(pooled, key_id, what, decrypt))
            if not (cached and isinstance(error, KeyNotFound)):
                raise error from exc
        pooled.keys.pop(key_id, None)
        key = self._key(pooled, key_id, what)
        try:
            return op(key)
        except p11x.PKCS11Error as exc:
            raise _translate(exc, self._op_ctx(pooled, key_id, what, decrypt)) from exc

    def _op_ctx(self, pooled: _PooledSession, key_id: bytes, what: str, decrypt: bool) -> _Ctx:
        """The error context of a key operation (built only when something failed)."""
        phase = _Phase.DECRYPT if decrypt else _Phase.OPERATION
        return _Ctx(phase, what, key_id=key_id, probe=lambda: self._alive(pooled))

    def _key(self, pooled: _PooledSession, key_id: bytes, what: str) -> _AesKey:
        """The session's (cached) key object for ``key_id``. Raises: KeyNotFound,
        DeviceUnavailable."""
        key = pooled.keys.get(key_id)
        if key is not None:
            return key
        if not _valid_id(key_id):
            raise KeyNotFound(key_id)
        # No key_id in the context: any search failure is DeviceUnavailable, so the session is
        # dropped. (python-pkcs11 keeps a session's operation lock held when C_FindObjectsInit
        # fails; such a session must never be handed out again.)
        with _device_errors(_Ctx(_Phase.OPERATION, what)):
            found = self._search(pooled, key_id, by_label_only=True)
        if not found:
            raise KeyNotFound(key_id)
        if len(found) > 1:
            raise FailedPrecondition(f"{len(found)} keys in the token have id {key_id.hex()}")
        pooled.keys[key_id] = found[0]
        return found[0]

    @staticmethod
    def _search(pooled: _PooledSession, key_id: bytes, by_label_only: bool) -> list[_AesKey]:
        """Secret keys with our label for ``key_id`` (and, unless ``by_label_only``, any secret
        key with that CKA_ID). Raises: PKCS11Error subclasses."""
        session = pooled.session
        by_label = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.LABEL: key_label(key_id),
            Attribute.ID: key_id,
        }
        found = {int(o.handle): o for o in session.get_objects(by_label)}
        if not by_label_only:
            by_id = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id}
            found.update({int(o.handle): o for o in session.get_objects(by_id)})
        return [cast(_AesKey, o) for o in found.values()]

    def _alive(self, pooled: _PooledSession) -> bool:
        """Cheap liveness probe of a session (C_GetSessionInfo); False on any device error."""
        try:
            self._module.ck.session_state(pooled.handle)
        except p11x.PKCS11Error:
            return False
        return True


def _check_pin_flags(token: Any, label: str) -> None:
    """Refuse a locked or never-set user PIN before trying it. Raises: StartupError."""
    flags = token.flags
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise StartupError(f"pkcs11.pin: login to token '{label}' refused: PIN locked")
    if not flags & TokenFlag.USER_PIN_INITIALIZED:
        raise StartupError(
            f"pkcs11.pin: login to token '{label}' refused: the token has no user PIN set"
        )


def _valid_id(key_id: bytes) -> bool:
    return isinstance(key_id, bytes) and len(key_id) == KEY_ID_LEN


def _check_key_id(key_id: bytes) -> None:
    """Raises: InvalidArgument unless ``key_id`` is 8 bytes."""
    if not _valid_id(key_id):
        raise InvalidArgument("key_id", f"must be {KEY_ID_LEN} bytes")
