"""Seal and unseal items in one borrowed session: the key handle cache, the stale-handle retry
and the per-item outcome. The backend's single and batch calls all run through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

from pkcs11 import exceptions as p11x

from authority.backends.pkcs11._cryptoki import Cryptoki
from authority.backends.pkcs11._errors import Ctx, Phase, device_errors, translate
from authority.backends.pkcs11._gcm import NONCE_LEN, TAG_LEN
from authority.backends.pkcs11._keys import AesKey, refused, search, valid_id
from authority.backends.pkcs11._pool import PooledSession
from authority.errors import FailedPrecondition, InvalidTicket, KeyNotFound, UnsealFailed

_MIN_SEALED: Final = NONCE_LEN + TAG_LEN

#: GcmSession.encrypt or .decrypt: (key handle, nonce, aad, data) -> output
_Crypt = Callable[[int, bytes, bytes, bytes], bytes]


def seal_all(ck: Cryptoki, pooled: PooledSession,
             items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """AES-256-GCM in the token for each (key_id, aad, plaintext): nonce (12, random) |
    ciphertext | tag (16). The nonces come from one os.urandom call for the batch (each call
    drops the GIL, an expensive hand-over when many threads are busy).

    Raises: KeyNotFound; DeviceUnavailable; FailedPrecondition (several keys with the id).
    """
    nonces = os.urandom(NONCE_LEN * len(items))
    encrypt = pooled.gcm.encrypt
    sealed = []
    for i, (key_id, aad, plaintext) in enumerate(items):
        nonce = nonces[i * NONCE_LEN:(i + 1) * NONCE_LEN]
        sealed.append(nonce + _on_key(ck, pooled, key_id, "seal", encrypt, nonce, aad, plaintext))
    return sealed


def unseal_all(ck: Cryptoki, pooled: PooledSession,
               items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes | InvalidTicket]:
    """The plaintext of each (key_id, aad, sealed) made by :func:`seal_all`, or why it cannot be
    had: UnsealFailed (short body, bad tag, tampering, wrong key) or KeyNotFound.

    Raises: DeviceUnavailable (the device itself failed); FailedPrecondition.
    """
    return [_unseal_one(ck, pooled, key_id, aad, sealed) for key_id, aad, sealed in items]


def _unseal_one(ck: Cryptoki, pooled: PooledSession, key_id: bytes, aad: bytes,
                sealed: bytes) -> bytes | InvalidTicket:
    if len(sealed) < _MIN_SEALED:
        return UnsealFailed()
    try:
        return _on_key(ck, pooled, key_id, "unseal", pooled.gcm.decrypt, sealed[:NONCE_LEN],
                       aad, sealed[NONCE_LEN:], decrypt=True)
    except (UnsealFailed, KeyNotFound) as exc:
        return exc.with_traceback(None)  # a result now: it must not pin this batch's frames


def _on_key(ck: Cryptoki, pooled: PooledSession, key_id: bytes, what: str, crypt: _Crypt,
            nonce: bytes, aad: bytes, data: bytes, decrypt: bool = False) -> bytes:
    """Run ``crypt`` with the session's handle for ``key_id``; a stale cached handle is looked
    up once more (the key may have been destroyed and re-created).

    Raises: KeyNotFound; UnsealFailed (decrypt only); DeviceUnavailable; FailedPrecondition.
    """
    handle = pooled.keys.get(key_id)
    cached = handle is not None
    if handle is None:
        handle = find_handle(pooled, key_id, what)
    try:
        return crypt(handle, nonce, aad, data)
    except p11x.PKCS11Error as exc:
        error = translate(exc, _op_ctx(ck, pooled, key_id, what, decrypt))
        if not (cached and isinstance(error, KeyNotFound)):
            raise error from exc
    pooled.keys.pop(key_id, None)
    handle = find_handle(pooled, key_id, what)
    try:
        return crypt(handle, nonce, aad, data)
    except p11x.PKCS11Error as exc:
        raise translate(exc, _op_ctx(ck, pooled, key_id, what, decrypt)) from exc


def _op_ctx(ck: Cryptoki, pooled: PooledSession, key_id: bytes, what: str,
            decrypt: bool) -> Ctx:
    """The error context of a key operation (built only when something failed)."""
    phase = Phase.DECRYPT if decrypt else Phase.OPERATION
    return Ctx(phase, what, key_id=key_id, probe=lambda: alive(ck, pooled))


def find_key(pooled: PooledSession, key_id: bytes, what: str,
             usable_only: bool = True) -> AesKey:
    """The one ticket key ``key_id`` in the token, looked up in this session; unless
    ``usable_only`` is False (reading its attributes), only if the token reports the
    protection the backend requires of a ticket key (_keys.refused).

    Raises: KeyNotFound (none, or refused); FailedPrecondition (several); DeviceUnavailable.
    """
    if not valid_id(key_id):
        raise KeyNotFound(key_id)
    # No key_id in the context: any search failure is DeviceUnavailable, so the session is
    # dropped. (python-pkcs11 keeps a session's operation lock held when C_FindObjectsInit
    # fails; such a session must never be handed out again.)
    ctx = Ctx(Phase.OPERATION, what)
    with device_errors(ctx):
        found = search(pooled.session, key_id, by_label_only=True)
    if not found:
        raise KeyNotFound(key_id)
    if len(found) > 1:
        raise FailedPrecondition(f"{len(found)} keys in the token have id {key_id.hex()}")
    if usable_only:
        with device_errors(ctx):
            problems = refused(found[0], key_id, pooled.per_node)
        if problems is not None:
            raise KeyNotFound(key_id)
    return found[0]


def find_handle(pooled: PooledSession, key_id: bytes, what: str) -> int:
    """:func:`find_key`'s handle, remembered in the session. Raises: as find_key."""
    handle = int(find_key(pooled, key_id, what).handle)
    pooled.keys[key_id] = handle
    return handle


def alive(ck: Cryptoki, pooled: PooledSession) -> bool:
    """Cheap liveness probe of a session (C_GetSessionInfo); False on any device error."""
    try:
        ck.session_state(pooled.handle)
    except p11x.PKCS11Error:
        return False
    return True
