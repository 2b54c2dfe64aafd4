"""Ticket keys as token objects: ids, labels, lookup and attributes (the generation template
is in _template.py).

Every function here takes a python-pkcs11 session and raises python-pkcs11 exceptions (the
caller translates them, _errors.translate).
"""

from __future__ import annotations

from typing import Any, Final, Protocol, cast

from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import ObjectHandleInvalid

from authority.errors import InvalidArgument

KEY_LABEL_PREFIX: Final = "ita-"
KEY_ID_LEN: Final = 8

#: the protection attributes key_attributes reports, by their names in the KeyBackend protocol
ATTRIBUTES: Final[dict[str, Attribute]] = {
    "sensitive": Attribute.SENSITIVE,
    "extractable": Attribute.EXTRACTABLE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "token": Attribute.TOKEN,
    "private": Attribute.PRIVATE,
    "encrypt": Attribute.ENCRYPT,
    "decrypt": Attribute.DECRYPT,
    "wrap": Attribute.WRAP,
    "unwrap": Attribute.UNWRAP,
    "sign": Attribute.SIGN,
    "derive": Attribute.DERIVE,
    "modifiable": Attribute.MODIFIABLE,
}


class AesKey(Protocol):
    """The part of a python-pkcs11 secret key object we use."""

    handle: int

    def get_attributes(self, keys: list[Attribute]) -> dict[Attribute, Any]: ...
    def destroy(self) -> None: ...


def key_label(key_id: bytes) -> str:
    """The CKA_LABEL of the ticket key ``key_id``."""
    return KEY_LABEL_PREFIX + key_id.hex()


def valid_id(key_id: bytes) -> bool:
    return isinstance(key_id, bytes) and len(key_id) == KEY_ID_LEN


def check_key_id(key_id: bytes) -> None:
    """Raises: InvalidArgument unless ``key_id`` is 8 bytes."""
    if not valid_id(key_id):
        raise InvalidArgument("key_id", f"must be {KEY_ID_LEN} bytes")


def search(session: Any, key_id: bytes, by_label_only: bool) -> list[AesKey]:
    """Secret keys with our label for ``key_id`` (and, unless ``by_label_only``, any secret key
    with that CKA_ID). Finding costs about 0.2 ms in SoftHSM2 (it rescans its token files).

    Raises: PKCS11Error subclasses.
    """
    by_label = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.LABEL: key_label(key_id),
        Attribute.ID: key_id,
    }
    found = {int(o.handle): o for o in session.get_objects(by_label)}
    if not by_label_only:
        by_id = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id}
        found.update({int(o.handle): o for o in session.get_objects(by_id)})
    return [cast(AesKey, o) for o in found.values()]


def list_ids(session: Any) -> set[bytes]:
    """Ids of every secret key labelled ``ita-...``. A key destroyed between the search and the
    reading of its attributes (by another session or process sharing the token: a replica
    discarding the key of a rotation it lost) is not listed.

    Raises: PKCS11Error subclasses."""
    ids: set[bytes] = set()
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        try:
            attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
        except ObjectHandleInvalid:
            continue   # gone meanwhile
        if str(attrs.get(Attribute.LABEL, "")).startswith(KEY_LABEL_PREFIX):
            ids.add(bytes(attrs.get(Attribute.ID, b"")))
    return ids


def protection_attributes(key: AesKey) -> dict[str, bool]:
    """The key's :data:`ATTRIBUTES` as the token reports them. Raises: PKCS11Error subclasses."""
    values = key.get_attributes(list(ATTRIBUTES.values()))
    return {name: bool(values.get(attr, False)) for name, attr in ATTRIBUTES.items()}
