"""The TPM objects of a ticket key and of its parent: templates, creation, attributes.

A storage primary key (ECC NIST P-256, owner hierarchy, restricted decrypt, AES-128-CFB
protection) is recreated at start-up from a fixed template, which yields the same key every
time for the same owner seed, so no persistent handle is needed. Under it each ticket key is
two ordinary objects made by TPM2_Create: an AES-256 key (CFB, decrypt + sign/encrypt) and an
HMAC-SHA256 keyed-hash key, both fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth
| noDA, neither restricted nor duplicable, with an empty authorisation (their use is guarded
by access to this TPM and the key directory; noDA means a wrong guess never locks anything).

:func:`key_problems` is the one comparison of a ticket key with these templates: the backend
refuses a key that differs (keycache.py, at each load from the blobs and after creation) and
doctor reports it (authority/doctor/tpm.py). That the keys never leave the TPM rests on those
attributes: a key without sensitiveDataOrigin has a value chosen outside the TPM, one without
fixedTPM / fixedParent may be duplicated out of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
    TPM2_ALG,
    TPM2_ECC,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (  # type: ignore[import-untyped, unused-ignore]
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMS_KEYEDHASH_PARMS,
    TPMS_SCHEME_HASH,
    TPMS_SYMCIPHER_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_PUBLIC_PARMS,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SCHEME_KEYEDHASH,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from authority.backends.tpm.connection import Connection
from authority.errors import KeyProtectionError

__all__ = [
    "ATTRIBUTE_FLAGS",
    "KEY_TEMPLATES",
    "aes_template",
    "aes_test_parms",
    "create_key_blobs",
    "expected_attributes",
    "hmac_template",
    "hmac_test_parms",
    "key_problems",
    "loaded_problems",
    "primary_template",
    "public_flags",
    "read_attributes",
]

_BASE_ATTRIBUTES: Final = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
)
#: key_attributes() names and the TPMA_OBJECT bit each reports
ATTRIBUTE_FLAGS: Final[dict[str, int]] = {
    "fixed_tpm": int(TPMA_OBJECT.FIXEDTPM),
    "fixed_parent": int(TPMA_OBJECT.FIXEDPARENT),
    "sensitive_data_origin": int(TPMA_OBJECT.SENSITIVEDATAORIGIN),
    "user_with_auth": int(TPMA_OBJECT.USERWITHAUTH),
    "admin_with_policy": int(TPMA_OBJECT.ADMINWITHPOLICY),
    "no_da": int(TPMA_OBJECT.NODA),
    "encrypted_duplication": int(TPMA_OBJECT.ENCRYPTEDDUPLICATION),
    "restricted": int(TPMA_OBJECT.RESTRICTED),
    "decrypt": int(TPMA_OBJECT.DECRYPT),
    "sign_encrypt": int(TPMA_OBJECT.SIGN_ENCRYPT),
}


def _aes_parameters() -> Any:
    """TPMU_PUBLIC_PARMS of a ticket AES key: AES-256-CFB."""
    return TPMU_PUBLIC_PARMS(symDetail=TPMS_SYMCIPHER_PARMS(sym=TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=256),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))))


def _hmac_parameters() -> Any:
    """TPMU_PUBLIC_PARMS of a ticket HMAC key: keyed hash with the HMAC-SHA256 scheme."""
    return TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=TPMT_KEYEDHASH_SCHEME(
        scheme=TPM2_ALG.HMAC,
        details=TPMU_SCHEME_KEYEDHASH(hmac=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )))


def primary_template() -> Any:
    """TPM2B_PUBLIC of the storage primary: ECC P-256, restricted decrypt, AES-128-CFB, noDA.

    The same as ``tpm2_createprimary -C o -g sha256 -G ecc256:aes128cfb -a
    'restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda'``.
    """
    return TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_BASE_ATTRIBUTES | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                          keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                          mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
    ))


def aes_template() -> Any:
    """TPM2B_PUBLIC of a ticket AES key: AES-256-CFB, decrypt + sign/encrypt, not restricted."""
    return TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.SYMCIPHER,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_BASE_ATTRIBUTES | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.SIGN_ENCRYPT,
        parameters=_aes_parameters(),
    ))


def hmac_template() -> Any:
    """TPM2B_PUBLIC of a ticket HMAC key: keyed hash, HMAC-SHA256, sign only."""
    return TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=_BASE_ATTRIBUTES | TPMA_OBJECT.SIGN_ENCRYPT,
        parameters=_hmac_parameters(),
    ))


def aes_test_parms() -> Any:
    """TPMT_PUBLIC_PARMS for TPM2_TestParms: the parameters of :func:`aes_template`."""
    return TPMT_PUBLIC_PARMS(type=TPM2_ALG.SYMCIPHER, parameters=_aes_parameters())


def hmac_test_parms() -> Any:
    """TPMT_PUBLIC_PARMS for TPM2_TestParms: the parameters of :func:`hmac_template`."""
    return TPMT_PUBLIC_PARMS(type=TPM2_ALG.KEYEDHASH, parameters=_hmac_parameters())


#: the two objects of a ticket key: the prefix of their blobs and attribute names, and the
#: template each is made from
KEY_TEMPLATES: Final[tuple[tuple[str, Callable[[], Any]], ...]] = (
    ("aes", aes_template), ("hmac", hmac_template))


def create_key_blobs(conn: Connection, parent: Any, key_id: bytes) -> dict[str, bytes]:
    """TPM2_Create the key's AES and HMAC objects under ``parent``; their marshalled blobs,
    once the public areas the TPM returned are checked against the templates.

    Raises: TpmError; KeyProtectionError (the TPM made them otherwise: nothing is stored).
    """
    what = f"creating key {key_id.hex()}"
    aes_priv, aes_pub, *_ = conn.call(what, conn.esapi.create, parent, None, aes_template())
    mac_priv, mac_pub, *_ = conn.call(what, conn.esapi.create, parent, None, hmac_template())
    problems = key_problems({"aes": aes_pub, "hmac": mac_pub})
    if problems:
        raise KeyProtectionError(
            f"tpm.tcti: the TPM at '{conn.tcti}' made key {key_id.hex()} otherwise than the "
            f"backend's templates ({', '.join(problems)}): it was not stored")
    return {"aes.pub": aes_pub.marshal(), "aes.priv": aes_priv.marshal(),
            "hmac.pub": mac_pub.marshal(), "hmac.priv": mac_priv.marshal()}


def read_attributes(conn: Connection, aes: Any, hmac: Any) -> dict[str, bool]:
    """Both loaded objects' TPMA_OBJECT bits as the TPM reports them (TPM2_ReadPublic).

    Raises: TpmError.
    """
    out: dict[str, bool] = {}
    for prefix, handle in (("aes", aes), ("hmac", hmac)):
        public, _name, _qualified = conn.call("TPM2_ReadPublic", conn.esapi.read_public, handle)
        out.update(public_flags(prefix, public))
    return out


# -- the one comparison of a ticket key with the templates ---------------------------------------


def public_flags(prefix: str, public: Any) -> dict[str, bool]:
    """A TPM2B_PUBLIC's TPMA_OBJECT bits by the names ``key_attributes`` reports them
    ("aes.fixed_tpm", ...)."""
    bits = int(public.publicArea.objectAttributes)
    return {f"{prefix}.{name}": bool(bits & flag) for name, flag in ATTRIBUTE_FLAGS.items()}


def expected_attributes() -> dict[str, bool]:
    """What the templates set for a ticket key, by the names ``key_attributes`` reports."""
    out: dict[str, bool] = {}
    for prefix, template in KEY_TEMPLATES:
        out.update(public_flags(prefix, template()))
    return out


def key_problems(publics: Mapping[str, Any],
                 reported: Mapping[str, bool] | None = None) -> list[str]:
    """What differs between a ticket key and the templates: each attribute ("aes.fixed_tpm is
    false") -- of ``reported`` if given (as the TPM reported them), else of the public areas
    -- and each algorithm field ("aes.parameters differs": type, name algorithm, policy, key
    size, mode, scheme). ``publics``: the TPM2B_PUBLIC of "aes" and of "hmac". Empty: the
    key is what the backend makes."""
    if reported is None:
        reported = {name: bit for prefix, _template in KEY_TEMPLATES
                    for name, bit in public_flags(prefix, publics[prefix]).items()}
    problems = [f"{name} is {str(reported.get(name)).lower()}"
                for name, want in expected_attributes().items() if reported.get(name) != want]
    for prefix, template in KEY_TEMPLATES:
        problems += [f"{prefix}.{what} differs" for what, (have, want) in
                     _shape(publics[prefix], template()).items() if have != want]
    return problems


def loaded_problems(conn: Connection, handles: Mapping[str, Any],
                    publics: Mapping[str, Any]) -> list[str]:
    """What differs between the public area the TPM reports for each loaded object
    (TPM2_ReadPublic; ``handles`` by prefix) and the checked blob it was loaded from
    (``publics``). Empty: the TPM holds exactly what was checked.

    Raises: TpmError.
    """
    problems = []
    for prefix, handle in handles.items():
        public, _name, _qualified = conn.call("TPM2_ReadPublic", conn.esapi.read_public, handle)
        if public.marshal() != publics[prefix].marshal():
            problems.append(f"{prefix}: the TPM reports another public area than its blob's")
    return problems


def _shape(public: Any, template: Any) -> dict[str, tuple[Any, Any]]:
    """The public area's algorithm fields next to the template's: type, name algorithm,
    policy, parameters (key size, mode, scheme)."""
    def fields(area: Any) -> tuple[int, int, bytes, bytes]:
        parms = TPMT_PUBLIC_PARMS(type=area.type, parameters=area.parameters)
        return int(area.type), int(area.nameAlg), bytes(area.authPolicy), parms.marshal()

    have, want = fields(public.publicArea), fields(template.publicArea)
    names = ("type", "name_alg", "auth_policy", "parameters")
    return {name: (have[i], want[i]) for i, name in enumerate(names)}
