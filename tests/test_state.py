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


def test_good_state_passes_unchanged() -> None:
    state = good()
    assert validate_state(state) is None
    assert state == good()


def refusal(state: ResumptionState) -> str | None:
    """The field a state is refused for, None when it passes."""
    try:
        validate_state(state)
    except InvalidArgument as exc:
        return exc.field
    return None


# Each field at the last value the rules accept, and one step past it (the field refused).
EDGES: list[tuple[str, object, object]] = [
    ("id_i", b"\x02\x00\x00\x00", b"\x02\x00\x00"),
    ("id_i", b"\x02\x00\x00\x00" + b"x" * 252, b"\x02\x00\x00\x00" + b"x" * 253),
    ("id_r", b"\x01\x00\x00\x00", b"\x00\x00\x00\x00"),
    ("spi_i", b"\x00" * 7 + b"\x01", bytes(8)),
    ("spi_r", b"\xff" * 8, b"\xff" * 9),
    ("encr_id", 1, 0),
    ("encr_id", 0xFFFF, 0x10000),
    ("integ_id", 0, -1),
    ("integ_id", 0xFFFF, 0x10000),
    ("dh_group", 0xFFFF, 0x10000),
    ("auth_method", 255, 256),
    ("auth_method", 1, 0),
    ("encr_key_bits", 0, -8),
    ("encr_key_bits", 1024, 1032),
    ("encr_key_bits", 8, 12),
    ("gateway_data", b"x" * 256, b"x" * 257),
]


@pytest.mark.parametrize(("name", "last_good", "first_bad"), EDGES)
def test_each_field_passes_up_to_its_edge_and_not_past_it(name: str, last_good: object,
                                                          first_bad: object) -> None:
    assert refusal(replace(good(), **{name: last_good})) is None  # type: ignore[arg-type]
    assert refusal(replace(good(), **{name: first_bad})) == f"state.{name}"  # type: ignore[arg-type]


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
    assert refusal(replace(good(), prf_id=prf_id, sk_d=b"k" * length)) is None
    for wrong in (length - 1, length + 1):
        assert refusal(replace(good(), prf_id=prf_id, sk_d=b"k" * wrong)) == "state.sk_d"


def test_a_prefix_names_the_fields_of_a_batch_item() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_state(replace(good(), spi_r=bytes(8)), prefix="items[3].state")
    assert info.value.field == "items[3].state.spi_r"
