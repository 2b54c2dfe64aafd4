"""Ticket keys as token objects: ids, labels, lookup and attributes (the generation template
is in _template.py).

Every function here takes a python-pkcs11 session and raises python-pkcs11 exceptions (the
caller translates them, _errors.translate).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, Protocol, cast

from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import ObjectHandleInvalid

from authority.errors import InvalidArgument

log = logging.getLogger("authority.backends.pkcs11")

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


def list_ids(session: Any, per_node: bool | None) -> set[bytes]:
    """Ids of every secret key labelled ``ita-...`` that the backend may use (``refused``:
    the others are logged and left out); with ``per_node`` None, of every such key. A key
    destroyed between the search and the reading of its attributes (by another session or
    process sharing the token: a replica discarding the key of a rotation it lost) is not
    listed.

    Raises: PKCS11Error subclasses."""
    ids: set[bytes] = set()
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        try:
            attrs = obj.get_attributes([Attribute.LABEL, Attribute.ID])
            if not str(attrs.get(Attribute.LABEL, "")).startswith(KEY_LABEL_PREFIX):
                continue
            key_id = bytes(attrs.get(Attribute.ID, b""))
            if per_node is None or refused(obj, key_id, per_node) is None:
                ids.add(key_id)
        except ObjectHandleInvalid:
            continue   # gone meanwhile
    return ids


#: the keys this process refused, each logged once
_REFUSED: set[bytes] = set()


def use_problems(values: Mapping[Attribute, Any], per_node: bool) -> list[str]:
    """Why a ticket key whose token reports ``values`` must not be used (empty: it may). It
    must be sensitive, and not extractable unless only under a trusted wrapping key (a
    per-node original); unless it may be an unwrapped copy (``per_node``: per-node tokens), it
    must also be always sensitive and never extractable, as create() requires of a new key
    (_template.py): a key whose value was ever known outside the token is neither."""
    problems = []
    if values.get(Attribute.SENSITIVE) is not True:
        problems.append("CKA_SENSITIVE is false")
    trusted_only = per_node and values.get(Attribute.WRAP_WITH_TRUSTED) is True
    if values.get(Attribute.EXTRACTABLE) is not False and not trusted_only:
        problems.append("CKA_EXTRACTABLE is true"
                        + (" without CKA_WRAP_WITH_TRUSTED" if per_node else ""))
    if not per_node:
        problems += [f"{name} is false" for name, attr in
                     (("CKA_ALWAYS_SENSITIVE", Attribute.ALWAYS_SENSITIVE),
                      ("CKA_NEVER_EXTRACTABLE", Attribute.NEVER_EXTRACTABLE))
                     if values.get(attr) is not True]
    return problems


def refused(key: AesKey, key_id: bytes, per_node: bool) -> list[str] | None:
    """What the token reports for ``key`` that the backend does not use a ticket key with
    (``use_problems``), logged at ERROR the first time this process finds it; None when it
    may be used. Raises: PKCS11Error subclasses."""
    wanted = [Attribute.SENSITIVE, Attribute.EXTRACTABLE]
    wanted += ([Attribute.WRAP_WITH_TRUSTED] if per_node
               else [Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE])
    problems = use_problems(key.get_attributes(wanted), per_node)
    if not problems:
        return None
    if key_id not in _REFUSED:
        _REFUSED.add(key_id)
        log.error("pkcs11 key %s refused, never used: %s. Not a key the authority made (put "
                  "into the token by a PIN holder, with a value known outside it?): tickets "
                  "under it are INVALID, and the key ring no longer finds it in the device (a "
                  "sealing key is replaced, any other becomes MISSING)", key_id.hex(),
                  ", ".join(problems))
    return problems


def protection_attributes(key: AesKey) -> dict[str, bool]:
    """The key's :data:`ATTRIBUTES` as the token reports them. Raises: PKCS11Error subclasses."""
    values = key.get_attributes(list(ATTRIBUTES.values()))
    return {name: bool(values.get(attr, False)) for name, attr in ATTRIBUTES.items()}
