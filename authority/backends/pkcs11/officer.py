"""The security officer's side of the cluster KEK: making it, joining with a transport key pair,
wrapping it to an approved joiner (the PKCS#11 pieces are in _wrap.py).

Why an SO session: the KEK must be CKA_TRUSTED (only a trusted key may wrap ticket keys marked
CKA_WRAP_WITH_TRUSTED), and PKCS#11 lets only the SO set CKA_TRUSTED true; the KEK a joiner
unwraps must be trusted too, and the joiner's public key must be trusted on the approving member
(the KEK itself is CKA_WRAP_WITH_TRUSTED). So ``cluster init``, ``join`` and ``approve`` log in
as SO; ticket keys are made, wrapped and unwrapped under the user login
(:class:`~authority.backends.pkcs11.Pkcs11Backend`).

PKCS#11 login is token-wide per application: an SO login is refused while the user is logged in
in the same process (CKR_USER_ANOTHER_ALREADY_LOGGED_IN), so close the process's backends on
this token first, or run the officer in its own process (SoftHSM2 keeps login state per process):
a server does the latter with :func:`~authority.backends.pkcs11.officer_process.run_officer`.

A member keeps its transport key pair in its token (``new_transport_key(persistent=True)``) so
that a replacement KEK (after a node is removed) can be delivered to it without a fresh join;
old KEKs are listed (:meth:`SecurityOfficer.kek_labels`) and destroyed
(:meth:`SecurityOfficer.destroy_kek`) once no stored blob names them.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11x

from authority.backends.pkcs11 import _wrap
from authority.backends.pkcs11._errors import Ctx, Phase, device_errors
from authority.backends.pkcs11._keys import AesKey
from authority.backends.pkcs11._module import REGISTRY
from authority.backends.pkcs11._rawck import RawToken
from authority.backends.pkcs11._template import MAPPER
from authority.backends.pkcs11._token import find_token
from authority.backends.pkcs11._wrap import (
    KEK_LABEL,
    OAEP_PARAMS,
    TRANSPORT_LABEL,
    TransportKey,
    WrappedKek,
)
from authority.config import Secret
from authority.errors import FailedPrecondition, InvalidArgument, StartupError

__all__ = ["SecurityOfficer", "TransportKey", "WrappedKek"]

log = logging.getLogger("authority.backends.pkcs11")


class SecurityOfficer:
    """An SO session on one token. Not thread-safe; use one per operation (a context manager).

    A transport key pair made by :meth:`new_transport_key` is made of session objects: it
    exists only while this officer is open, and :meth:`unwrap_kek` must be called on the same
    officer. One made with ``persistent=True`` is made of token objects found by its
    fingerprint: it outlives the officer, and any later officer on the token unwraps with it
    (``unwrap_kek(wrapped, label, fingerprint)``) until :meth:`drop_transport_key`.
    """

    def __init__(self, session: Any, rawtok: RawToken, label: str) -> None:
        """Use :meth:`open`."""
        self._session = session
        self._raw = rawtok
        self._label = label
        self._transport: AesKey | None = None
        self._persistent = False      # self._transport is a token object: never destroyed here
        self._closed = False

    @classmethod
    def open(cls, module: Path, softhsm2_conf: Path | None, token_label: str,
             so_pin: Secret) -> SecurityOfficer:
        """Load the module (``softhsm2_conf`` in force), find the token, open a RW session and
        log in as SO.

        Raises: StartupError (module, token or SO PIN refused: names pkcs11.so_pin, never the
        PIN); FailedPrecondition (the user is logged in to this token in this process).
        """
        mod = REGISTRY.acquire(module, softhsm2_conf)
        try:
            token = find_token(mod, token_label)
            with device_errors(Ctx(Phase.TOKEN, "SO login", subject=token_label)):
                try:
                    session = token.open(rw=True, so_pin=so_pin.reveal(),
                                         attribute_mapper=MAPPER)
                except (p11x.AnotherUserAlreadyLoggedIn, p11x.UserAlreadyLoggedIn) as exc:
                    raise FailedPrecondition(
                        f"token '{token_label}': the user is logged in in this process; close "
                        "its backend before logging in as security officer") from exc
                except (p11x.PinIncorrect, p11x.PinInvalid, p11x.PinLenRange,
                        p11x.PinLocked) as exc:
                    raise StartupError(f"pkcs11.so_pin: SO login to token '{token_label}' "
                                       f"refused ({type(exc).__name__})") from exc
            try:
                return cls(session, RawToken(mod.path), token_label)
            except BaseException:
                with suppress(p11x.PKCS11Error):
                    session.close()
                raise
        except BaseException:
            REGISTRY.release()
            raise

    def close(self) -> None:
        """Log out and close the session (its session objects, the transport keys, are gone).
        Never raises."""
        if self._closed:
            return
        self._closed = True
        with suppress(p11x.PKCS11Error):
            self._session.close()
        REGISTRY.release()

    def __enter__(self) -> SecurityOfficer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _ctx(self, what: str) -> Ctx:
        return Ctx(Phase.OPERATION, what, subject=self._label)

    # -- the KEK -----------------------------------------------------------------------------

    def make_kek(self, label: str = KEK_LABEL) -> None:
        """``cluster init``: generate the cluster KEK (AES-256, trusted, sensitive, wrap/unwrap
        only, extractable only under a trusted key, not modifiable, unwrapping only protected
        copies) and check what the token reports for it.

        Raises: FailedPrecondition (a KEK with this label exists); KeyProtectionError (the
        token refused the template or made a weaker key: destroyed); DeviceUnavailable.
        """
        with device_errors(self._ctx("make_kek")):
            _wrap.make_kek(self._raw, self._session, self._label, label)
        log.info("cluster KEK %r made in token '%s'", label, self._label)

    def has_kek(self, label: str = KEK_LABEL) -> bool:
        """Whether the token holds a secret key labelled ``label``. Raises: DeviceUnavailable."""
        with device_errors(self._ctx("has_kek")):
            return bool(list(self._session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})))

    def destroy_kek(self, label: str) -> bool:
        """Destroy the KEK labelled ``label`` (every secret key with that label); False if the
        token holds none. For an old KEK that no stored blob names any more.

        Raises: InvalidArgument (``label`` is not a KEK label: KEK_LABEL or KEK_LABEL + "-..."),
        DeviceUnavailable."""
        if not _wrap.is_kek_label(label):
            raise InvalidArgument("label", f"{label!r} is not a cluster KEK label "
                                  f"({KEK_LABEL!r} or {KEK_LABEL + '-'!r}...)")
        with device_errors(self._ctx("destroy_kek")):
            found = list(self._session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}))
            for kek in found:
                kek.destroy()
        if found:
            log.info("cluster KEK %r destroyed in token '%s'", label, self._label)
        return bool(found)

    def kek_labels(self) -> list[str]:
        """The labels of the cluster KEKs in the token (KEK_LABEL, and KEK_LABEL + "-..."
        for replacements), sorted. Raises: DeviceUnavailable."""
        with device_errors(self._ctx("kek_labels")):
            return _wrap.kek_labels(self._session)

    def wrap_kek_for(self, public_key_der: bytes, label: str = KEK_LABEL,
                     oaep_hashes: tuple[str, ...] = tuple(OAEP_PARAMS)) -> WrappedKek:
        """``cluster approve`` on a member: wrap the KEK to a joiner's transport public key
        (DER SubjectPublicKeyInfo, RSA-3072) with CKM_RSA_PKCS_OAEP, under the first of
        ``oaep_hashes`` the token takes (SHA-256, else SHA-1: SoftHSM2 does only SHA-1), MGF1
        with the same hash. The key is imported as a trusted session object and destroyed
        afterwards. Returns the 384-byte blob and the hash used.

        Raises: InvalidArgument (not an RSA-3072 public key with exponent 65537; an unknown
        hash); FailedPrecondition (no KEK; the token takes none of the hashes);
        DeviceUnavailable.
        """
        with device_errors(self._ctx("wrap_kek_for")):
            return _wrap.wrap_kek_for(self._session, public_key_der, label, oaep_hashes)

    # -- joining -----------------------------------------------------------------------------

    def new_transport_key(self, persistent: bool = False) -> TransportKey:
        """``cluster join``: make the transport key pair and return its public key and
        fingerprint. Session objects of this session by default (an earlier session pair of
        this officer is destroyed); with ``persistent``, token objects (public objects: an SO
        session sees only those; CKA_ID the fingerprint's 32 bytes; label TRANSPORT_LABEL)
        that outlive this officer. Either way :meth:`unwrap_kek` without a fingerprint uses
        this pair next.

        Raises: KeyProtectionError (the private key is weaker than required: the pair is
        destroyed); DeviceUnavailable.
        """
        self._drop_transport()
        make = _wrap.make_persistent_transport_pair if persistent else _wrap.make_transport_pair
        with device_errors(self._ctx("new_transport_key")):
            public, private = make(self._raw, self._session, self._label, TRANSPORT_LABEL)
        self._transport, self._persistent = private, persistent
        if persistent:
            log.info("persistent transport key %s made in token '%s'", public.fingerprint,
                     self._label)
        return public

    def has_transport_key(self, fingerprint: str) -> bool:
        """Whether the token holds a persistent transport private key with this fingerprint.

        Raises: InvalidArgument (not 64 hex digits); DeviceUnavailable."""
        with device_errors(self._ctx("has_transport_key")):
            return bool(_wrap.transport_objects(self._session, fingerprint,
                                                kind=ObjectClass.PRIVATE_KEY))

    def drop_transport_key(self, fingerprint: str) -> bool:
        """Destroy the persistent transport pair with this fingerprint (public and private
        objects); False if the token holds neither.

        Raises: InvalidArgument (not 64 hex digits); DeviceUnavailable (a destruction failed:
        what is left is still found by the fingerprint)."""
        with device_errors(self._ctx("drop_transport_key")):
            found = _wrap.transport_objects(self._session, fingerprint)
            for obj in found:
                if self._transport is not None and int(obj.handle) == int(
                        self._transport.handle):
                    self._transport, self._persistent = None, False
                obj.destroy()
        if found:
            log.info("persistent transport key %s destroyed in token '%s'", fingerprint,
                     self._label)
        return bool(found)

    def unwrap_kek(self, wrapped: WrappedKek, label: str = KEK_LABEL,
                   fingerprint: str | None = None) -> None:
        """``cluster join`` once approved, or a KEK delivered to a member: unwrap the KEK
        labelled ``label`` and check what the token reports for it. With ``fingerprint``, with
        the persistent transport private key of that fingerprint, which is kept; without, with
        this officer's transport key from :meth:`new_transport_key`, destroyed afterwards if it
        is a session pair (kept if persistent).

        Raises: FailedPrecondition (no such transport key; a KEK with this label exists; the
        token does not unwrap with OAEP under ``wrapped.oaep_hash``); InvalidArgument (unknown
        hash; a malformed fingerprint; a blob the token refuses: tampered, or wrapped to another
        transport key); KeyProtectionError (the copy is weaker than required: destroyed; or
        the persistent transport key is weaker than required: not used); DeviceUnavailable.
        """
        with device_errors(self._ctx("unwrap_kek")):
            if fingerprint is not None:
                private = _wrap.find_transport(self._session, fingerprint, self._label)
            elif self._transport is not None:
                private = self._transport
            else:
                raise FailedPrecondition("no transport key in this session: call "
                                         "new_transport_key, or name a persistent one")
            try:
                _wrap.unwrap_kek(self._raw, self._session, private, wrapped, self._label, label)
            except (*_wrap.BAD_BLOB, p11x.GeneralError) as exc:
                # SoftHSM2 2.6.1 answers CKR_GENERAL_ERROR for a blob failing OAEP decoding
                raise InvalidArgument("blob", f"the token refused it ({type(exc).__name__}): "
                                      "tampered, or wrapped to another transport key") from exc
        if fingerprint is None:
            self._drop_transport()
        log.info("cluster KEK %r unwrapped into token '%s'", label, self._label)

    def _drop_transport(self) -> None:
        """Forget this officer's transport key; destroy it if it is a session pair. Never
        raises."""
        if self._transport is not None and not self._persistent:
            with suppress(p11x.PKCS11Error):
                self._transport.destroy()
        self._transport, self._persistent = None, False

    # -- reading -----------------------------------------------------------------------------

    def kek_attributes(self, label: str = KEK_LABEL) -> dict[str, bool]:
        """The KEK's protection attributes as the token reports them (never CKA_VALUE).

        Raises: FailedPrecondition (no KEK); DeviceUnavailable."""
        with device_errors(self._ctx("kek_attributes")):
            return _wrap.protection(_wrap.find_kek(self._session, label))

    def transport_attributes(self, fingerprint: str | None = None) -> dict[str, bool]:
        """The transport private key's protection attributes as the token reports them: this
        officer's, or the persistent one of ``fingerprint``.

        Raises: FailedPrecondition (none in this session; no persistent key of that
        fingerprint); InvalidArgument (a malformed fingerprint); DeviceUnavailable."""
        with device_errors(self._ctx("transport_attributes")):
            if fingerprint is not None:
                found = _wrap.transport_objects(self._session, fingerprint,
                                                kind=ObjectClass.PRIVATE_KEY)
                if len(found) != 1:
                    raise FailedPrecondition(f"{len(found)} persistent transport keys with "
                                             f"fingerprint {fingerprint}")
                return _wrap.protection(found[0])
            if self._transport is None:
                raise FailedPrecondition("no transport key in this session")
            return _wrap.protection(self._transport)
