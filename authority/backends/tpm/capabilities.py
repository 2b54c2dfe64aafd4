"""What the ticket backend needs from a TPM, and the check run on its capabilities at start-up.

Pure functions over numbers read with TPM2_GetCapability / TPM2_TestParms (the device layer reads
them), so the check can be tested on fabricated capability lists. Real TPM chips often lack the
optional TPM2_EncryptDecrypt2 command; the message says so instead of failing at the first seal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from authority.errors import StartupError

__all__ = [
    "REQUIRED_ALGORITHMS",
    "REQUIRED_COMMANDS",
    "REQUIRED_CURVES",
    "TpmCapabilities",
    "check_capabilities",
    "missing_capabilities",
]

# TPM_CC values (TCG TPM 2.0 Part 2, table 12)
REQUIRED_COMMANDS: Final[dict[int, str]] = {
    0x193: "TPM2_EncryptDecrypt2",
    0x155: "TPM2_HMAC",
    0x131: "TPM2_CreatePrimary",
    0x153: "TPM2_Create",
    0x157: "TPM2_Load",
    0x162: "TPM2_ContextSave",
    0x161: "TPM2_ContextLoad",
    0x165: "TPM2_FlushContext",
    0x173: "TPM2_ReadPublic",
}
# TPM_ALG_ID values (Part 2, table 9)
REQUIRED_ALGORITHMS: Final[dict[int, str]] = {
    0x0006: "AES",
    0x0043: "CFB mode",
    0x0005: "HMAC",
    0x000B: "SHA-256",
    0x0023: "ECC",
    0x0025: "symmetric cipher objects (TPM_ALG_SYMCIPHER)",
    0x0008: "keyed-hash objects (TPM_ALG_KEYEDHASH)",
}
# TPM_ECC_CURVE values (Part 2, table 10)
REQUIRED_CURVES: Final[dict[int, str]] = {0x0003: "ECC NIST P-256"}
MIN_TRANSIENT_SLOTS: Final = 3   # storage primary + the two objects of one ticket key


@dataclass(frozen=True)
class TpmCapabilities:
    """What the TPM reported. ``aes256_cfb`` / ``hmac_sha256``: TPM2_TestParms accepted an
    AES-256-CFB symmetric object / an HMAC-SHA256 keyed-hash object."""

    commands: frozenset[int]
    algorithms: frozenset[int]
    curves: frozenset[int]
    aes256_cfb: bool
    hmac_sha256: bool
    transient_slots: int = MIN_TRANSIENT_SLOTS

    @classmethod
    def of(cls, commands: Iterable[int], algorithms: Iterable[int], curves: Iterable[int],
           aes256_cfb: bool, hmac_sha256: bool,
           transient_slots: int = MIN_TRANSIENT_SLOTS) -> TpmCapabilities:
        """Build from plain iterables (command codes may carry TPMA_CC attribute bits)."""
        return cls(frozenset(c & 0xFFFF for c in commands), frozenset(algorithms),
                   frozenset(curves), aes256_cfb, hmac_sha256, transient_slots)


def missing_capabilities(caps: TpmCapabilities) -> list[str]:
    """Names of everything the backend needs that ``caps`` lacks, commands first; [] if none."""
    missing = [f"command {name}" for cc, name in REQUIRED_COMMANDS.items()
               if cc not in caps.commands]
    missing += [f"algorithm {name}" for alg, name in REQUIRED_ALGORITHMS.items()
                if alg not in caps.algorithms]
    missing += [f"curve {name}" for curve, name in REQUIRED_CURVES.items()
                if curve not in caps.curves]
    if not caps.aes256_cfb:
        missing.append("AES-256 keys in CFB mode (TPM2_TestParms refused them)")
    if not caps.hmac_sha256:
        missing.append("HMAC-SHA256 keyed-hash keys (TPM2_TestParms refused them)")
    if caps.transient_slots < MIN_TRANSIENT_SLOTS:
        missing.append(f"{MIN_TRANSIENT_SLOTS} transient object slots "
                       f"(it reports {caps.transient_slots})")
    return missing


def check_capabilities(caps: TpmCapabilities, tcti: str) -> None:
    """Refuse a TPM that cannot run the ticket construction (format 2).

    Raises: StartupError naming tpm.tcti and listing what is missing.
    """
    missing = missing_capabilities(caps)
    if not missing:
        return
    hint = ""
    if 0x193 not in caps.commands:
        hint = ("; TPM2_EncryptDecrypt2 is optional in the TPM 2.0 specification and many TPM "
                "chips leave it out: use the PKCS#11 backend, or a TPM that implements it")
    raise StartupError(
        f"tpm.tcti: the TPM at '{tcti}' lacks what the ticket backend needs: "
        f"{', '.join(missing)}{hint}"
    )
