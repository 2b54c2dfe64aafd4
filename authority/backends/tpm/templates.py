"""The TPM objects of a ticket key and of its parent: templates, creation, attributes.

A storage primary key (ECC NIST P-256, owner hierarchy, restricted decrypt, AES-128-CFB
protection) is recreated at start-up from a fixed template, which yields the same key every
time for the same owner seed, so no persistent handle is needed. Under it each ticket key is
two ordinary objects made by TPM2_Create: an AES-256 key (CFB, decrypt + sign/encrypt) and an
HMAC-SHA256 keyed-hash key, both fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth
| noDA, neither restricted nor duplicable, with an empty authorisation (their use is guarded
by access to this TPM and the key directory; noDA means a wrong guess never locks anything).
"""

from __future__ import annotations

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

__all__ = [
    "ATTRIBUTE_FLAGS",
    "aes_template",
    "aes_test_parms",
    "create_key_blobs",
    "hmac_template",
    "hmac_test_parms",
    "primary_template",
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


def create_key_blobs(conn: Connection, parent: Any, key_id: bytes) -> dict[str, bytes]:
    """TPM2_Create the key's AES and HMAC objects under ``parent``; their marshalled blobs.

    Raises: TpmError.
    """
    what = f"creating key {key_id.hex()}"
    aes_priv, aes_pub, *_ = conn.call(what, conn.esapi.create, parent, None, aes_template())
    mac_priv, mac_pub, *_ = conn.call(what, conn.esapi.create, parent, None, hmac_template())
    return {"aes.pub": aes_pub.marshal(), "aes.priv": aes_priv.marshal(),
            "hmac.pub": mac_pub.marshal(), "hmac.priv": mac_priv.marshal()}


def read_attributes(conn: Connection, aes: Any, hmac: Any) -> dict[str, bool]:
    """Both loaded objects' TPMA_OBJECT bits as the TPM reports them (TPM2_ReadPublic).

    Raises: TpmError.
    """
    out: dict[str, bool] = {}
    for prefix, handle in (("aes", aes), ("hmac", hmac)):
        public, _name, _qualified = conn.call("TPM2_ReadPublic", conn.esapi.read_public, handle)
        bits = int(public.publicArea.objectAttributes)
        out.update({f"{prefix}.{name}": bool(bits & flag)
                    for name, flag in ATTRIBUTE_FLAGS.items()})
    return out
