"""A ctypes view of the PKCS#11 module python-pkcs11 has loaded (the same dlopen handle).

Only what python-pkcs11 gets wrong or lacks (measured on SoftHSM2, see docs/devices.md):

* python-pkcs11 calls ``C_Initialize(NULL)``, so SoftHSM2 switches its locking off and crashes
  when threads share the module. Right after loading we ``C_Finalize`` and ``C_Initialize`` again
  with ``CKF_OS_LOCKING_OK``.
* ``C_GetSessionInfo`` (the liveness probe and the "is this session logged in" check),
  ``C_Login``/``C_Logout``/``C_CloseSession`` on a raw handle, ``C_InitToken`` (provisioning).
* The AES-GCM hot path (``C_EncryptInit``/``C_Encrypt``, ``C_DecryptInit``/``C_Decrypt``): see
  _gcm.py for why it bypasses python-pkcs11.

A failed call raises the python-pkcs11 exception class of its CK_RV (:func:`rv_error`), so that
_errors.translate stays the one place where device errors are interpreted.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

from pkcs11 import exceptions as p11x

from authority.config import Secret

CKF_OS_LOCKING_OK: Final = 0x2
CKU_USER: Final = 1
CKS_RO_USER_FUNCTIONS: Final = 1
CKS_RW_USER_FUNCTIONS: Final = 3
CKR_OK: Final = 0x0
CKR_CRYPTOKI_NOT_INITIALIZED: Final = 0x190
TOKEN_LABEL_MAX: Final = 32

RV = ctypes.c_ulong
ULONG = ctypes.c_ulong

# CK_RV -> python-pkcs11 exception class, for the codes our calls can return (the same classes
# python-pkcs11 itself raises for them; anything else is a plain PKCS11Error).
_RV_EXCEPTIONS: Final[dict[int, type[p11x.PKCS11Error]]] = {
    0x02: p11x.HostMemory,
    0x05: p11x.GeneralError,
    0x06: p11x.FunctionFailed,
    0x07: p11x.ArgumentsBad,
    0x20: p11x.DataInvalid,
    0x21: p11x.DataLenRange,
    0x30: p11x.DeviceError,
    0x31: p11x.DeviceMemory,
    0x32: p11x.DeviceRemoved,
    0x40: p11x.EncryptedDataInvalid,
    0x41: p11x.EncryptedDataLenRange,
    0x54: p11x.FunctionNotSupported,
    0x60: p11x.KeyHandleInvalid,
    0x62: p11x.KeySizeRange,
    0x63: p11x.KeyTypeInconsistent,
    0x70: p11x.MechanismInvalid,
    0x71: p11x.MechanismParamInvalid,
    0x82: p11x.ObjectHandleInvalid,
    0x90: p11x.OperationActive,
    0x91: p11x.OperationNotInitialized,
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


def rv_error(rv: int) -> p11x.PKCS11Error:
    """The python-pkcs11 exception for a failed CK_RV (PKCS11Error for unlisted codes)."""
    exc_type = _RV_EXCEPTIONS.get(rv)
    return exc_type() if exc_type is not None else p11x.PKCS11Error(f"CKR 0x{rv:x}")


def check_rv(rv: int) -> None:
    """Raise :func:`rv_error` unless ``rv`` is CKR_OK."""
    if rv != CKR_OK:
        raise rv_error(rv)


class CkInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class CkSessionInfo(ctypes.Structure):
    _fields_ = [("slotID", ULONG), ("state", ULONG), ("flags", ULONG), ("ulDeviceError", ULONG)]


class CkMechanism(ctypes.Structure):
    _fields_ = [("mechanism", ULONG), ("pParameter", ctypes.c_void_p), ("ulParameterLen", ULONG)]


class CkGcmParams(ctypes.Structure):
    """CK_GCM_PARAMS of PKCS#11 v2.40 (with ulIvBits), as SoftHSM2 and python-pkcs11 use it.

    The byte fields are c_char_p: assigning a ``bytes`` stores a pointer to its buffer and keeps
    the object alive while it is assigned (no copy).
    """

    _fields_ = [
        ("pIv", ctypes.c_char_p),
        ("ulIvLen", ULONG),
        ("ulIvBits", ULONG),
        ("pAAD", ctypes.c_char_p),
        ("ulAADLen", ULONG),
        ("ulTagBits", ULONG),
    ]


F_INITIALIZE = ctypes.CFUNCTYPE(RV, ctypes.POINTER(CkInitializeArgs))
F_FINALIZE = ctypes.CFUNCTYPE(RV, ctypes.c_void_p)
F_INIT_TOKEN = ctypes.CFUNCTYPE(RV, ULONG, ctypes.c_char_p, ULONG, ctypes.c_char_p)
F_CLOSE_SESSION = ctypes.CFUNCTYPE(RV, ULONG)
F_GET_SESSION_INFO = ctypes.CFUNCTYPE(RV, ULONG, ctypes.POINTER(CkSessionInfo))
F_LOGIN = ctypes.CFUNCTYPE(RV, ULONG, ULONG, ctypes.c_char_p, ULONG)
F_LOGOUT = ctypes.CFUNCTYPE(RV, ULONG)
# C_EncryptInit/C_DecryptInit(session, CK_MECHANISM *, key) and C_Encrypt/C_Decrypt(session,
# in, in_len, out, CK_ULONG *out_len). Pointers are passed as addresses or byref() objects:
# c_void_p converts those fastest. CFUNCTYPE calls release the GIL, PYFUNCTYPE calls do not.
F_CRYPT_INIT = ctypes.CFUNCTYPE(RV, ULONG, ctypes.c_void_p, ULONG)
F_CRYPT = ctypes.CFUNCTYPE(RV, ULONG, ctypes.c_char_p, ULONG, ctypes.c_void_p, ctypes.c_void_p)
# The same prototypes called without releasing the GIL (Cryptoki.crypt_functions).
G_CRYPT_INIT = ctypes.PYFUNCTYPE(RV, ULONG, ctypes.c_void_p, ULONG)
G_CRYPT = ctypes.PYFUNCTYPE(RV, ULONG, ctypes.c_char_p, ULONG, ctypes.c_void_p, ctypes.c_void_p)


class CkFunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST (PKCS#11 v2.40 order), up to C_Decrypt."""

    _fields_ = [
        ("version", ctypes.c_ubyte * 2),
        ("C_Initialize", F_INITIALIZE),
        ("C_Finalize", F_FINALIZE),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", F_INIT_TOKEN),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", F_CLOSE_SESSION),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", F_GET_SESSION_INFO),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", F_LOGIN),
        ("C_Logout", F_LOGOUT),
        ("C_CreateObject", ctypes.c_void_p),
        ("C_CopyObject", ctypes.c_void_p),
        ("C_DestroyObject", ctypes.c_void_p),
        ("C_GetObjectSize", ctypes.c_void_p),
        ("C_GetAttributeValue", ctypes.c_void_p),
        ("C_SetAttributeValue", ctypes.c_void_p),
        ("C_FindObjectsInit", ctypes.c_void_p),
        ("C_FindObjects", ctypes.c_void_p),
        ("C_FindObjectsFinal", ctypes.c_void_p),
        ("C_EncryptInit", F_CRYPT_INIT),
        ("C_Encrypt", F_CRYPT),
        ("C_EncryptUpdate", ctypes.c_void_p),
        ("C_EncryptFinal", ctypes.c_void_p),
        ("C_DecryptInit", F_CRYPT_INIT),
        ("C_Decrypt", F_CRYPT),
    ]


class Cryptoki:
    """Raw calls into one loaded PKCS#11 module."""

    def __init__(self, path: str) -> None:
        """Load ``path`` and fetch its function list.

        Raises: OSError if the library cannot be loaded; a PKCS11Error if C_GetFunctionList fails.
        """
        self._dll = ctypes.CDLL(path)
        get_list = self._dll.C_GetFunctionList
        get_list.restype = RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(CkFunctionList))]
        ptr = ctypes.POINTER(CkFunctionList)()
        check_rv(get_list(ctypes.byref(ptr)))
        self._f: CkFunctionList = ptr.contents
        # Reading a function field builds a new function object each time: fetch these once.
        self.encrypt_init = self._f.C_EncryptInit
        self.encrypt = self._f.C_Encrypt
        self.decrypt_init = self._f.C_DecryptInit
        self.decrypt = self._f.C_Decrypt

    def crypt_functions(self, release_gil: bool) -> tuple[Any, Any, Any, Any]:
        """C_EncryptInit, C_Encrypt, C_DecryptInit, C_Decrypt; with ``release_gil`` False they
        are called holding the GIL (no hand-off around a call of tens of microseconds when one
        thread does all the calls). Never raises."""
        if release_gil:
            return self.encrypt_init, self.encrypt, self.decrypt_init, self.decrypt

        def address(field: str) -> int:
            return int(ctypes.cast(getattr(self._f, field), ctypes.c_void_p).value or 0)

        return (G_CRYPT_INIT(address("C_EncryptInit")), G_CRYPT(address("C_Encrypt")),
                G_CRYPT_INIT(address("C_DecryptInit")), G_CRYPT(address("C_Decrypt")))

    def reinitialize_with_os_locking(self) -> None:
        """C_Finalize (if initialised), then C_Initialize with CKF_OS_LOCKING_OK.

        Raises: PKCS11Error subclasses from C_Initialize.
        """
        rv = self._f.C_Finalize(None)
        if rv not in (CKR_OK, CKR_CRYPTOKI_NOT_INITIALIZED):
            check_rv(rv)
        args = CkInitializeArgs(flags=CKF_OS_LOCKING_OK)
        check_rv(self._f.C_Initialize(ctypes.byref(args)))

    def finalize_quietly(self) -> None:
        """C_Finalize, ignoring every error (used when switching modules)."""
        self._f.C_Finalize(None)

    def session_state(self, handle: int) -> int:
        """Return CK_SESSION_INFO.state of a session. Raises: PKCS11Error subclasses."""
        info = CkSessionInfo()
        check_rv(self._f.C_GetSessionInfo(handle, ctypes.byref(info)))
        return int(info.state)

    def login_user(self, handle: int, pin: Secret) -> None:
        """C_Login as CKU_USER on a session. Raises: PKCS11Error subclasses (PinIncorrect, ...)."""
        data = pin.reveal().encode("utf-8")
        check_rv(self._f.C_Login(handle, CKU_USER, data, len(data)))

    def logout(self, handle: int) -> None:
        """C_Logout through one session. Raises: PKCS11Error subclasses."""
        check_rv(self._f.C_Logout(handle))

    def close_session(self, handle: int) -> None:
        """C_CloseSession on a raw handle. Raises: PKCS11Error subclasses."""
        check_rv(self._f.C_CloseSession(handle))

    def init_token(self, slot_id: int, so_pin: Secret, label: str) -> None:
        """C_InitToken: (re)initialise the token in ``slot_id`` with an SO PIN and a label.

        Raises: PKCS11Error subclasses.
        """
        data = so_pin.reveal().encode("utf-8")
        padded = label.encode("utf-8").ljust(TOKEN_LABEL_MAX, b" ")
        check_rv(self._f.C_InitToken(slot_id, data, len(data), padded))
