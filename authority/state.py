"""The resumption state a ticket carries, and the rules a state must satisfy to be sealed.

Pure: no crypto, no I/O, no gRPC. Numbers are IKEv2 IANA registry values (RFC 7296 section 3.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from authority.errors import InvalidArgument

#: PRF transform id -> preferred key length in octets (RFC 7296 section 2.13; RFC 4434; RFC 4615).
PRF_KEY_LENGTHS: dict[int, int] = {
    2: 20,  # PRF_HMAC_SHA1
    4: 16,  # PRF_AES128_XCBC
    5: 32,  # PRF_HMAC_SHA2_256
    6: 48,  # PRF_HMAC_SHA2_384
    7: 64,  # PRF_HMAC_SHA2_512
    8: 16,  # PRF_AES128_CMAC
}

SPI_LEN = 8
ID_MIN_LEN = 4          # type (1) + reserved (3); ID_NULL (RFC 7619) has no data
ID_MAX_LEN = 256
GATEWAY_DATA_MAX_LEN = 256
MAX_TRANSFORM_ID = 0xFFFF
MAX_KEY_BITS = 1024


@dataclass(frozen=True)
class ResumptionState:
    """What a gateway needs to resume an IKE SA. ``repr`` never shows SK_d."""

    id_i: bytes
    id_r: bytes
    spi_i: bytes
    spi_r: bytes
    sk_d: bytes
    encr_id: int
    encr_key_bits: int
    prf_id: int
    integ_id: int
    dh_group: int
    auth_method: int
    gateway_data: bytes = b""

    def __repr__(self) -> str:
        return (f"ResumptionState(id_i={self.id_i.hex()}, id_r={self.id_r.hex()}, "
                f"spi_i={self.spi_i.hex()}, spi_r={self.spi_r.hex()}, sk_d=<{len(self.sk_d)} "
                f"octets>, encr={self.encr_id}/{self.encr_key_bits}, prf={self.prf_id}, "
                f"integ={self.integ_id}, dh={self.dh_group}, auth={self.auth_method}, "
                f"gateway_data=<{len(self.gateway_data)} octets>)")


def validate_state(state: ResumptionState, prefix: str = "state") -> None:
    """Check every field of a state a gateway asks to seal.

    Raises: InvalidArgument naming the first offending field (``state.sk_d`` and so on).
    """
    _check_id(state.id_i, f"{prefix}.id_i")
    _check_id(state.id_r, f"{prefix}.id_r")
    _check_spi(state.spi_i, f"{prefix}.spi_i")
    _check_spi(state.spi_r, f"{prefix}.spi_r")
    key_len = PRF_KEY_LENGTHS.get(state.prf_id)
    if key_len is None:
        known = ", ".join(str(k) for k in sorted(PRF_KEY_LENGTHS))
        raise InvalidArgument(f"{prefix}.prf_id", f"unknown or unsupported PRF {state.prf_id} "
                                                  f"(supported: {known})")
    if len(state.sk_d) != key_len:
        raise InvalidArgument(f"{prefix}.sk_d", f"must be {key_len} octets for PRF "
                                                f"{state.prf_id}, got {len(state.sk_d)}")
    _check_range(state.encr_id, 1, MAX_TRANSFORM_ID, f"{prefix}.encr_id")
    _check_range(state.integ_id, 0, MAX_TRANSFORM_ID, f"{prefix}.integ_id")
    _check_range(state.dh_group, 0, MAX_TRANSFORM_ID, f"{prefix}.dh_group")
    _check_range(state.auth_method, 1, 0xFF, f"{prefix}.auth_method")
    _check_range(state.encr_key_bits, 0, MAX_KEY_BITS, f"{prefix}.encr_key_bits")
    if state.encr_key_bits % 8:
        raise InvalidArgument(f"{prefix}.encr_key_bits", "must be a multiple of 8")
    if len(state.gateway_data) > GATEWAY_DATA_MAX_LEN:
        raise InvalidArgument(f"{prefix}.gateway_data", f"at most {GATEWAY_DATA_MAX_LEN} "
                                                        f"octets, got {len(state.gateway_data)}")


def _check_id(value: bytes, field: str) -> None:
    if not ID_MIN_LEN <= len(value) <= ID_MAX_LEN:
        raise InvalidArgument(field, f"an ID payload body of {ID_MIN_LEN} to {ID_MAX_LEN} octets "
                                     f"(type, 3 reserved, data), got {len(value)}")
    if value[0] == 0:
        raise InvalidArgument(field, "ID type 0 is reserved")


def _check_spi(value: bytes, field: str) -> None:
    if len(value) != SPI_LEN:
        raise InvalidArgument(field, f"must be {SPI_LEN} octets, got {len(value)}")
    if value == bytes(SPI_LEN):
        raise InvalidArgument(field, "must not be zero")


def _check_range(value: int, low: int, high: int, field: str) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in {low}..{high}, got {value}")
