"""The one translation of python-pkcs11 exceptions into the authority's errors.

Every device error of the package, whether python-pkcs11 raised it or our ctypes calls did
(_cryptoki.rv_error gives those the same classes), is interpreted by :func:`translate` and nowhere
else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Final

from pkcs11 import exceptions as p11x

from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    KeyNotFound,
    StartupError,
    UnsealFailed,
)


class Phase(Enum):
    """Where a device error happened; decides what it means to the caller."""

    MODULE = "module"        # loading/initialising the shared library
    TOKEN = "token"  # noqa: S105 - finding the token, opening the first sessions
    LOGIN = "login"          # C_Login at start-up
    PROVISION = "provision"  # initialising a token (embedded SoftHSM)
    OPERATION = "operation"  # any call while serving
    DECRYPT = "decrypt"      # the GCM decrypt of unseal


@dataclass(frozen=True)
class Ctx:
    """What was being done, for the error message and mapping."""

    phase: Phase
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


#: what a token answers C_GenerateKey when it refuses the template (PKCS#11 v2.40 5.14): an
#: attribute it does not know, a value it does not take, a combination it does not allow; some
#: tokens say only CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED. Named by their CKR code.
TEMPLATE_REFUSALS: Final[dict[type[p11x.PKCS11Error], str]] = {
    p11x.AttributeReadOnly: "CKR_ATTRIBUTE_READ_ONLY",
    p11x.AttributeTypeInvalid: "CKR_ATTRIBUTE_TYPE_INVALID",
    p11x.AttributeValueInvalid: "CKR_ATTRIBUTE_VALUE_INVALID",
    p11x.TemplateIncomplete: "CKR_TEMPLATE_INCOMPLETE",
    p11x.TemplateInconsistent: "CKR_TEMPLATE_INCONSISTENT",
    p11x.GeneralError: "CKR_GENERAL_ERROR",
    p11x.FunctionFailed: "CKR_FUNCTION_FAILED",
}


def refusal_code(exc: p11x.PKCS11Error) -> str | None:
    """The CKR name of ``exc`` if a token may mean by it that it refuses a key template, else
    None (a device, session or login failure). Never raises."""
    return TEMPLATE_REFUSALS.get(type(exc))


def _name(exc: BaseException) -> str:
    """Short description of a device exception (its class, and its text if it has one)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def translate(exc: p11x.PKCS11Error, ctx: Ctx) -> Exception:
    """Return the authority error for a python-pkcs11 exception raised during ``ctx``.

    The only place device errors are interpreted. Start-up phases give StartupError naming the
    setting; serving gives KeyNotFound, UnsealFailed, FailedPrecondition or DeviceUnavailable.
    For an ambiguous decrypt failure (a bad GCM tag is CKR_GENERAL_ERROR in SoftHSM2, as a
    device fault could be) the session is probed: alive means the blob failed authentication.
    """
    if ctx.phase is Phase.MODULE:
        return StartupError(f"pkcs11.module: cannot use {ctx.subject}: {_name(exc)}")
    if ctx.phase is Phase.LOGIN and type(exc) in _PIN_PROBLEMS:
        problem = _PIN_PROBLEMS[type(exc)]
        return StartupError(f"pkcs11.pin: login to token '{ctx.subject}' refused: {problem}")
    if ctx.phase in (Phase.TOKEN, Phase.LOGIN, Phase.PROVISION):
        return StartupError(
            f"pkcs11.token_label: {ctx.what} on token '{ctx.subject}' failed: {_name(exc)}"
        )
    if isinstance(exc, _KEY_GONE) and ctx.key_id is not None:
        return KeyNotFound(ctx.key_id)
    if ctx.phase is Phase.DECRYPT and isinstance(exc, _AMBIGUOUS_DECRYPT):
        if ctx.probe is not None and ctx.probe():
            return UnsealFailed()
        return DeviceUnavailable(f"pkcs11 {ctx.what}: device failed ({_name(exc)})")
    if isinstance(exc, p11x.MultipleObjectsReturned):
        return FailedPrecondition(f"pkcs11 {ctx.what}: several objects match ({_name(exc)})")
    return DeviceUnavailable(f"pkcs11 {ctx.what} failed: {_name(exc)}")


@contextmanager
def device_errors(ctx: Ctx) -> Iterator[None]:
    """Run a block of device calls, translating python-pkcs11 exceptions via :func:`translate`.

    Raises: whatever translate returns for a PKCS11Error raised inside the block.
    """
    try:
        yield
    except p11x.PKCS11Error as exc:
        raise translate(exc, ctx) from exc
