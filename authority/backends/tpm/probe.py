"""What start-up reads from the TPM: properties, capabilities, TestParms, and :class:`DeviceInfo`.

The numbers read here feed :func:`capabilities.check_capabilities` (the check itself is pure) and
the status the backend reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from tpm2_pytss.constants import TPM2_CAP  # type: ignore[import-untyped, unused-ignore]

from authority.backends.tpm._errors import Kind, Phase, TpmStartupError
from authority.backends.tpm.capabilities import TpmCapabilities
from authority.backends.tpm.connection import Connection
from authority.backends.tpm.templates import aes_test_parms, hmac_test_parms

__all__ = [
    "PT_FIXED",
    "PT_VAR",
    "DeviceInfo",
    "describe",
    "read_capabilities",
    "read_properties",
    "transient_slots",
    "warn_if_locked_out",
]

log = logging.getLogger(__name__)

_TSS_MAX_BUFFER: Final = 1024       # TPM2B_MAX_BUFFER in the TSS headers (MAX_DIGEST_BUFFER)

# TPM_PT properties (Part 2, table 23)
PT_FIXED: Final = 0x100
_PT_MANUFACTURER: Final = 0x105
_PT_VENDOR_STRING_1: Final = 0x106
_PT_FIRMWARE_VERSION_1: Final = 0x10B
_PT_FIRMWARE_VERSION_2: Final = 0x10C
_PT_INPUT_BUFFER: Final = 0x10D
_PT_HR_TRANSIENT_MIN: Final = 0x10E
PT_VAR: Final = 0x200
_PT_PERMANENT: Final = 0x200
_PT_LOCKOUT_COUNTER: Final = 0x20E
_PT_MAX_AUTH_FAIL: Final = 0x20F
_PERMANENT_IN_LOCKOUT: Final = 1 << 9     # TPMA_PERMANENT.inLockout
_CC_FIRST: Final = 0x11F
_CC_TEST_PARMS: Final = 0x18A


@dataclass(frozen=True)
class DeviceInfo:
    """What start-up learnt about the TPM."""

    tcti: str
    manufacturer: str
    vendor: str
    firmware: str
    max_buffer: int          # TPM_PT_INPUT_BUFFER: most octets per EncryptDecrypt2/HMAC call
    transient_slots: int     # TPM_PT_HR_TRANSIENT_MIN
    lru_keys: int            # ticket keys kept loaded at once
    stale_flushed: int       # transient objects of earlier clients flushed at start-up
    lockout_counter: int

    @property
    def token(self) -> str:
        return f"{self.manufacturer} {self.vendor} firmware {self.firmware}"


def read_properties(conn: Connection, first: int, phase: Phase) -> dict[int, int]:
    """TPM_PT properties from ``first`` up to the end of its group. Raises: TpmStartupError."""
    out: dict[int, int] = {}
    prop, more = first, True
    while more and prop < first + 0x100:
        more, data = conn.call("reading TPM properties", conn.esapi.get_capability,
                               TPM2_CAP.TPM_PROPERTIES, prop, 64, phase=phase)
        props = [(int(p.property), int(p.value)) for p in data.data.tpmProperties]
        if not props:
            break
        out.update((k, v) for k, v in props if first <= k < first + 0x100)
        prop = props[-1][0] + 1
    return out


def transient_slots(fixed: dict[int, int]) -> int:
    """TPM_PT_HR_TRANSIENT_MIN of the fixed properties (3 if not reported)."""
    return fixed.get(_PT_HR_TRANSIENT_MIN, 3)


def read_capabilities(conn: Connection, slots: int) -> TpmCapabilities:
    """Commands, algorithms, curves and TestParms results. Raises: TpmStartupError."""
    commands = _capability_list(conn, TPM2_CAP.COMMANDS, _CC_FIRST,
                                lambda d: [int(c) & 0xFFFF for c in d.command])
    algorithms = _capability_list(conn, TPM2_CAP.ALGS, 0,
                                  lambda d: [int(a.alg) for a in d.algorithms])
    curves = _capability_list(conn, TPM2_CAP.ECC_CURVES, 0,
                              lambda d: [int(c) for c in d.eccCurves])
    if _CC_TEST_PARMS in commands:
        aes_ok = _test_parms(conn, aes_test_parms())
        hmac_ok = _test_parms(conn, hmac_test_parms())
    else:  # cannot ask; the algorithm lists must do
        aes_ok = hmac_ok = True
    return TpmCapabilities.of(commands, algorithms, curves, aes_ok, hmac_ok, slots)


def _capability_list(conn: Connection, cap: Any, first: int,
                     extract: Callable[[Any], list[int]]) -> list[int]:
    """Every value of one capability (following ``moreData``). Raises: TpmStartupError."""
    out: list[int] = []
    prop, more = first, True
    while more:
        more, data = conn.call("reading TPM capabilities", conn.esapi.get_capability,
                               cap, prop, 256, phase=Phase.STARTUP)
        values = extract(data.data)
        if not values:
            break
        out += values
        prop = values[-1] + 1
    return out


def _test_parms(conn: Connection, parms: Any) -> bool:
    """True if TPM2_TestParms accepts ``parms``. Raises: TpmStartupError (other failures)."""
    try:
        conn.call("TPM2_TestParms", conn.esapi.test_parms, parms, phase=Phase.STARTUP)
    except TpmStartupError as err:
        if err.kind in (Kind.UNSUPPORTED, Kind.OTHER):
            return False
        raise
    return True


def warn_if_locked_out(tcti: str, variable: dict[int, int]) -> None:
    """Log a warning if the variable properties say the TPM is in dictionary-attack lockout."""
    if variable.get(_PT_PERMANENT, 0) & _PERMANENT_IN_LOCKOUT:
        log.warning(
            "the TPM at %s is in dictionary-attack lockout (%d of %d failures); the ticket "
            "keys are noDA and unaffected", tcti, variable.get(_PT_LOCKOUT_COUNTER, 0),
            variable.get(_PT_MAX_AUTH_FAIL, 0))


def describe(tcti: str, fixed: dict[int, int], variable: dict[int, int], lru_keys: int,
             stale_flushed: int) -> DeviceInfo:
    """The DeviceInfo of the fixed and variable properties read at start-up."""
    return DeviceInfo(
        tcti=tcti,
        manufacturer=_ascii(fixed.get(_PT_MANUFACTURER, 0)),
        vendor=" ".join("".join(_ascii(fixed.get(_PT_VENDOR_STRING_1 + i, 0), strip=False)
                                for i in range(4)).split()),
        firmware=_firmware(fixed.get(_PT_FIRMWARE_VERSION_1, 0),
                           fixed.get(_PT_FIRMWARE_VERSION_2, 0)),
        max_buffer=min(fixed.get(_PT_INPUT_BUFFER, _TSS_MAX_BUFFER), _TSS_MAX_BUFFER),
        transient_slots=transient_slots(fixed),
        lru_keys=lru_keys,
        stale_flushed=stale_flushed,
        lockout_counter=variable.get(_PT_LOCKOUT_COUNTER, 0),
    )


def _ascii(value: int, strip: bool = True) -> str:
    """A TPM_PT value holding four ASCII characters (NULs as spaces), trimmed if ``strip``."""
    text = value.to_bytes(4, "big").replace(b"\0", b" ").decode("ascii", "replace")
    return text.strip() if strip else text


def _firmware(first: int, second: int) -> str:
    """TPM_PT_FIRMWARE_VERSION_1/2 as major.minor.build.patch plus the raw words."""
    return (f"{first >> 16}.{first & 0xFFFF}.{second >> 16}.{second & 0xFFFF} "
            f"(0x{first:08x}:{second:08x})")
