"""The device-process wire format (authority/backends/processes/wire.py): round trips, and
every malformed payload a WireError (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authority.backends.base import BackendInfo
from authority.backends.processes import wire
from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    InvalidTicket,
    KeyNotFound,
    UnsealFailed,
)

items = st.lists(st.tuples(st.binary(max_size=16), st.binary(max_size=16),
                           st.binary(max_size=300)), max_size=20)
results = st.lists(st.one_of(st.binary(max_size=300), st.just(UnsealFailed()),
                             st.binary(min_size=8, max_size=8).map(KeyNotFound)), max_size=20)


@given(st.sampled_from(sorted(wire.OPS)), items)
def test_requests_round_trip(op: int, batch: list[tuple[bytes, bytes, bytes]]) -> None:
    assert wire.decode_request(wire.encode_request(op, batch)) == (op, batch)


@given(results)
def test_results_round_trip(batch: list[bytes | InvalidTicket]) -> None:
    decoded = wire.decode_reply(wire.encode_results(batch))
    assert len(decoded) == len(batch)
    for got, sent in zip(decoded, batch, strict=True):
        assert type(got) is type(sent)
        if isinstance(sent, bytes):
            assert got == sent
        elif isinstance(sent, KeyNotFound):
            assert isinstance(got, KeyNotFound) and got.key_id == sent.key_id


def test_failures_come_back_as_the_errors_the_device_raised() -> None:
    with pytest.raises(DeviceUnavailable, match="token gone"):
        wire.decode_reply(wire.encode_failure(wire.DEVICE_UNAVAILABLE, "token gone"))
    with pytest.raises(KeyNotFound) as caught:
        wire.decode_reply(wire.encode_failure(wire.KEY_NOT_FOUND, b"\x01" * 8))
    assert caught.value.key_id == b"\x01" * 8
    with pytest.raises(FailedPrecondition, match="already exists"):
        wire.decode_reply(wire.encode_failure(wire.FAILED_PRECONDITION, "key already exists"))
    bad = InvalidArgument("items[3].plaintext", "too long: at most 996 octets")
    with pytest.raises(InvalidArgument) as invalid:
        wire.decode_reply(wire.encode_invalid_argument(bad))
    assert (invalid.value.field, invalid.value.message) == (bad.field, bad.message)


@given(st.dictionaries(st.text(max_size=20), st.booleans(), max_size=30))
def test_key_attributes_round_trip(flags: dict[str, bool]) -> None:
    assert wire.decode_flags(wire.encode_flags(flags)) == flags


@given(st.text(max_size=40), st.text(max_size=80), st.integers(0, 2**31))
def test_backend_info_round_trips(library: str, token: str, sessions: int) -> None:
    info = BackendInfo(backend="tpm", library=library, token=token, sessions=sessions)
    assert wire.decode_info(wire.encode_info(info)) == info


def mutations(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Well-formed payloads, each with up to three octets overwritten, cut or extended: inputs
    that decode now and then, so that both outcomes are checked."""
    edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3)

    def mutate(payload: bytes, changes: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
        octets = bytearray(payload)
        for position, value in changes:
            if octets:
                octets[position % len(octets)] = value
        return bytes(octets[:len(octets) - cut] if cut else octets) + tail

    return st.builds(mutate, payloads, edits, st.integers(0, 3), st.binary(max_size=2))


requests = st.builds(wire.encode_request, st.sampled_from(sorted(wire.OPS)), items)
replies = st.one_of(
    st.builds(wire.encode_results, results),
    st.builds(wire.encode_failure, st.integers(0, 8), st.binary(max_size=40)),
    st.builds(wire.encode_failure, st.integers(0, 8), st.text(max_size=20)))
json_payloads = st.one_of(
    st.binary(max_size=200), st.just(b"[" * 100_000), st.just(b'{"a": 1}'),
    st.just(b'{"backend": "tpm", "library": 1, "token": "", "sessions": 1}'),
    st.dictionaries(st.text(max_size=8), st.booleans(), max_size=4).map(wire.encode_flags),
    st.builds(BackendInfo, backend=st.text(max_size=8), library=st.text(max_size=8),
              token=st.text(max_size=8), sessions=st.integers(0, 64)).map(wire.encode_info))


@given(json_payloads)
def test_any_json_payload_decodes_to_what_it_says_or_is_a_wire_error(payload: bytes) -> None:
    try:
        flags = wire.decode_flags(payload)
    except wire.WireError:
        pass
    else:
        assert flags == json.loads(payload)
        assert all(type(value) is bool for value in flags.values())
    try:
        info = wire.decode_info(payload)
    except wire.WireError:
        pass
    else:
        fields = json.loads(payload)
        assert info == BackendInfo(backend=fields["backend"], library=fields["library"],
                                   token=fields["token"], sessions=fields["sessions"])
        assert wire.decode_info(wire.encode_info(info)) == info


@given(st.binary(max_size=200) | mutations(requests))
def test_a_request_payload_decodes_to_its_only_encoding_or_is_a_wire_error(
        payload: bytes) -> None:
    try:
        op, batch = wire.decode_request(payload)
    except wire.WireError:
        return
    assert op == payload[0] and op in wire.OPS
    assert len(batch) == int.from_bytes(payload[1:5], "big")
    assert wire.encode_request(op, batch) == payload   # one message, one encoding


@given(st.binary(max_size=200) | mutations(replies))
def test_a_reply_payload_decodes_to_what_it_carries_or_raises_a_known_error(
        payload: bytes) -> None:
    text = payload[2:].decode("utf-8", "replace")
    try:
        decoded = wire.decode_reply(payload)
    except wire.WireError:
        return
    except KeyNotFound as exc:
        assert payload[:2] == bytes([wire.FAILED, wire.KEY_NOT_FOUND])
        assert exc.key_id == payload[2:]
        return
    except DeviceUnavailable as exc:
        assert payload[0] == wire.FAILED
        assert payload[1] in (wire.DEVICE_UNAVAILABLE, wire.STARTUP)
        assert exc.message == text
        return
    except FailedPrecondition as exc:
        assert payload[:2] == bytes([wire.FAILED, wire.FAILED_PRECONDITION])
        assert exc.message == text
        return
    except InvalidArgument as exc:
        assert payload[:2] == bytes([wire.FAILED, wire.INVALID_ARGUMENT])
        field, _, problem = text.partition("\0")
        assert (exc.field, exc.message) == (field, f"{field}: {problem}")
        return
    assert payload[0] == wire.RESULTS
    assert len(decoded) == int.from_bytes(payload[1:5], "big")
    assert wire.encode_results(decoded) == payload    # one message, one encoding


@given(items, st.integers(min_value=0, max_value=40))
def test_a_truncated_request_is_a_wire_error(batch: list[tuple[bytes, bytes, bytes]],
                                             cut: int) -> None:
    payload = wire.encode_request(wire.UNSEAL, batch)
    if cut == 0 or cut > len(payload) - 1:
        return
    with pytest.raises(wire.WireError):
        wire.decode_request(payload[:-cut])


def test_frames_beyond_the_limit_are_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.frame_length((wire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(wire.WireError):
        wire.frame_length(b"\x00\x01")
    assert wire.frame_length(wire.frame(b"abc")[:4]) == 3
