"""Provisioning: initialise a token in-process (C_InitToken, C_InitPIN), PINs only in memory.

softhsm2-util cannot do this without a terminal (it reads PINs from the tty only), so the
embedded SoftHSM2 token (authority.backends.softhsm) is initialised here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pkcs11 import TokenFlag

from authority.backends.pkcs11._cryptoki import TOKEN_LABEL_MAX
from authority.backends.pkcs11._errors import Ctx, Phase, device_errors
from authority.backends.pkcs11._module import REGISTRY
from authority.backends.pkcs11._token import free_slot_id, tokens
from authority.config import Secret
from authority.errors import StartupError

log = logging.getLogger("authority.backends.pkcs11")


def initialize_token_if_missing(
    module: Path, softhsm2_conf: Path | None, label: str, so_pin: Secret, user_pin: Secret
) -> bool:
    """Initialise a free slot's token as ``label`` with these PINs unless such a token exists.

    For the embedded SoftHSM2 token (authority.backends.softhsm); PINs travel only in memory.
    Also sets the user PIN of an existing token whose user PIN was never set. Returns True if
    it initialised something.
    Raises: StartupError (module unusable, no free slot, label too long, device refusal).
    """
    if not label or len(label.encode("utf-8")) > TOKEN_LABEL_MAX:
        raise StartupError("pkcs11.token_label: must be 1 to 32 bytes of UTF-8")
    mod = REGISTRY.acquire(module, softhsm2_conf)
    try:
        with device_errors(Ctx(Phase.PROVISION, "initialise", subject=label)):
            existing = [t for t in tokens(mod) if t.label == label]
            if existing and existing[0].flags & TokenFlag.USER_PIN_INITIALIZED:
                return False
            if not existing:
                mod.ck.init_token(free_slot_id(mod), so_pin, label)
            token = next((t for t in tokens(mod) if t.label == label), None)
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
        REGISTRY.release()

