"""Ticket keys copied between tokens under a cluster key-encryption key (KEK), never in clear.

The PKCS#11 pieces (v2.40), each read back from the token after it is made:

* The KEK: AES-256 token object, sensitive, wrap/unwrap only, CKA_TRUSTED true (so that it may
  wrap keys marked CKA_WRAP_WITH_TRUSTED), itself extractable only under a trusted key
  (CKA_WRAP_WITH_TRUSTED true: a new member can receive it, wrapped to its transport key), not
  modifiable, and carrying CKA_UNWRAP_TEMPLATE :data:`COPY` so that whatever it unwraps is a
  private, sensitive, non-extractable, non-modifiable encrypt/decrypt token key.
  Only the security officer (SO) may set CKA_TRUSTED, and an SO session reads and writes public
  objects only (PKCS#11 v2.40 5.x session states), so the KEK is made in an SO session as a
  public object (CKA_PRIVATE false); the user reads it (to wrap and unwrap ticket keys) but can
  neither read its value, nor change it, nor wrap it under a key of their own.
* The transport key pair of a joining member: RSA-3072 session objects of the joiner's SO
  session (the KEK it receives must be trusted, which only the SO can make), the private key
  sensitive, never extractable, unwrap only, and with a CKA_UNWRAP_TEMPLATE that admits only a
  KEK made as above. Its public key leaves as DER SubjectPublicKeyInfo with a SHA-256
  fingerprint that an operator compares out of band. A member keeps its pair persistently
  (KEK replacement delivers a new KEK to it without a fresh join): the same pair as TOKEN
  objects, public ones (an SO session sees only those), CKA_ID the 32 bytes of the
  fingerprint, not modifiable where the token takes it (:func:`make_persistent_transport_pair`).
* Ticket keys of this mode: sensitive, extractable only under a trusted key
  (CKA_WRAP_WITH_TRUSTED), encrypt/decrypt only; wrapped under the KEK with CKM_AES_KEY_WRAP
  (RFC 3394): a 32-byte key gives a 40-byte blob, deterministic, integrity-checked by unwrap.

SoftHSM2 2.6.1 (read in its source, checked by tests/test_pkcs11_wrap.py):

* C_UnwrapKey checks CKA_UNWRAP_TEMPLATE instead of merging it: each of its attributes must be
  in the caller's template with the same value, else CKR_TEMPLATE_INCONSISTENT. So every
  unwrap here sends the whole template.
* It applies a template in order, and once CKA_MODIFIABLE false is applied it refuses every
  later attribute of an unwrap with CKR_ATTRIBUTE_READ_ONLY. CKA_MODIFIABLE is sent last.
* CKA_VALUE_LEN, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE may not be given to an unwrap
  (CKR_ATTRIBUTE_READ_ONLY; the standard says so too), and an unwrapped AES key reports
  CKA_VALUE_LEN 0. A copy whose token reports no length is accepted only because RFC 3394
  unwrap of a 40-byte blob yields exactly 32 bytes.

Every function takes a python-pkcs11 session opened with _template.MAPPER and raises
python-pkcs11 exceptions (the caller translates them) unless it says otherwise.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11x

from authority.backends.pkcs11._errors import TEMPLATE_REFUSALS
from authority.backends.pkcs11._keys import AesKey, key_label
from authority.backends.pkcs11._rawck import RawToken, Template, Value, encode
from authority.backends.pkcs11._template import _pack_mechanisms, destroy_if_weaker, refusal
from authority.errors import FailedPrecondition, InvalidArgument, KeyProtectionError

log = logging.getLogger("authority.backends.pkcs11")

KEK_LABEL: Final = "ticket-authority-kek"
KEK_ID: Final = b"cluster-kek"
TRANSPORT_LABEL: Final = "ticket-authority-transport"
RSA_BITS: Final = 3072
RSA_EXPONENT: Final = 65537
KEY_BYTES: Final = 32
#: RFC 3394 output for a 32-byte key: the 8-byte integrity block plus the key
BLOB_BYTES: Final = KEY_BYTES + 8
WRAP_MECHANISM: Final = Mechanism.AES_KEY_WRAP
#: RSA-OAEP parameters by hash name, the preferred first. SoftHSM2 (2.6.1, and its master
#: branch) wraps and unwraps with OAEP only with SHA-1 and MGF1-SHA-1 (MechParamCheckRSAPKCSOAEP:
#: CKR_ARGUMENTS_BAD for anything else); OAEP's security does not rest on SHA-1's collision
#: resistance, and the fallback is taken only when the token refuses SHA-256.
OAEP_PARAMS: Final = {"sha256": (Mechanism.SHA256, MGF.SHA256, None),
                      "sha1": (Mechanism.SHA_1, MGF.SHA1, None)}
#: what a token answers for OAEP parameters it does not take
_PARAM_REFUSALS: Final = (p11x.ArgumentsBad, p11x.MechanismParamInvalid)
_REFUSALS: Final = tuple(TEMPLATE_REFUSALS)

Pairs = list[tuple[Attribute, Any]]

_NO_USE: Final[Pairs] = [(Attribute.SIGN, False), (Attribute.VERIFY, False),
                         (Attribute.DERIVE, False)]

#: what a ticket key unwrapped under the KEK must be (the KEK's CKA_UNWRAP_TEMPLATE)
COPY: Final[Pairs] = [
    (Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.KEY_TYPE, KeyType.AES),
    (Attribute.TOKEN, True), (Attribute.PRIVATE, True), (Attribute.SENSITIVE, True),
    (Attribute.EXTRACTABLE, False), (Attribute.ENCRYPT, True), (Attribute.DECRYPT, True),
    (Attribute.WRAP, False), (Attribute.UNWRAP, False), *_NO_USE,
    (Attribute.MODIFIABLE, False),
]

#: what the KEK must be, in every token (flat attributes; CKA_UNWRAP_TEMPLATE is checked apart)
KEK: Final[Pairs] = [
    (Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.KEY_TYPE, KeyType.AES),
    (Attribute.TOKEN, True), (Attribute.PRIVATE, False), (Attribute.TRUSTED, True),
    (Attribute.SENSITIVE, True), (Attribute.EXTRACTABLE, True),
    (Attribute.WRAP_WITH_TRUSTED, True), (Attribute.WRAP, True), (Attribute.UNWRAP, True),
    (Attribute.ENCRYPT, False), (Attribute.DECRYPT, False), *_NO_USE,
    (Attribute.MODIFIABLE, False),
]

#: what a wrappable ticket key must be (besides its id and label)
WRAPPABLE: Final[Pairs] = [
    (Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.KEY_TYPE, KeyType.AES),
    (Attribute.TOKEN, True), (Attribute.PRIVATE, True), (Attribute.SENSITIVE, True),
    (Attribute.EXTRACTABLE, True), (Attribute.WRAP_WITH_TRUSTED, True),
    (Attribute.ENCRYPT, True), (Attribute.DECRYPT, True), (Attribute.WRAP, False),
    (Attribute.UNWRAP, False), *_NO_USE, (Attribute.MODIFIABLE, False),
]

#: asked for, left out (all at once) if the token refuses them
OPTIONAL_KEY: Final[Pairs] = [(Attribute.COPYABLE, False), (Attribute.DESTROYABLE, True)]


def _without(pairs: Pairs, *drop: Attribute) -> Pairs:
    return [(a, v) for a, v in pairs if a not in drop]


def _modifiable_last(pairs: Pairs, extra: Pairs) -> Pairs:
    """``pairs`` with ``extra`` inserted before CKA_MODIFIABLE, which goes last (SoftHSM2 2.6.1
    refuses any attribute of an unwrap after CKA_MODIFIABLE false)."""
    body = _without(pairs, Attribute.MODIFIABLE)
    tail = [(a, v) for a, v in pairs if a is Attribute.MODIFIABLE]
    return [*body, *extra, *tail]


def raw(pairs: Pairs) -> Template:
    """``pairs`` as a raw template (labels in UTF-8, mechanism lists packed, nested lists as
    nested templates)."""
    return [(int(attr), _raw_value(value)) for attr, value in pairs]


def _raw_value(value: Any) -> Value:
    if isinstance(value, bool | bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return raw(value)
    if isinstance(value, list):
        return _pack_mechanisms(value)
    return int(value)


# -- reading back ----------------------------------------------------------------------------

def problems(obj: AesKey, must: Pairs) -> list[str]:
    """Each attribute of ``must`` the token does not report as required (one read per
    attribute: a token may fail a whole read for one it does not know). Raises: PKCS11Error
    subclasses other than attribute refusals."""
    found = []
    for attr, wanted in must:
        try:
            reported = obj.get_attributes([attr]).get(attr)
        except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive):
            found.append(f"CKA_{attr.name} not reported (must be {_show(wanted)})")
            continue
        if reported != wanted:
            found.append(f"CKA_{attr.name} is {_show(reported)} (must be {_show(wanted)})")
    return found


def template_problems(rawtok: RawToken, session: int, obj: AesKey, must: Pairs) -> list[str]:
    """What the object's CKA_UNWRAP_TEMPLATE lacks of ``must`` (each attribute present with
    the value required). Raises: PKCS11Error subclasses other than CKR_ATTRIBUTE_TYPE_INVALID.
    """
    try:
        reported = rawtok.read_template(session, int(obj.handle), int(Attribute.UNWRAP_TEMPLATE))
    except p11x.AttributeTypeInvalid:
        return ["CKA_UNWRAP_TEMPLATE not reported"]
    return [f"CKA_UNWRAP_TEMPLATE lacks CKA_{attr.name}={_show(value)}" for attr, value in must
            if reported.get(int(attr)) != encode(_raw_value(value))]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, bytes):
        return value.hex()
    name = getattr(value, "name", None)
    return str(name) if name is not None else str(value)


# -- finding ---------------------------------------------------------------------------------

def find_kek(session: Any, label: str = KEK_LABEL) -> AesKey:
    """The one KEK labelled ``label``.

    Raises: FailedPrecondition (none, or several); PKCS11Error subclasses."""
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                      Attribute.LABEL: label}))
    if len(found) != 1:
        state = "no" if not found else f"{len(found)}"
        raise FailedPrecondition(f"{state} cluster KEK labelled {label!r} in the token")
    kek: AesKey = found[0]
    return kek


def _one(session: Any, template: dict[Attribute, Any]) -> AesKey:
    """The object just made with this label (and class). Raises: PKCS11Error subclasses."""
    found = list(session.get_objects(template))
    if len(found) != 1:
        raise p11x.GeneralError(f"{len(found)} objects match what was just made")
    obj: AesKey = found[0]
    return obj


# -- the KEK ---------------------------------------------------------------------------------

def kek_template(label: str, optional: Pairs) -> Pairs:
    """The KEK's generation template (MODIFIABLE last, then nothing after it)."""
    head: Pairs = [(Attribute.LABEL, label), (Attribute.ID, KEK_ID)]
    return _modifiable_last(head + KEK, [*optional, (Attribute.UNWRAP_TEMPLATE, COPY)])


def _kek_optional() -> Pairs:
    return [(Attribute.ALLOWED_MECHANISMS, [WRAP_MECHANISM]), *OPTIONAL_KEY]


def make_kek(rawtok: RawToken, session: Any, token: str, label: str) -> None:
    """Generate the KEK in an SO session, then read it back.

    Raises: FailedPrecondition (a KEK with this label exists); KeyProtectionError (the token
    made it weaker than required: destroyed); PKCS11Error subclasses (refused even without the
    optional attributes, or device failure).
    """
    if list(session.get_objects({Attribute.LABEL: label})):
        raise FailedPrecondition(f"a cluster KEK labelled {label!r} exists in the token")
    first: p11x.PKCS11Error | None = None
    for optional in (_kek_optional(), []):
        template = [(Attribute.VALUE_LEN, KEY_BYTES), *kek_template(label, optional)]
        try:
            rawtok.generate_aes_key(int(session.handle), raw(template))
        except _REFUSALS as exc:
            first = first or exc
            continue
        if first is not None:
            log.warning("token '%s' refused the KEK template (%s): made without %s", token,
                        type(first).__name__, ", ".join(f"CKA_{a.name}" for a, _ in optional))
        check_kek(rawtok, session, token, find_kek(session, label), "the cluster KEK")
        return
    assert first is not None
    raise first


def check_kek(rawtok: RawToken, session: Any, token: str, kek: AesKey, what: str) -> None:
    """Destroy ``kek`` and raise unless the token reports it as :data:`KEK` with the
    :data:`COPY` unwrap template, AES-256 (or no length, for an unwrapped copy).

    Raises: KeyProtectionError; PKCS11Error subclasses."""
    def check() -> list[str]:
        found = problems(kek, KEK)
        length = kek.get_attributes([Attribute.VALUE_LEN]).get(Attribute.VALUE_LEN)
        if length not in (KEY_BYTES, 0):
            found.append(f"CKA_VALUE_LEN is {length} (must be {KEY_BYTES})")
        found += template_problems(rawtok, int(session.handle), kek, COPY)
        return found
    destroy_if_weaker(kek, f"made {what}", token, check)


# -- transport keys (joining) ----------------------------------------------------------------

@dataclass(frozen=True)
class TransportKey:
    """A joiner's transport public key: DER SubjectPublicKeyInfo and its SHA-256 fingerprint
    (lower-case hex), which an operator compares out of band before approving."""

    der: bytes
    fingerprint: str


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER SubjectPublicKeyInfo, lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def _kek_copy_check() -> Pairs:
    """The transport private key's CKA_UNWRAP_TEMPLATE: only a KEK as required (flat; a
    nested template cannot be compared byte for byte)."""
    return [(Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.KEY_TYPE, KeyType.AES),
            *[(a, v) for a, v in KEK if a not in (Attribute.CLASS, Attribute.KEY_TYPE)]]


def transport_templates(label: str) -> tuple[Pairs, Pairs]:
    """(public, private) templates of the transport pair: session objects of an SO session."""
    public: Pairs = [
        (Attribute.CLASS, ObjectClass.PUBLIC_KEY), (Attribute.KEY_TYPE, KeyType.RSA),
        (Attribute.TOKEN, False), (Attribute.PRIVATE, False), (Attribute.LABEL, label),
        (Attribute.MODULUS_BITS, RSA_BITS),
        (Attribute.PUBLIC_EXPONENT, RSA_EXPONENT.to_bytes(3, "big")),
        (Attribute.ENCRYPT, False), (Attribute.VERIFY, False), (Attribute.WRAP, False),
        (Attribute.MODIFIABLE, False),
    ]
    private: Pairs = [
        (Attribute.CLASS, ObjectClass.PRIVATE_KEY), (Attribute.KEY_TYPE, KeyType.RSA),
        (Attribute.TOKEN, False), (Attribute.PRIVATE, False), (Attribute.LABEL, label),
        (Attribute.SENSITIVE, True), (Attribute.EXTRACTABLE, False), (Attribute.UNWRAP, True),
        (Attribute.DECRYPT, False), (Attribute.SIGN, False), (Attribute.SIGN_RECOVER, False),
        (Attribute.DERIVE, False), (Attribute.UNWRAP_TEMPLATE, _kek_copy_check()),
        (Attribute.MODIFIABLE, False),
    ]
    return public, private


#: what the transport private key must report
TRANSPORT_PRIVATE: Final[Pairs] = [
    (Attribute.TOKEN, False), (Attribute.SENSITIVE, True), (Attribute.ALWAYS_SENSITIVE, True),
    (Attribute.EXTRACTABLE, False), (Attribute.NEVER_EXTRACTABLE, True),
    (Attribute.UNWRAP, True), (Attribute.DECRYPT, False), (Attribute.SIGN, False),
    (Attribute.DERIVE, False), (Attribute.MODIFIABLE, False),
]


def make_transport_pair(rawtok: RawToken, session: Any, token: str, label: str
                        ) -> tuple[TransportKey, AesKey]:
    """Generate the transport pair as session objects; check the private key; return the
    public key (DER, fingerprint) and the private key object. The public key object is
    destroyed (its DER is all that is needed).

    Raises: KeyProtectionError (private key weaker than required: destroyed); PKCS11Error
    subclasses.
    """
    public, private = transport_templates(label)
    pub, priv = _session_pair(rawtok, session, public, private, label)
    der = _public_der(pub)
    pub.destroy()
    destroy_if_weaker(priv, "made the transport private key", token,
             lambda: problems(priv, TRANSPORT_PRIVATE)
             + template_problems(rawtok, int(session.handle), priv, _kek_copy_check()))
    return TransportKey(der, fingerprint(der)), priv


def _session_pair(rawtok: RawToken, session: Any, public: Pairs, private: Pairs, label: str
                  ) -> tuple[AesKey, AesKey]:
    """Generate an RSA pair of session objects labelled ``label``; (public, private) objects
    (found among session objects only: a persistent pair may carry the same label).

    Raises: PKCS11Error subclasses."""
    h_pub, _ = rawtok.generate_rsa_pair(int(session.handle), raw(public), raw(private))
    where = {Attribute.TOKEN: False, Attribute.LABEL: label}
    pub = _one(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, **where})
    priv = _one(session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, **where})
    assert int(pub.handle) == h_pub
    return pub, priv


def _public_der(pub: AesKey) -> bytes:
    """The DER SubjectPublicKeyInfo of an RSA public key object. Raises: PKCS11Error
    subclasses."""
    values = pub.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
    numbers = rsa.RSAPublicNumbers(int.from_bytes(values[Attribute.PUBLIC_EXPONENT], "big"),
                                   int.from_bytes(values[Attribute.MODULUS], "big"))
    return numbers.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _to_token(obj: AesKey, key_id: bytes, token: str) -> tuple[AesKey, bool]:
    """C_CopyObject of a session object into a token object with CKA_ID ``key_id`` and
    CKA_MODIFIABLE false (sent last); without CKA_MODIFIABLE if the token refuses it. The copy,
    and whether CKA_MODIFIABLE false was taken.

    Raises: PKCS11Error subclasses."""
    for fixed in (True, False):
        template: dict[Attribute, Any] = {Attribute.TOKEN: True, Attribute.ID: key_id}
        if fixed:
            template[Attribute.MODIFIABLE] = False
        try:
            copy: AesKey = obj.copy(template)  # type: ignore[attr-defined]
        except _REFUSALS as exc:
            if not fixed:
                raise
            log.warning("token '%s' refused CKA_MODIFIABLE false on a copy (%s): the "
                        "persistent transport key stays modifiable", token, type(exc).__name__)
            continue
        return copy, fixed
    raise AssertionError("unreachable: the last attempt returns or raises")


def persistent_must(label: str, key_id: bytes, fixed: bool) -> Pairs:
    """What a persistent transport private key must report: :data:`TRANSPORT_PRIVATE` as a
    token object with its id and label (CKA_MODIFIABLE false only if ``fixed``: the token took
    it)."""
    body = _without(TRANSPORT_PRIVATE, Attribute.TOKEN, Attribute.MODIFIABLE)
    return [(Attribute.TOKEN, True), (Attribute.ID, key_id), (Attribute.LABEL, label), *body,
            *([(Attribute.MODIFIABLE, False)] if fixed else [])]


def make_persistent_transport_pair(rawtok: RawToken, session: Any, token: str, label: str
                                   ) -> tuple[TransportKey, AesKey]:
    """Generate the transport pair as TOKEN objects of an SO session (public objects, CKA_ID =
    the 32 bytes of the fingerprint); check the private key; return the public key (DER,
    fingerprint) and the private key object.

    The fingerprint is known only once the pair exists, and a key made not modifiable can
    take no CKA_ID later: the pair is generated as modifiable session objects, copied into the
    token with its CKA_ID and CKA_MODIFIABLE false (C_CopyObject), and the session objects are
    destroyed. Not modifiable matters: a user could otherwise turn CKA_DECRYPT on and decrypt a
    KEK delivered to this key. The copies stay copyable (CKA_COPYABLE cannot be changed by a
    copy); a copy of a key that is not modifiable is the same key, CKA_UNWRAP_TEMPLATE and all.

    Raises: KeyProtectionError (the private key is weaker than required: the pair is
    destroyed); PKCS11Error subclasses.
    """
    public, private = (_without(t, Attribute.MODIFIABLE) for t in transport_templates(label))
    pub, priv = _session_pair(rawtok, session, public, private, label)
    made: list[AesKey] = []
    try:
        der = _public_der(pub)
        key_id = bytes.fromhex(fingerprint(der))
        t_pub, _ = _to_token(pub, key_id, token)
        made.append(t_pub)
        t_priv, fixed = _to_token(priv, key_id, token)
        made.append(t_priv)
    except BaseException:
        for obj in made:
            with suppress(p11x.PKCS11Error):
                obj.destroy()
        raise
    finally:
        for obj in (pub, priv):
            with suppress(p11x.PKCS11Error):
                obj.destroy()
    try:
        destroy_if_weaker(t_priv, "made the persistent transport private key", token,
                          lambda: problems(t_priv, persistent_must(label, key_id, fixed))
                          + template_problems(rawtok, int(session.handle), t_priv,
                                              _kek_copy_check()),
                          subject="the pair")
    except BaseException:
        with suppress(p11x.PKCS11Error):
            t_pub.destroy()
        raise
    return TransportKey(der, fingerprint(der)), t_priv


def transport_objects(session: Any, fingerprint_hex: str, label: str = TRANSPORT_LABEL,
                      kind: ObjectClass | None = None) -> list[AesKey]:
    """The persistent transport objects (public and private, or only ``kind``) whose CKA_ID is
    the fingerprint ``fingerprint_hex``.

    Raises: InvalidArgument (not 64 hex digits); PKCS11Error subclasses."""
    key_id = fingerprint_id(fingerprint_hex)
    template: dict[Attribute, Any] = {Attribute.TOKEN: True, Attribute.LABEL: label,
                                      Attribute.ID: key_id}
    if kind is not None:
        template[Attribute.CLASS] = kind
    return list(session.get_objects(template))


def fingerprint_id(fingerprint_hex: str) -> bytes:
    """The 32 CKA_ID bytes of a transport key's fingerprint. Raises: InvalidArgument (not 64
    hex digits)."""
    try:
        key_id = bytes.fromhex(fingerprint_hex)
    except ValueError:
        key_id = b""
    if len(key_id) != hashlib.sha256().digest_size:
        raise InvalidArgument("fingerprint", "must be 64 hex digits (SHA-256 of the DER)")
    return key_id


def find_transport(session: Any, fingerprint_hex: str, token: str,
                   label: str = TRANSPORT_LABEL) -> AesKey:
    """The persistent transport private key of ``fingerprint_hex``, checked before use (not
    destroyed if weaker: an operator should look at what put it there).

    Raises: InvalidArgument (a malformed fingerprint); FailedPrecondition (none, or several);
    KeyProtectionError (weaker than required); PKCS11Error subclasses."""
    found = transport_objects(session, fingerprint_hex, label, ObjectClass.PRIVATE_KEY)
    if len(found) != 1:
        state = "no" if not found else f"{len(found)}"
        raise FailedPrecondition(f"token '{token}' holds {state} persistent transport key "
                                 f"with fingerprint {fingerprint_hex}")
    key = found[0]
    fixed = key.get_attributes([Attribute.MODIFIABLE]).get(Attribute.MODIFIABLE) is False
    weaker = problems(key, persistent_must(label, fingerprint_id(fingerprint_hex), fixed))
    if weaker:
        raise KeyProtectionError(f"pkcs11.module: token '{token}' holds the persistent "
                                 f"transport key {fingerprint_hex} without the required "
                                 f"protection: {', '.join(weaker)}; it was not used")
    return key


def is_kek_label(label: str) -> bool:
    """Whether ``label`` names a cluster KEK: :data:`KEK_LABEL`, or it and ``-`` and more."""
    return label == KEK_LABEL or label.startswith(KEK_LABEL + "-")


def kek_labels(session: Any) -> list[str]:
    """The labels of the secret keys that are cluster KEKs (:func:`is_kek_label`), sorted,
    each once. Raises: PKCS11Error subclasses."""
    labels = set()
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        label = obj.get_attributes([Attribute.LABEL]).get(Attribute.LABEL)
        if isinstance(label, bytes):
            label = label.decode("utf-8", "replace")
        if isinstance(label, str) and is_kek_label(label):
            labels.add(label)
    return sorted(labels)


def parse_transport_key(der: bytes) -> tuple[int, int]:
    """(modulus, exponent) of a joiner's RSA-3072 public key.

    Raises: InvalidArgument (not DER SubjectPublicKeyInfo, not RSA, not 3072 bits, or an
    exponent other than 65537)."""
    try:
        key = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise InvalidArgument("public_key", "not a DER SubjectPublicKeyInfo") from exc
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != RSA_BITS:
        raise InvalidArgument("public_key", f"must be an RSA-{RSA_BITS} public key")
    numbers = key.public_numbers()
    if numbers.e != RSA_EXPONENT:
        raise InvalidArgument("public_key", f"exponent must be {RSA_EXPONENT}")
    return numbers.n, numbers.e


@dataclass(frozen=True)
class WrappedKek:
    """The KEK wrapped to a joiner's transport key, and the OAEP hash used (MGF1 with it)."""

    blob: bytes
    oaep_hash: str


def wrap_kek_for(session: Any, der: bytes, label: str,
                 hashes: tuple[str, ...] = tuple(OAEP_PARAMS)) -> WrappedKek:
    """In an SO session: import the joiner's public key as a trusted session object, wrap the
    KEK to it with RSA-OAEP (the first of ``hashes`` the token takes), destroy the imported key.

    Raises: InvalidArgument (a bad public key, or an unknown hash name); FailedPrecondition (no
    KEK; the token takes none of ``hashes``); PKCS11Error subclasses.
    """
    unknown = [h for h in hashes if h not in OAEP_PARAMS]
    if unknown or not hashes:
        raise InvalidArgument("oaep_hashes", f"must be some of {', '.join(OAEP_PARAMS)}")
    modulus, exponent = parse_transport_key(der)
    kek = find_kek(session, label)
    size = (modulus.bit_length() + 7) // 8
    joiner = session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: False, Attribute.PRIVATE: False,
        Attribute.LABEL: "join-" + fingerprint(der)[:16],
        Attribute.MODULUS: modulus.to_bytes(size, "big"),
        Attribute.PUBLIC_EXPONENT: exponent.to_bytes(3, "big"),
        Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False,
        Attribute.TRUSTED: True,
    })
    try:
        for name in hashes:
            try:
                blob: bytes = joiner.wrap_key(kek, mechanism=Mechanism.RSA_PKCS_OAEP,
                                              mechanism_param=OAEP_PARAMS[name])
            except _PARAM_REFUSALS as exc:
                log.warning("token refused RSA-OAEP with %s (%s)", name, type(exc).__name__)
                continue
            return WrappedKek(blob, name)
    finally:
        with suppress(p11x.PKCS11Error):
            joiner.destroy()
    raise FailedPrecondition(f"the token wraps with RSA-OAEP under none of {', '.join(hashes)}")


def unwrap_kek(rawtok: RawToken, session: Any, private: AesKey, wrapped: WrappedKek,
               token: str, label: str) -> None:
    """In the joiner's SO session: unwrap the KEK with the transport private key, then read
    it back.

    Raises: FailedPrecondition (a KEK with this label exists; the token does not unwrap with
    OAEP under ``wrapped.oaep_hash``); InvalidArgument (an unknown hash name);
    KeyProtectionError (weaker than required: destroyed); PKCS11Error subclasses (a wrong or
    tampered blob: what the token says, e.g. CKR_ENCRYPTED_DATA_INVALID).
    """
    if wrapped.oaep_hash not in OAEP_PARAMS:
        raise InvalidArgument("oaep_hash", f"must be one of {', '.join(OAEP_PARAMS)}")
    if list(session.get_objects({Attribute.LABEL: label})):
        raise FailedPrecondition(f"a cluster KEK labelled {label!r} exists in the token")
    for optional in (_kek_optional(), []):
        template = kek_template(label, optional)
        try:
            rawtok.unwrap_oaep(int(session.handle), int(private.handle), wrapped.blob,
                               raw(template), wrapped.oaep_hash)
        except _PARAM_REFUSALS as exc:
            raise FailedPrecondition(f"token '{token}' does not unwrap with RSA-OAEP under "
                                     f"{wrapped.oaep_hash} ({type(exc).__name__})") from exc
        except _REFUSALS as exc:
            if not optional or isinstance(exc, p11x.GeneralError | p11x.FunctionFailed):
                raise
            log.warning("token '%s' refused the KEK copy template (%s): unwrapping without "
                        "the optional attributes", token, type(exc).__name__)
            continue
        check_kek(rawtok, session, token, find_kek(session, label), "a copy of the cluster KEK")
        return


# -- ticket keys -----------------------------------------------------------------------------

def _key_head(key_id: bytes) -> Pairs:
    return [(Attribute.ID, key_id), (Attribute.LABEL, key_label(key_id))]


def create_wrappable(rawtok: RawToken, session: Any, key_id: bytes, token: str) -> None:
    """Generate a ticket key that only a trusted key can wrap; read it back.

    Raises: KeyProtectionError (weaker than required: destroyed); PKCS11Error subclasses.
    """
    optional: Pairs = [(Attribute.ALLOWED_MECHANISMS, [Mechanism.AES_GCM]), *OPTIONAL_KEY]
    for extra in (optional, []):
        template = [(Attribute.VALUE_LEN, KEY_BYTES),
                    *_modifiable_last(_key_head(key_id) + WRAPPABLE, extra)]
        try:
            rawtok.generate_aes_key(int(session.handle), raw(template))
        except _REFUSALS:
            if not extra:
                raise
            continue
        key = _one(session, {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id,
                             Attribute.LABEL: key_label(key_id)})
        must = [*WRAPPABLE, *_key_head(key_id), (Attribute.VALUE_LEN, KEY_BYTES),
                (Attribute.ALWAYS_SENSITIVE, True)]
        destroy_if_weaker(key, f"made ticket key {key_id.hex()}", token,
                          partial(problems, key, must))
        return


def wrap_ticket_key(kek: AesKey, key: Any) -> bytes:
    """RFC 3394 wrap of ``key`` under ``kek``. Raises: PKCS11Error subclasses
    (CKR_KEY_UNEXTRACTABLE for a key made never extractable)."""
    blob: bytes = kek.wrap_key(key, mechanism=WRAP_MECHANISM)  # type: ignore[attr-defined]
    if len(blob) != BLOB_BYTES:
        raise p11x.GeneralError(f"the token wrapped a key into {len(blob)} bytes, "
                                f"not {BLOB_BYTES}")
    return blob


def copy_template(key_id: bytes, optional: Pairs) -> Pairs:
    """The unwrap template of a ticket key copy (COPY, with the id and label)."""
    return _modifiable_last(COPY[:2] + _key_head(key_id) + COPY[2:], optional)


def unwrap_ticket_key(rawtok: RawToken, session: Any, kek: AesKey, key_id: bytes, blob: bytes,
                      token: str) -> AesKey:
    """Unwrap a copy of the ticket key ``key_id`` under ``kek``, then read it back; the copy.

    Raises: InvalidArgument (a blob of the wrong length); KeyProtectionError (the copy is
    weaker than required: destroyed); PKCS11Error subclasses (a tampered or foreign blob:
    what the token says).
    """
    if len(blob) != BLOB_BYTES:
        raise InvalidArgument("blob", f"must be {BLOB_BYTES} bytes (RFC 3394, AES-256)")
    optional: Pairs = [(Attribute.ALLOWED_MECHANISMS, [Mechanism.AES_GCM]), *OPTIONAL_KEY]
    for extra in (optional, []):
        try:
            rawtok.unwrap(int(session.handle), int(WRAP_MECHANISM), int(kek.handle), blob,
                          raw(copy_template(key_id, extra)))
        except _REFUSALS as exc:
            if not extra or isinstance(exc, p11x.GeneralError | p11x.FunctionFailed):
                raise
            log.warning("token '%s' refused the copy template of key %s (%s): unwrapping "
                        "without the optional attributes", token, key_id.hex(),
                        type(exc).__name__)
            continue
        copy = _one(session, {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: key_id,
                              Attribute.LABEL: key_label(key_id)})
        destroy_if_weaker(copy, f"made a copy of ticket key {key_id.hex()}", token,
                 partial(_copy_problems, copy, key_id))
        return copy
    raise AssertionError("unreachable: the last attempt returns or raises")


#: AAD prefix of a key's check value (:func:`check_aad`)
CHECK_CONTEXT: Final = b"ike-ticket-authority key check"
#: the fixed nonce of a check value: ticket nonces are 12 random octets, so one of them equals
#: it with probability 2^-96 per seal, as two ticket nonces collide
CHECK_NONCE: Final = bytes(12)
#: a check value is a whole AES-GCM tag
CHECK_BYTES: Final = 16


def check_aad(key_id: bytes) -> bytes:
    """The AAD of ``key_id``'s check value: binds the value to the id (a blob of key X moved
    onto id Y unwraps, but its copy cannot make Y's check value)."""
    return CHECK_CONTEXT + key_id


def refuse_check(copy: AesKey, key_id: bytes, token: str) -> KeyProtectionError:
    """Destroy ``copy`` (its check value is not the one recorded for ``key_id``) and return the
    error to raise. Never raises."""
    return refusal(copy, f"made a copy of ticket key {key_id.hex()}", token,
                  ["a check value other than the one recorded for this id (a blob of another "
                   "key, or of another KEK's key)"])


def _copy_problems(copy: AesKey, key_id: bytes) -> list[str]:
    """What a copy lacks: :data:`COPY`, its id and label, an AES-256 length (or none reported:
    SoftHSM2 2.6.1 sets none on unwrap; the 40-byte RFC 3394 blob gave 32 bytes). Raises:
    PKCS11Error subclasses."""
    found = problems(copy, [*COPY, *_key_head(key_id)])
    length = copy.get_attributes([Attribute.VALUE_LEN]).get(Attribute.VALUE_LEN)
    if length not in (KEY_BYTES, 0):
        found.append(f"CKA_VALUE_LEN is {length} (must be {KEY_BYTES})")
    return found


#: the attributes :func:`protection` reports, by name
PROTECTION: Final[dict[str, Attribute]] = {
    "token": Attribute.TOKEN, "private": Attribute.PRIVATE, "trusted": Attribute.TRUSTED,
    "sensitive": Attribute.SENSITIVE, "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "extractable": Attribute.EXTRACTABLE, "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "wrap_with_trusted": Attribute.WRAP_WITH_TRUSTED, "modifiable": Attribute.MODIFIABLE,
    "encrypt": Attribute.ENCRYPT, "decrypt": Attribute.DECRYPT, "wrap": Attribute.WRAP,
    "unwrap": Attribute.UNWRAP, "sign": Attribute.SIGN, "verify": Attribute.VERIFY,
    "derive": Attribute.DERIVE,
}


def protection(obj: AesKey) -> dict[str, bool]:
    """The :data:`PROTECTION` attributes the token reports for ``obj`` (one read each; one the
    object's class does not have is left out). Raises: PKCS11Error subclasses other than
    attribute refusals."""
    found: dict[str, bool] = {}
    for name, attr in PROTECTION.items():
        with suppress(p11x.AttributeTypeInvalid, p11x.AttributeSensitive):
            found[name] = bool(obj.get_attributes([attr])[attr])
    return found


#: what a token may answer C_UnwrapKey for a blob it cannot open (tampered, or wrapped under
#: another key); SoftHSM2 2.6.1's answer is found by tests/test_pkcs11_wrap.py
BAD_BLOB: Final = (p11x.WrappedKeyInvalid, p11x.WrappedKeyLenRange, p11x.EncryptedDataInvalid,
                   p11x.EncryptedDataLenRange)
