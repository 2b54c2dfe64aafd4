"""Raw calls for what python-pkcs11 (0.10) cannot express: attribute templates whose values are
themselves templates (CKA_UNWRAP_TEMPLATE, an array of CK_ATTRIBUTE), and reading them back.

Used by _wrap.py for the cluster KEK and the transport key pair: C_GenerateKey,
C_GenerateKeyPair and C_UnwrapKey with such templates, and C_GetAttributeValue of a template.
The calls go through the function list of the very library python-pkcs11 loaded (dlopen gives
the same handle for the same path), on a python-pkcs11 session's handle. A failed call raises
the python-pkcs11 exception class of its CK_RV (_cryptoki.rv_error), so that _errors.translate
stays the one place where device errors are interpreted.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Final, Union

from pkcs11 import exceptions as p11x

from authority.backends.pkcs11._cryptoki import CKR_OK, ULONG, CkMechanism, rv_error

RV = ctypes.c_ulong

#: a template value: CK_BBOOL, CK_ULONG, a byte string, or a nested template
Value = Union[bool, int, bytes, "Template"]
Template = Sequence[tuple[int, Value]]

CKF_ARRAY_ATTRIBUTE: Final = 0x40000000
CKM_RSA_PKCS_KEY_PAIR_GEN: Final = 0x0
CKM_RSA_PKCS_OAEP: Final = 0x9
CKM_AES_KEY_GEN: Final = 0x1080
#: OAEP hash name -> (CKM_ hash, CKG_MGF1_ of the same hash)
OAEP_HASHES: Final = {"sha256": (0x250, 0x2), "sha1": (0x220, 0x1)}
CKZ_DATA_SPECIFIED: Final = 0x1


#: the codes these calls return beyond those _cryptoki maps, with python-pkcs11's classes for them
_MORE_RV: Final[dict[int, type[p11x.PKCS11Error]]] = {
    0x10: p11x.AttributeReadOnly,
    0x11: p11x.AttributeSensitive,
    0x12: p11x.AttributeTypeInvalid,
    0x13: p11x.AttributeValueInvalid,
    0x69: p11x.KeyNotWrappable,
    0x6A: p11x.KeyUnextractable,
    0xD0: p11x.TemplateIncomplete,
    0xD1: p11x.TemplateInconsistent,
    0xF0: p11x.UnwrappingKeyHandleInvalid,
    0xF1: p11x.UnwrappingKeySizeRange,
    0xF2: p11x.UnwrappingKeyTypeInconsistent,
    0x101: p11x.UserNotLoggedIn,
    0x110: p11x.WrappedKeyInvalid,
    0x112: p11x.WrappedKeyLenRange,
}


def check_rv(rv: int) -> None:
    """Raise the python-pkcs11 exception of ``rv`` unless it is CKR_OK (a code no class is
    known for: a PKCS11Error whose text is the code)."""
    if rv == CKR_OK:
        return
    known = _MORE_RV.get(rv)
    raise known() if known is not None else rv_error(rv)


class CkAttribute(ctypes.Structure):
    _fields_ = [("type", ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", ULONG)]


class CkOaepParams(ctypes.Structure):
    _fields_ = [("hashAlg", ULONG), ("mgf", ULONG), ("source", ULONG),
                ("pSourceData", ctypes.c_void_p), ("ulSourceDataLen", ULONG)]


_NAMES: Final = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit",
    "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate",
    "C_EncryptFinal", "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal",
    "C_DigestInit", "C_Digest", "C_DigestUpdate", "C_DigestKey", "C_DigestFinal", "C_SignInit",
    "C_Sign", "C_SignUpdate", "C_SignFinal", "C_SignRecoverInit", "C_SignRecover",
    "C_VerifyInit", "C_Verify", "C_VerifyUpdate", "C_VerifyFinal", "C_VerifyRecoverInit",
    "C_VerifyRecover", "C_DigestEncryptUpdate", "C_DecryptDigestUpdate", "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey", "C_UnwrapKey",
)


class _FunctionList(ctypes.Structure):
    """The head of CK_FUNCTION_LIST (PKCS#11 v2.40 order) up to C_UnwrapKey."""

    _fields_ = [("version", ctypes.c_ubyte * 2), *[(n, ctypes.c_void_p) for n in _NAMES]]


_P_ULONG = ctypes.POINTER(ULONG)
_P_ATTR = ctypes.POINTER(CkAttribute)
_P_MECH = ctypes.POINTER(CkMechanism)
_GENERATE_KEY = ctypes.CFUNCTYPE(RV, ULONG, _P_MECH, _P_ATTR, ULONG, _P_ULONG)
_GENERATE_PAIR = ctypes.CFUNCTYPE(RV, ULONG, _P_MECH, _P_ATTR, ULONG, _P_ATTR, ULONG,
                                  _P_ULONG, _P_ULONG)
_UNWRAP = ctypes.CFUNCTYPE(RV, ULONG, _P_MECH, ULONG, ctypes.c_char_p, ULONG, _P_ATTR, ULONG,
                           _P_ULONG)
_GET_ATTRIBUTES = ctypes.CFUNCTYPE(RV, ULONG, ULONG, _P_ATTR, ULONG)


class _Packed:
    """A template as a CK_ATTRIBUTE array, with every buffer it points to kept alive."""

    def __init__(self, template: Template) -> None:
        self.keep: list[object] = []
        self.array = (CkAttribute * len(template))()
        for slot, (kind, value) in zip(self.array, template, strict=True):
            buf, size = self._value(value)
            slot.type, slot.pValue, slot.ulValueLen = kind, buf, size

    def _value(self, value: Value) -> tuple[int | None, int]:
        if isinstance(value, bool):
            raw: ctypes.Array[ctypes.c_char] | ctypes.c_ubyte | ULONG | CkAttribute
            raw = ctypes.c_ubyte(1 if value else 0)
        elif isinstance(value, int):
            raw = ULONG(value)
        elif isinstance(value, bytes):
            raw = ctypes.create_string_buffer(value, len(value))
        else:
            nested = _Packed(value)
            self.keep.append(nested)
            self.keep.append(nested.array)
            return ctypes.addressof(nested.array), ctypes.sizeof(nested.array)
        self.keep.append(raw)
        return ctypes.addressof(raw), ctypes.sizeof(raw)

    def __len__(self) -> int:
        return len(self.array)


class RawToken:
    """The calls above on one loaded module (by its real path)."""

    def __init__(self, path: str) -> None:
        """Raises: OSError (cannot load); PKCS11Error subclasses (C_GetFunctionList failed)."""
        dll = ctypes.CDLL(path)
        get_list = dll.C_GetFunctionList
        get_list.restype = RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        ptr = ctypes.POINTER(_FunctionList)()
        check_rv(get_list(ctypes.byref(ptr)))
        table = ptr.contents
        self._dll = dll
        self._generate = _GENERATE_KEY(table.C_GenerateKey)
        self._generate_pair = _GENERATE_PAIR(table.C_GenerateKeyPair)
        self._unwrap = _UNWRAP(table.C_UnwrapKey)
        self._get = _GET_ATTRIBUTES(table.C_GetAttributeValue)

    def generate_aes_key(self, session: int, template: Template) -> int:
        """C_GenerateKey (CKM_AES_KEY_GEN) with exactly ``template``; the new handle.

        Raises: PKCS11Error subclasses."""
        packed = _Packed(template)
        mech = CkMechanism(CKM_AES_KEY_GEN, None, 0)
        handle = ULONG()
        check_rv(self._generate(session, ctypes.byref(mech), packed.array, len(packed),
                                ctypes.byref(handle)))
        return int(handle.value)

    def generate_rsa_pair(self, session: int, public: Template, private: Template
                          ) -> tuple[int, int]:
        """C_GenerateKeyPair (CKM_RSA_PKCS_KEY_PAIR_GEN); (public, private) handles.

        Raises: PKCS11Error subclasses."""
        pub, priv = _Packed(public), _Packed(private)
        mech = CkMechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, None, 0)
        h_pub, h_priv = ULONG(), ULONG()
        check_rv(self._generate_pair(session, ctypes.byref(mech), pub.array, len(pub),
                                     priv.array, len(priv), ctypes.byref(h_pub),
                                     ctypes.byref(h_priv)))
        return int(h_pub.value), int(h_priv.value)

    def unwrap(self, session: int, mechanism: int, unwrapping_key: int, blob: bytes,
               template: Template) -> int:
        """C_UnwrapKey with a mechanism that takes no parameter (CKM_AES_KEY_WRAP); the new
        handle. Raises: PKCS11Error subclasses."""
        packed = _Packed(template)
        mech = CkMechanism(mechanism, None, 0)
        handle = ULONG()
        check_rv(self._unwrap(session, ctypes.byref(mech), unwrapping_key, blob, len(blob),
                              packed.array, len(packed), ctypes.byref(handle)))
        return int(handle.value)

    def unwrap_oaep(self, session: int, unwrapping_key: int, blob: bytes, template: Template,
                    oaep_hash: str) -> int:
        """C_UnwrapKey with CKM_RSA_PKCS_OAEP (``oaep_hash`` and MGF1 with it, no label); the
        new handle. Raises: KeyError (an unknown hash name); PKCS11Error subclasses."""
        packed = _Packed(template)
        digest, mgf = OAEP_HASHES[oaep_hash]
        params = CkOaepParams(digest, mgf, CKZ_DATA_SPECIFIED, None, 0)
        mech = CkMechanism(CKM_RSA_PKCS_OAEP, ctypes.addressof(params), ctypes.sizeof(params))
        handle = ULONG()
        check_rv(self._unwrap(session, ctypes.byref(mech), unwrapping_key, blob, len(blob),
                              packed.array, len(packed), ctypes.byref(handle)))
        return int(handle.value)

    def read_template(self, session: int, obj: int, kind: int) -> dict[int, bytes]:
        """An attribute whose value is a template (e.g. CKA_UNWRAP_TEMPLATE), as the token
        reports it: {attribute type: value bytes}; {} when the object has it empty.

        Raises: PKCS11Error subclasses (CKR_ATTRIBUTE_TYPE_INVALID when the object has none).
        """
        head = CkAttribute(kind, None, 0)
        check_rv(self._get(session, obj, ctypes.byref(head), 1))
        count = int(head.ulValueLen) // ctypes.sizeof(CkAttribute)
        if count == 0:
            return {}
        entries = (CkAttribute * count)()
        head.pValue, head.ulValueLen = ctypes.addressof(entries), ctypes.sizeof(entries)
        check_rv(self._get(session, obj, ctypes.byref(head), 1))
        buffers = [ctypes.create_string_buffer(int(e.ulValueLen)) for e in entries]
        for entry, buf in zip(entries, buffers, strict=True):
            entry.pValue = ctypes.addressof(buf)
        check_rv(self._get(session, obj, ctypes.byref(head), 1))
        return {int(e.type): buf.raw[:int(e.ulValueLen)]
                for e, buf in zip(entries, buffers, strict=True)}


def encode(value: Value) -> bytes:
    """The bytes a token stores for a flat template value (CK_BBOOL, CK_ULONG, bytes)."""
    if isinstance(value, bool):
        return bytes(ctypes.c_ubyte(1 if value else 0))
    if isinstance(value, int):
        return bytes(ULONG(value))
    if isinstance(value, bytes):
        return value
    raise TypeError("a nested template has no flat encoding")
