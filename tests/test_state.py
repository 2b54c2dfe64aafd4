"""Validation of the state a gateway asks to seal: each violation names its field."""

from __future__ import annotations

from dataclasses import replace

import pytest

from authority.errors import InvalidArgument
from authority.state import ResumptionState, validate_state


def good() -> ResumptionState:
    return ResumptionState(id_i=b"\x02\x00\x00\x00client", id_r=b"\x02\x00\x00\x00gw",
                           spi_i=b"\x01" * 8, spi_r=b"\x02" * 8, sk_d=b"k" * 32, encr_id=20,
                           encr_key_bits=256, prf_id=5, integ_id=0, dh_group=19, auth_method=1)


def test_good_state_passes() -> None:
    validate_state(good())


@pytest.mark.parametrize(("change", "field"), [
    ({"id_i": b"\x02\x00\x00"}, "state.id_i"),
    ({"id_i": b"\x00\x00\x00\x00x"}, "state.id_i"),
    ({"id_r": b"\x02\x00\x00\x00" + b"x" * 300}, "state.id_r"),
    ({"spi_i": b"\x01" * 7}, "state.spi_i"),
    ({"spi_r": bytes(8)}, "state.spi_r"),
    ({"prf_id": 3}, "state.prf_id"),
    ({"prf_id": 0}, "state.prf_id"),
    ({"sk_d": b"k" * 20}, "state.sk_d"),
    ({"prf_id": 7}, "state.sk_d"),
    ({"encr_id": 0}, "state.encr_id"),
    ({"encr_id": 70000}, "state.encr_id"),
    ({"encr_key_bits": 100}, "state.encr_key_bits"),
    ({"integ_id": 1 << 16}, "state.integ_id"),
    ({"dh_group": 1 << 20}, "state.dh_group"),
    ({"auth_method": 0}, "state.auth_method"),
    ({"auth_method": 256}, "state.auth_method"),
    ({"gateway_data": b"x" * 257}, "state.gateway_data"),
])
def test_violation_names_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_state(replace(good(), **change))  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize(("prf_id", "length"), [(2, 20), (4, 16), (5, 32), (6, 48), (7, 64),
                                                (8, 16)])
def test_sk_d_length_follows_prf(prf_id: int, length: int) -> None:
    validate_state(replace(good(), prf_id=prf_id, sk_d=b"k" * length))
