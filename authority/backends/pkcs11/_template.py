"""Making a ticket key: the template asked of the token, what may be left out, what is checked.

Tokens differ in the attributes they accept (PKCS#11 v2.40 5.14, C_GenerateKey): one that does
not know an attribute answers CKR_ATTRIBUTE_TYPE_INVALID, CKR_ATTRIBUTE_VALUE_INVALID,
CKR_TEMPLATE_INCONSISTENT or only CKR_GENERAL_ERROR. So:

* :data:`REQUIRED` is never left out. A token that refuses it is named with the attribute it
  refused (found by adding the attributes to a minimal template one at a time).
* :data:`OPTIONAL` attributes are left out, the fewest first, when the token refuses the
  template: CKA_ALLOWED_MECHANISMS (only AES-GCM: the key cannot be used with another
  mechanism), CKA_COPYABLE false (no copies), CKA_DESTROYABLE true (retirement can destroy the
  key). None of them keeps the key's value inside the token; a token that refuses them does
  not enforce them anyway. Which were left out is logged.
* Whatever was asked, the key is then read back (:func:`_check`): sensitive, always sensitive,
  not extractable, never extractable, not modifiable, private, usable for encrypt and decrypt
  only, AES of 32 octets, our id and label, and not marked indestructible. Otherwise the key is
  destroyed and the token refused (:class:`KeyProtectionError` naming pkcs11.module).

Every function here takes a python-pkcs11 session opened with :data:`MAPPER`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from contextlib import suppress
from itertools import combinations
from typing import Any, Final

from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x
from pkcs11.attributes import AttributeMapper

from authority.backends.pkcs11._errors import TEMPLATE_REFUSALS, refusal_code
from authority.backends.pkcs11._keys import AesKey, key_label
from authority.errors import KeyProtectionError

log = logging.getLogger("authority.backends.pkcs11")

KEY_BYTES: Final = 32
_ULONG: Final = struct.Struct("L")  # CK_ULONG, as python-pkcs11 packs it
_REFUSALS: Final = tuple(TEMPLATE_REFUSALS)

#: the only mechanism the backend uses a ticket key with (seal and unseal)
MECHANISMS: Final = [Mechanism.AES_GCM]


def _pack_mechanisms(mechanisms: list[Mechanism]) -> bytes:
    """CKA_ALLOWED_MECHANISMS: an array of CK_MECHANISM_TYPE (CK_ULONG)."""
    return b"".join(_ULONG.pack(int(m)) for m in mechanisms)


def _unpack_mechanisms(raw: bytes) -> list[Mechanism | int]:
    """The array back (a vendor mechanism stays a number; a trailing partial CK_ULONG is
    ignored). Never raises."""
    return [_mechanism(v) for (v,) in _ULONG.iter_unpack(raw[:len(raw) - len(raw) % _ULONG.size])]


def _mechanism(value: int) -> Mechanism | int:
    try:
        return Mechanism(value)
    except ValueError:
        return value


def _mapper() -> AttributeMapper:
    mapper = AttributeMapper()
    # python-pkcs11 (0.10) has no handler for CKA_ALLOWED_MECHANISMS
    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, _pack_mechanisms, _unpack_mechanisms)
    return mapper


#: the attribute mapper of every backend session (read-only once built: shared)
MAPPER: Final = _mapper()

#: attributes python-pkcs11's generate_key adds by itself; each one we do not ask for is
#: removed (``DEFAULT``), so that the token gets exactly the template we mean
_LIBRARY_DEFAULTS: Final = frozenset(
    AttributeMapper().secret_key_template(capabilities=0, id_=b"-", label="-", store=True)
)


def required(key_id: bytes) -> dict[Attribute, Any]:
    """The template no ticket key is made without, in the order a refusal is looked for
    (CKA_VALUE_LEN comes with the key length; CKM_AES_KEY_GEN contributes CKA_KEY_TYPE)."""
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.ID: key_id,
        Attribute.LABEL: key_label(key_id),
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
    }


#: asked for, left out if the token refuses them; in order of preference
OPTIONAL: Final[dict[Attribute, Any]] = {
    Attribute.ALLOWED_MECHANISMS: MECHANISMS,
    Attribute.COPYABLE: False,
    Attribute.DESTROYABLE: True,
}

#: what the token must report for a key made from the template, besides the template itself
_IMPLIED: Final[dict[Attribute, Any]] = {
    Attribute.KEY_TYPE: KeyType.AES,
    Attribute.VALUE_LEN: KEY_BYTES,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.NEVER_EXTRACTABLE: True,
}


def create(session: Any, key_id: bytes, token: str) -> None:
    """Generate the ticket key ``key_id``: the full template, else without the fewest optional
    attributes the token refuses; then check what the token reports for it.

    Raises: KeyProtectionError (a required attribute refused, or the key made is not as
    required: it is destroyed); PKCS11Error subclasses (the device failed, or refused even a
    minimal template: not a template matter).
    """
    asked = required(key_id)
    first: p11x.PKCS11Error | None = None
    for optional in _optional_sets():
        try:
            key = _generate(session, {**asked, **optional})
        except _REFUSALS as exc:
            first = first or exc
            continue
        reported = _check(key, {**asked, **optional}, token)
        _log_optional(token, key_id, first, optional, reported)
        return
    assert first is not None  # the last set is empty: every attempt was refused
    raise _diagnose(session, asked, token, first)


def _log_optional(token: str, key_id: bytes, refused: p11x.PKCS11Error | None,
                  sent: dict[Attribute, Any], reported: dict[Attribute, Any]) -> None:
    """Warn when the key was made without optional attributes, or the token reports them
    otherwise than asked. Never raises."""
    if refused is None and all(reported.get(a) == v for a, v in OPTIONAL.items()):
        return
    shown = ", ".join(f"{_name(a)}={_show(reported[a])}" if a in reported
                      else f"{_name(a)} not reported" for a in OPTIONAL)
    if refused is not None:
        dropped = ", ".join(_name(a) for a in OPTIONAL if a not in sent)
        log.warning("token '%s' refused the key template (%s): key %s made without the "
                    "optional %s; it reports %s", token, refusal_code(refused), key_id.hex(),
                    dropped, shown)
    else:
        log.warning("token '%s' accepted the key template but reports for key %s: %s",
                    token, key_id.hex(), shown)


def _optional_sets() -> Iterator[dict[Attribute, Any]]:
    """Every subset of :data:`OPTIONAL`, the largest first (the empty one last)."""
    for size in range(len(OPTIONAL), -1, -1):
        for chosen in combinations(OPTIONAL, size):
            yield {attr: OPTIONAL[attr] for attr in chosen}


def _generate(session: Any, template: dict[Attribute, Any]) -> AesKey:
    """C_GenerateKey (CKM_AES_KEY_GEN, CKA_VALUE_LEN 32) with exactly ``template``.

    Raises: PKCS11Error subclasses.
    """
    sent: dict[Attribute, Any] = dict.fromkeys(_LIBRARY_DEFAULTS, DEFAULT)
    sent.update(template)
    key: AesKey = session.generate_key(KeyType.AES, KEY_BYTES * 8, template=sent)
    return key


def _diagnose(session: Any, asked: dict[Attribute, Any], token: str,
              refused: p11x.PKCS11Error) -> Exception:
    """The required attribute the token refuses: add them one at a time to a minimal template
    (CKA_VALUE_LEN only) until a generation fails. Each key made on the way is destroyed at
    once (it is never used). If even the minimal template fails, or none does, the device
    is failing: ``refused`` is returned as it is.

    Raises: PKCS11Error subclasses other than refusals.
    """
    template: dict[Attribute, Any] = {}
    for attr in [None, *asked]:
        if attr is not None:
            template[attr] = asked[attr]
        try:
            probe = _generate(session, template)
        except _REFUSALS as exc:
            if attr is None:
                return refused
            return KeyProtectionError(f"pkcs11.module: token '{token}' refused the key "
                                      f"template: {_name(attr)} ({refusal_code(exc)})")
        probe.destroy()
    return refused


def _check(key: AesKey, asked: dict[Attribute, Any], token: str) -> dict[Attribute, Any]:
    """Read back what the token reports for the key just made; destroy it unless it is as
    asked (and sensitive and never extractable since made) and not marked indestructible.
    Returns the :data:`OPTIONAL` attributes it reports.

    Raises: KeyProtectionError; PKCS11Error subclasses (the key is destroyed first).
    """
    optional: dict[Attribute, Any] = {}

    def problems() -> list[str]:
        found, reported = _problems(key, asked)
        optional.update(reported)
        return found

    destroy_if_weaker(key, "created a key", token, problems, "the key")
    return optional


def destroy_if_weaker(obj: Any, made: str, token: str, check: Callable[[], list[str]],
                      subject: str = "it") -> None:
    """Run ``check`` (what ``obj``, just made, lacks of the protection required); if it found
    anything, destroy ``obj`` and raise "token T ``made`` without the required protection".
    Raises: KeyProtectionError; what ``check`` raises (``obj`` is destroyed first)."""
    try:
        found = check()
    except BaseException:
        with suppress(p11x.PKCS11Error):
            obj.destroy()
        raise
    if found:
        raise refusal(obj, made, token, found, subject)


def refusal(obj: Any, made: str, token: str, found: list[str],
            subject: str = "it") -> KeyProtectionError:
    """Destroy ``obj`` (weaker than required: ``found``) and return the error to raise, which
    says whether the destruction worked. Never raises."""
    try:
        obj.destroy()
        fate = f"{subject} was destroyed"
    except p11x.PKCS11Error as exc:
        fate = f"destroying it failed ({type(exc).__name__}): remove it with the token's tools"
    return KeyProtectionError(f"pkcs11.module: token '{token}' {made} without the required "
                              f"protection: {', '.join(found)}; {fate}")


def _problems(key: AesKey, asked: dict[Attribute, Any]
              ) -> tuple[list[str], dict[Attribute, Any]]:
    """What the key lacks (each required or implied attribute not reported as asked, and
    CKA_DESTROYABLE reported false), and the optional attributes it reports.

    Raises: PKCS11Error subclasses."""
    must = {attr: value for attr, value in asked.items() if attr not in OPTIONAL}
    must.update(_IMPLIED)
    reported = key.get_attributes(list(must))
    problems = [_differs(attr, value, reported) for attr, value in must.items()
                if reported.get(attr) != value]
    optional = _read_optional(key)
    if optional.get(Attribute.DESTROYABLE) is False:
        problems.append("CKA_DESTROYABLE is false (it could never be retired)")
    return problems, optional


def _read_optional(key: AesKey) -> dict[Attribute, Any]:
    """The :data:`OPTIONAL` attributes the token reports, one call each (a token may fail a
    whole C_GetAttributeValue for one attribute it does not know). Never raises for a device
    error."""
    found: dict[Attribute, Any] = {}
    for attr in OPTIONAL:
        with suppress(p11x.PKCS11Error):
            found.update(key.get_attributes([attr]))
    return found


def _differs(attr: Attribute, wanted: Any, reported: dict[Attribute, Any]) -> str:
    if attr not in reported:
        return f"{_name(attr)} not reported (must be {_show(wanted)})"
    return f"{_name(attr)} is {_show(reported[attr])} (must be {_show(wanted)})"


def _name(attr: Attribute) -> str:
    return f"CKA_{attr.name}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mechanism):
        return f"CKM_{value.name}"
    if isinstance(value, (KeyType, ObjectClass)):
        return value.name
    return str(value)
