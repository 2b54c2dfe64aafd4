"""Pkcs11Backend: ticket keys are AES-256 token objects; seal and unseal run in the token."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, TypeVar

from pkcs11 import exceptions as p11x

from authority.backends.base import BackendInfo
from authority.backends.pkcs11 import _keys, _template, _wrap
from authority.backends.pkcs11._crypt import find_key, seal_all, unseal_all
from authority.backends.pkcs11._errors import Ctx, Phase, device_errors
from authority.backends.pkcs11._filelock import token_files_locked
from authority.backends.pkcs11._login import TokenLogin
from authority.backends.pkcs11._module import REGISTRY, Module
from authority.backends.pkcs11._pool import PooledSession, SessionPool, close_quietly
from authority.backends.pkcs11._rawck import RawToken
from authority.backends.pkcs11._token import check_mechanisms, check_pin_flags, find_token
from authority.config import Pkcs11Settings
from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    InvalidTicket,
    KeyNotFound,
    StartupError,
)

log = logging.getLogger("authority.backends.pkcs11")

T = TypeVar("T")


class Pkcs11Backend:
    """Ticket keys in a PKCS#11 token; seal/unseal with CKM_AES_GCM inside it. Thread-safe."""

    name = "pkcs11"
    format_version = 1

    def __init__(self, settings: Pkcs11Settings, module: Module, token: Any) -> None:
        """Use :meth:`open`. Takes over one registry user of ``module``."""
        self._settings = settings
        self._module = module
        self._token = token
        self._label = settings.token_label
        self._closed = False
        self._login = TokenLogin(module, token, settings.token_label, settings.pin,
                                 settings.release_gil, settings.per_node_keys)
        self._pool = SessionPool(self._open_session, settings.sessions, settings.session_timeout)

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
        conf = settings.softhsm2_conf
        try:
            with token_files_locked(str(conf) if conf else os.environ.get("SOFTHSM2_CONF")):
                backend = cls._open_locked(settings)
        except DeviceUnavailable as exc:   # the token files' lock
            raise StartupError(f"pkcs11.token_label: {exc.message}") from exc
        log.info("pkcs11 backend open: %s", backend.describe())
        return backend

    @classmethod
    def _open_locked(cls, settings: Pkcs11Settings) -> Pkcs11Backend:
        """:meth:`open` once the token files' lock is held. Raises: StartupError."""
        module = REGISTRY.acquire(settings.module, settings.softhsm2_conf)
        try:
            token = find_token(module, settings.token_label)
            check_mechanisms(token, settings.token_label)
            check_pin_flags(token, settings.token_label)
            backend = cls(settings, module, token)
            backend._start()
        except BaseException:
            REGISTRY.release()
            raise
        return backend

    def refresh(self) -> None:
        """Read the token afresh: some tokens keep a per-process view of their objects that
        can miss other processes' changes (SoftHSM2 2.6.1: a process that created or destroyed
        a key may not see keys other processes made just before, tests/test_cluster_e2e.py).
        PKCS#11's one way to drop such a view is to finalize and initialise the module again:
        calls in progress finish, every session of this backend is closed, the module is
        re-initialised (under the token files' lock, as at start) and the sessions are opened
        and logged in again. Nothing is done while other backends of this process use the
        module (they share its view, and it cannot be re-read without cutting their sessions).

        Raises: DeviceUnavailable (the sessions are then re-opened by the next calls).
        """
        with self._pool.emptied(), token_files_locked(os.environ.get("SOFTHSM2_CONF")):
            if not REGISTRY.refresh(self._module):
                log.info("pkcs11: not re-reading the token: other backends of this process "
                         "use the module")
                return
            self._log_in_afresh()
            self._pool.reopen_with(self._open_session)
            self._pool.fill()

    def _log_in_afresh(self) -> None:
        """After the module was initialised again: find the token, and a new login for the
        sessions to come. Raises: DeviceUnavailable (no such token now)."""
        try:
            token = find_token(self._module, self._label)
        except StartupError as exc:
            raise DeviceUnavailable(str(exc)) from exc
        self._token = token
        self._login = TokenLogin(self._module, token, self._label, self._settings.pin,
                                 self._settings.release_gil, self._settings.per_node_keys)

    def _open_session(self) -> PooledSession:
        """The pool's opener: a logged-in session; first, if a re-initialisation of the module
        failed (the token was unreadable), initialise it again and find the token and log in
        afresh, so that the backend recovers by itself once the token is back.

        Raises: DeviceUnavailable (still unreadable), StartupError (before the first login)."""
        if REGISTRY.revive(self._module):
            self._log_in_afresh()
        return self._login.open_session()

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
        REGISTRY.release()

    def _shutdown_sessions(self) -> None:
        idle = self._pool.drain()
        self._login.release(idle)
        for pooled in idle:
            self._pool.forget(pooled)
            close_quietly(pooled)

    # -- keys --------------------------------------------------------------------------------

    def create_key(self, key_id: bytes) -> None:
        """Generate a non-extractable AES-256 token key labelled ``ita-<hex id>`` (the
        template, and what may be left out of it on other tokens: _template.py).

        Raises: InvalidArgument (id not 8 bytes); FailedPrecondition (id taken);
        KeyProtectionError (the token refuses a required attribute, or made a key without the
        required protection: it was destroyed); DeviceUnavailable.
        """
        _keys.check_key_id(key_id)
        ctx = Ctx(Phase.OPERATION, "create_key", key_id=key_id)
        with self._pool.session(exclusive=True) as pooled, device_errors(ctx):
            if _keys.search(pooled.session, key_id, by_label_only=False):
                raise FailedPrecondition(f"key {key_id.hex()} already exists in the token")
            _template.create(pooled.session, key_id, self._label)
        log.info("created key %s", key_id.hex())

    def destroy_key(self, key_id: bytes) -> None:
        """Destroy the token key(s) with this id and forget their handles in every session;
        a key not found is looked for again after a :meth:`refresh` (another process may have
        made it), so that it is never left in the token for want of a fresh look.

        Raises: KeyNotFound; DeviceUnavailable.
        """
        try:
            self._destroy(key_id)
        except KeyNotFound:
            if not _keys.valid_id(key_id):
                raise
            self.refresh()
            self._destroy(key_id)
        log.info("destroyed key %s", key_id.hex())

    def _destroy(self, key_id: bytes) -> None:
        """:meth:`destroy_key` in this process's view. Raises: KeyNotFound; DeviceUnavailable."""
        ctx = Ctx(Phase.OPERATION, "destroy_key", key_id=key_id)
        with self._pool.session(exclusive=True) as pooled, device_errors(ctx):
            found = []
            if _keys.valid_id(key_id):
                found = _keys.search(pooled.session, key_id, by_label_only=False)
            if not found:
                raise KeyNotFound(key_id)
            for other in self._pool.live():  # none is in use: we hold the pool exclusively
                other.keys.pop(key_id, None)
            for key in found:
                key.destroy()

    def list_keys(self) -> set[bytes]:
        """Ids of every secret key labelled ``ita-...`` that this backend may use (_keys.refused:
        one the token does not report the required protection for is left out, logged once).
        Raises: DeviceUnavailable."""
        with self._pool.session() as pooled, device_errors(Ctx(Phase.OPERATION, "list_keys")):
            return _keys.list_ids(pooled.session, pooled.per_node)

    def labelled_keys(self) -> set[bytes]:
        """Ids of every secret key labelled ``ita-...``, those the backend refuses to use
        included (doctor reports them). Raises: DeviceUnavailable."""
        with self._pool.session() as pooled, device_errors(Ctx(Phase.OPERATION, "list_keys")):
            return _keys.list_ids(pooled.session, None)

    def key_attributes(self, key_id: bytes) -> dict[str, bool]:
        """The key's protection attributes as the token reports them (never CKA_VALUE).

        Raises: KeyNotFound; DeviceUnavailable.
        """
        ctx = Ctx(Phase.OPERATION, "key_attributes", key_id=key_id)
        with self._pool.session() as pooled:
            key = find_key(pooled, key_id, "key_attributes", usable_only=False)
            with device_errors(ctx):
                return _keys.protection_attributes(key)

    # -- ticket keys wrapped under the cluster KEK (per-node tokens, _wrap.py) --------------

    def _rawtok(self) -> RawToken:
        """The raw calls on this backend's module (made on first use). Raises: DeviceUnavailable.
        """
        rawtok: RawToken | None = getattr(self, "_raw", None)
        if rawtok is None:
            try:
                rawtok = self._raw = RawToken(self._module.path)
            except OSError as exc:
                raise DeviceUnavailable(f"pkcs11: cannot load {self._module.path}: {exc}") from exc
        return rawtok

    def create_wrappable_key(self, key_id: bytes) -> None:
        """Generate a ticket key for per-node tokens: as :meth:`create_key` (AES-256, sensitive,
        encrypt/decrypt only, not modifiable, labelled ``ita-<hex id>``) but extractable under a
        trusted key only (CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED true), so that
        :meth:`wrap_key` can copy it under the cluster KEK and no other key can wrap it.

        Raises: InvalidArgument (id not 8 bytes); FailedPrecondition (id taken);
        KeyProtectionError (the token made a weaker key: destroyed); DeviceUnavailable.
        """
        _keys.check_key_id(key_id)
        rawtok = self._rawtok()
        ctx = Ctx(Phase.OPERATION, "create_wrappable_key", key_id=key_id)
        with self._pool.session(exclusive=True) as pooled, device_errors(ctx):
            if _keys.search(pooled.session, key_id, by_label_only=False):
                raise FailedPrecondition(f"key {key_id.hex()} already exists in the token")
            _wrap.create_wrappable(rawtok, pooled.session, key_id, self._label)
        log.info("created wrappable key %s", key_id.hex())

    def wrap_key(self, key_id: bytes, kek_label: str = _wrap.KEK_LABEL) -> bytes:
        """The ticket key wrapped under the cluster KEK with CKM_AES_KEY_WRAP (RFC 3394): 40
        bytes, the same for the same key and KEK (the mechanism is deterministic).

        Raises: KeyNotFound; FailedPrecondition (no KEK; or the key cannot be wrapped, e.g. one
        made by :meth:`create_key`, never extractable: the message names the token's CKR);
        DeviceUnavailable.
        """
        ctx = Ctx(Phase.OPERATION, "wrap_key", key_id=key_id)
        with self._pool.session() as pooled:
            key = find_key(pooled, key_id, "wrap_key")
            with device_errors(ctx):
                kek = _wrap.find_kek(pooled.session, kek_label)
                try:
                    return _wrap.wrap_ticket_key(kek, key)
                except (p11x.KeyUnextractable, p11x.KeyNotWrappable) as exc:
                    raise FailedPrecondition(f"key {key_id.hex()} cannot be wrapped under the "
                                             f"cluster KEK: {type(exc).__name__}") from exc

    def key_check(self, key_id: bytes) -> bytes:
        """The key's check value: the 16-octet AES-GCM tag it makes in the token over an empty
        plaintext with AAD ``_wrap.check_aad(key_id)`` under the all-zero 12-octet nonce (one
        C_EncryptInit/C_Encrypt). The original and every copy give the same value; a copy of
        another key unwrapped under this id does not.

        Raises: KeyNotFound; FailedPrecondition (several keys with the id); DeviceUnavailable.
        """
        with self._pool.session() as pooled:
            handle = int(find_key(pooled, key_id, "key_check").handle)
            return self._check_of(pooled, key_id, handle)

    def _check_of(self, pooled: PooledSession, key_id: bytes, handle: int) -> bytes:
        """The check value of the key object ``handle``. Raises: DeviceUnavailable;
        FailedPrecondition (the token gave no 16-octet tag)."""
        with device_errors(Ctx(Phase.OPERATION, "key_check", key_id=key_id)):
            tag = pooled.gcm.encrypt(handle, _wrap.CHECK_NONCE, _wrap.check_aad(key_id), b"")
        if len(tag) != _wrap.CHECK_BYTES:
            raise FailedPrecondition(f"token '{self._label}' made a {len(tag)}-octet check "
                                     f"value for key {key_id.hex()}")
        return tag

    def unwrap_key(self, key_id: bytes, blob: bytes, check: bytes,
                   kek_label: str = _wrap.KEK_LABEL) -> None:
        """Unwrap a copy of ticket key ``key_id`` from a :meth:`wrap_key` blob into this token:
        sensitive, never extractable, not modifiable, encrypt/decrypt only, labelled
        ``ita-<hex id>``. The copy's attributes are read back, then its :meth:`key_check`
        compared with ``check`` (the original's, recorded with the blob); a copy weaker than
        required, or with another check value (the blob of another key moved onto this id), is
        destroyed.

        Raises: InvalidArgument (id not 8 bytes; a blob the token refuses: tampered, or wrapped
        under another KEK; a check value not 16 octets); FailedPrecondition (no KEK; id taken);
        KeyProtectionError (a weaker copy, or another check value: destroyed);
        DeviceUnavailable.
        """
        _keys.check_key_id(key_id)
        if len(check) != _wrap.CHECK_BYTES:
            raise InvalidArgument("check", f"must be {_wrap.CHECK_BYTES} octets")
        rawtok = self._rawtok()
        ctx = Ctx(Phase.OPERATION, "unwrap_key", key_id=key_id)
        with self._pool.session(exclusive=True) as pooled:
            with device_errors(ctx):
                if _keys.search(pooled.session, key_id, by_label_only=False):
                    raise FailedPrecondition(f"key {key_id.hex()} already exists in the token")
                kek = _wrap.find_kek(pooled.session, kek_label)
                copy = self._unwrap(rawtok, pooled, kek, key_id, blob)
            self._check_copy(pooled, copy, key_id, check)
        log.info("unwrapped a copy of key %s (check value matches)", key_id.hex())

    def _unwrap(self, rawtok: RawToken, pooled: PooledSession, kek: Any, key_id: bytes,
                blob: bytes) -> Any:
        """The copy unwrapped and read back. Raises: as :meth:`unwrap_key`; PKCS11Error."""
        try:
            return _wrap.unwrap_ticket_key(rawtok, pooled.session, kek, key_id, blob,
                                           self._label)
        except (*_wrap.BAD_BLOB, p11x.GeneralError) as exc:
            # SoftHSM2 2.6.1 answers CKR_GENERAL_ERROR for a blob failing RFC 3394's check,
            # as a device fault could: a session still alive means the blob was refused
            if not self._session_alive(pooled.handle):
                raise
            raise InvalidArgument("blob", f"the token refused it ({type(exc).__name__}): "
                                  "tampered, or wrapped under another KEK") from exc

    def _check_copy(self, pooled: PooledSession, copy: Any, key_id: bytes,
                    check: bytes) -> None:
        """Destroy ``copy`` unless its check value is ``check``. Raises: KeyProtectionError;
        DeviceUnavailable (the copy is destroyed first, if the token still answers)."""
        try:
            found = self._check_of(pooled, key_id, int(copy.handle))
        except BaseException:
            with suppress(p11x.PKCS11Error):
                copy.destroy()
            raise
        if not hmac.compare_digest(found, check):
            raise _wrap.refuse_check(copy, key_id, self._label)

    def _session_alive(self, handle: int) -> bool:
        """Whether C_GetSessionInfo still answers for ``handle``. Never raises."""
        try:
            self._module.ck.session_state(handle)
        except p11x.PKCS11Error:
            return False
        return True

    def kek_attributes(self, kek_label: str = _wrap.KEK_LABEL) -> dict[str, bool]:
        """The cluster KEK's protection attributes as the token reports them (never CKA_VALUE).

        Raises: FailedPrecondition (no KEK); DeviceUnavailable."""
        with self._pool.session() as pooled, device_errors(Ctx(Phase.OPERATION, "kek_attributes")):
            return _wrap.protection(_wrap.find_kek(pooled.session, kek_label))

    # -- seal / unseal -----------------------------------------------------------------------

    def seal(self, key_id: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """AES-256-GCM in the token: nonce (12, random) | ciphertext | tag (16).

        Raises: KeyNotFound; DeviceUnavailable.
        """
        return self.seal_many(((key_id, aad, plaintext),))[0]

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        """Verify and decrypt a body made by :meth:`seal`; one decrypt call in the token.

        Raises: UnsealFailed (short body, bad tag, tampering, wrong key); KeyNotFound;
        DeviceUnavailable (the device itself failed).
        """
        result = self.unseal_many(((key_id, aad, sealed),))[0]
        if isinstance(result, InvalidTicket):
            raise result
        return result

    def seal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        """:meth:`seal` for many (key_id, aad, plaintext) items, in order, in one session.

        Raises: KeyNotFound, DeviceUnavailable (for the whole batch). An empty batch returns []
        without borrowing a session.
        """
        if not items:
            return []
        ck = self._module.ck
        return self._in_session(lambda pooled: seal_all(ck, pooled, items))

    def unseal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]
                    ) -> list[bytes | InvalidTicket]:
        """:meth:`unseal` for many (key_id, aad, sealed) items, in order, in one session.

        An item that fails authentication or names a missing key yields an ``UnsealFailed`` /
        ``KeyNotFound`` instance in place of its plaintext; the others are unaffected.
        Raises: DeviceUnavailable (for the whole batch; the session is dropped). An empty batch
        returns [] without borrowing a session.
        """
        if not items:
            return []
        ck = self._module.ck
        return self._in_session(lambda pooled: unseal_all(ck, pooled, items))

    def _in_session(self, work: Callable[[PooledSession], T]) -> T:
        """Run ``work`` in one borrowed session (which is also the shared side of the object
        lock); a DeviceUnavailable drops the session. Plain try blocks: the hot path.
        """
        pooled = self._pool.take()
        broken = False
        try:
            return work(pooled)
        except DeviceUnavailable:
            broken = True
            raise
        finally:
            self._pool.give_back(pooled, broken)

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
            identity=self.identity(),
        )

    def identity(self) -> str:
        """The token as it names itself: label, serial, manufacturer and model (what a state
        directory records to recognise its token). Never raises."""
        token = self._token
        serial = bytes(token.serial).decode("ascii", "replace").strip()
        return (f"token {token.label!r} (serial {serial}, manufacturer "
                f"{str(token.manufacturer_id).strip()!r}, model {str(token.model).strip()!r})")
