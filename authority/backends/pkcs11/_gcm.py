"""AES-GCM on one session's raw handle: the seal/unseal hot path, one C_*Init and one C_* call.

python-pkcs11's ``key.encrypt``/``key.decrypt`` add about half the device's own time (SoftHSM2,
300 B, one thread, tools/bench_pkcs11.py: 65-72 µs of CPU per raw decrypt against 45-50 µs per
item of unseal_many, of which ~37 µs are in the device): per call they build a GCMParams and a
malloc'ed mechanism, an operation object with a fresh 8 KiB buffer (``buffer_size`` is not
passed down in 0.10.1), take the session's RLock, and call C_Decrypt twice (a size query, then
the data), each call dropping and re-taking the GIL. Here each pooled session owns one
parameter block, one mechanism and one output buffer, all allocated once; a call sets three
fields and makes two device calls. Each call drops the GIL (a network HSM may take
milliseconds) unless ``pkcs11.release_gil`` is off: the aio server making every call from its
one loop thread then saves two GIL hand-offs per call (docs/benchmarks.md). The session is
lent to one thread at a time (the pool), so this is unlocked.

Errors come back as python-pkcs11 exception classes (_cryptoki.rv_error), for _errors.translate.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

from authority.backends.pkcs11._cryptoki import (
    ULONG,
    CkGcmParams,
    CkMechanism,
    Cryptoki,
    rv_error,
)

CKM_AES_GCM: Final = 0x1087
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
#: output room beyond the input: the tag, and a margin for modules that ask for more
_SLACK: Final = 2 * TAG_LEN
_INITIAL_CAPACITY: Final = 4096


class GcmSession:
    """AES-GCM with ``TAG_LEN`` tags and ``NONCE_LEN`` nonces through one session handle.

    Not thread-safe: used only by the thread that borrowed the session.
    """

    __slots__ = (
        "_capacity", "_crypt_decrypt", "_crypt_encrypt", "_handle", "_init_decrypt",
        "_init_encrypt", "_mechanism", "_mechanism_ptr", "_out", "_out_len", "_out_len_ptr",
        "_out_ptr", "_params",
    )

    def __init__(self, ck: Cryptoki, handle: int, release_gil: bool = True) -> None:
        self._handle = handle
        self._params = CkGcmParams(
            ulIvLen=NONCE_LEN, ulIvBits=NONCE_LEN * 8, ulTagBits=TAG_LEN * 8
        )
        self._mechanism = CkMechanism(
            CKM_AES_GCM, ctypes.addressof(self._params), ctypes.sizeof(CkGcmParams)
        )
        self._mechanism_ptr = ctypes.addressof(self._mechanism)
        self._out_len = ULONG()
        self._out_len_ptr = ctypes.addressof(self._out_len)
        self._capacity = 0
        self._out: Any = ctypes.create_string_buffer(0)
        self._out_ptr = 0
        self._grow(_INITIAL_CAPACITY)
        (self._init_encrypt, self._crypt_encrypt, self._init_decrypt,
         self._crypt_decrypt) = ck.crypt_functions(release_gil)

    def encrypt(self, key: int, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """Return ciphertext | tag. Raises: PKCS11Error subclasses."""
        return self._run(True, key, nonce, aad, plaintext)

    def decrypt(self, key: int, nonce: bytes, aad: bytes, body: bytes) -> bytes:
        """Verify and decrypt ciphertext | tag. Raises: PKCS11Error subclasses (a bad tag is
        whatever the module says: GeneralError in SoftHSM2)."""
        return self._run(False, key, nonce, aad, body)

    def _run(self, encrypt: bool, key: int, nonce: bytes, aad: bytes, data: bytes) -> bytes:
        """One single-part operation.

        The buffer is grown before C_*Init and always has room for the output, so neither a
        Python error nor CKR_BUFFER_TOO_SMALL can leave an operation active; any other device
        error ends it (PKCS#11 single-part calls).
        Raises: ValueError (nonce not NONCE_LEN bytes: the device would read past it);
        PKCS11Error subclasses.
        """
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        size = len(data)
        if size + _SLACK > self._capacity:
            self._grow(size + _SLACK)
        params = self._params
        params.pIv = nonce
        params.pAAD = aad
        params.ulAADLen = len(aad)
        if encrypt:
            init, crypt = self._init_encrypt, self._crypt_encrypt
        else:
            init, crypt = self._init_decrypt, self._crypt_decrypt
        rv = init(self._handle, self._mechanism_ptr, key)
        if rv:
            raise rv_error(rv)
        out_len = self._out_len
        out_len.value = self._capacity
        rv = crypt(self._handle, data, size, self._out_ptr, self._out_len_ptr)
        if rv:
            raise rv_error(rv)
        out: bytes = self._out[: out_len.value]  # slicing a c_char array gives bytes
        return out

    def _grow(self, capacity: int) -> None:
        self._out = ctypes.create_string_buffer(capacity)
        self._out_ptr = ctypes.addressof(self._out)
        self._capacity = capacity

