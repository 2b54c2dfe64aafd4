"""Finding the token: every initialised token of the module, the one with our label, and the
checks made before logging in to it."""

from __future__ import annotations

from typing import Any

from pkcs11 import Mechanism, TokenFlag

from authority.backends.pkcs11._errors import Ctx, Phase, device_errors
from authority.backends.pkcs11._module import Module
from authority.errors import StartupError


def tokens(module: Module) -> list[Any]:
    """Every initialised token present. Raises: PKCS11Error subclasses."""
    found = []
    for slot in module.lib.get_slots(token_present=True):
        token = slot.get_token()
        if token.flags & TokenFlag.TOKEN_INITIALIZED:
            found.append(token)
    return found


def find_token(module: Module, label: str) -> Any:
    """The one token labelled ``label``. Raises: StartupError naming pkcs11.token_label."""
    with device_errors(Ctx(Phase.TOKEN, "listing tokens", subject=label)):
        found = tokens(module)
    matches = [t for t in found if t.label == label]
    if len(matches) == 1:
        return matches[0]
    present = ", ".join(repr(t.label) for t in found) or "none"
    if not matches:
        raise StartupError(
            f"pkcs11.token_label: no token labelled {label!r} in {module.path}; "
            f"tokens present: {present}"
        )
    raise StartupError(f"pkcs11.token_label: {len(matches)} tokens labelled {label!r}")


def check_mechanisms(token: Any, label: str) -> None:
    """Refuse a token without AES key generation or AES-GCM. Raises: StartupError."""
    with device_errors(Ctx(Phase.TOKEN, "listing mechanisms", subject=label)):
        mechanisms = set(token.slot.get_mechanisms())
    missing = {Mechanism.AES_KEY_GEN, Mechanism.AES_GCM} - mechanisms
    if missing:
        names = ", ".join(sorted(m.name for m in missing))
        raise StartupError(f"pkcs11.token_label: token {label!r} lacks {names}")


def free_slot_id(module: Module) -> int:
    """Slot id of a present but uninitialised token. Raises: StartupError, PKCS11Error."""
    for slot in module.lib.get_slots(token_present=True):
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED:
            return int(slot.slot_id)
    raise StartupError(f"pkcs11.token_label: {module.path} has no free slot to initialise")


def check_pin_flags(token: Any, label: str) -> None:
    """Refuse a locked or never-set user PIN before trying it. Raises: StartupError."""
    flags = token.flags
    if flags & TokenFlag.USER_PIN_LOCKED:
        raise StartupError(f"pkcs11.pin: login to token '{label}' refused: PIN locked")
    if not flags & TokenFlag.USER_PIN_INITIALIZED:
        raise StartupError(
            f"pkcs11.pin: login to token '{label}' refused: the token has no user PIN set"
        )

