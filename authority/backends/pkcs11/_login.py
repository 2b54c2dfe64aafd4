"""Opening the sessions of one backend under the token-wide user login.

``C_Login`` is token-wide: the first session logs in, the others open already logged in. Several
backends in one process may rely on the same login (the registry counts them); the last one to
close logs out.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from pkcs11 import exceptions as p11x

from authority.backends.pkcs11._cryptoki import CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS
from authority.backends.pkcs11._errors import Ctx, Phase, device_errors
from authority.backends.pkcs11._gcm import GcmSession
from authority.backends.pkcs11._module import REGISTRY, Module
from authority.backends.pkcs11._pool import PooledSession
from authority.backends.pkcs11._template import MAPPER
from authority.config import Secret


class TokenLogin:
    """Opens logged-in RW sessions on one token for one backend."""

    def __init__(self, module: Module, token: Any, label: str, pin: Secret,
                 release_gil: bool = True, per_node_keys: bool = False) -> None:
        self._module = module
        self._release_gil = release_gil
        self._per_node_keys = per_node_keys
        self._token = token
        self._label = label
        self._pin = pin
        self._slot_id = int(token.slot.slot_id)
        self._logged_in = False

    def open_session(self) -> PooledSession:
        """Open a RW session; log in if the token is not logged in (first one, or all lost).

        Raises: StartupError for a refused login before the first success, else
        DeviceUnavailable.
        """
        phase = Phase.OPERATION if self._logged_in else Phase.LOGIN
        with device_errors(Ctx(phase, "opening a session", subject=self._label)):
            session = self._token.open(rw=True, attribute_mapper=MAPPER)
            try:
                handle = int(session.handle)
                self._ensure_login(handle)
            except BaseException:
                with suppress(p11x.PKCS11Error):
                    session.close()
                raise
        if not self._logged_in:
            self._logged_in = True
            REGISTRY.note_login(self._slot_id)
        gcm = GcmSession(self._module.ck, handle, self._release_gil)
        return PooledSession(session, gcm, handle, per_node=self._per_node_keys)

    def release(self, idle: list[PooledSession]) -> None:
        """This backend stops relying on the login; log out (through one of ``idle``) if it was
        the last in the process. Device errors are ignored (the token may be gone)."""
        if self._logged_in and REGISTRY.drop_login(self._slot_id) and idle:
            with suppress(p11x.PKCS11Error):
                self._module.ck.logout(idle[0].handle)
        self._logged_in = False

    def _ensure_login(self, handle: int) -> None:
        """C_Login on ``handle`` unless the token already is. Raises: PKCS11Error subclasses."""
        state = self._module.ck.session_state(handle)
        if state in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS):
            return
        with suppress(p11x.UserAlreadyLoggedIn):
            self._module.ck.login_user(handle, self._pin)
