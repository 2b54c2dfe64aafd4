"""The v1 wire format, pinned byte for byte, and fuzzed."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from authority.errors import InvalidTicket
from authority.state import PRF_KEY_LENGTHS, ResumptionState
from authority.ticket_format import (
    FORMAT_V1,
    FORMAT_V2_TPM,
    HEADER_LEN,
    MAX_TICKET_LEN,
    MIN_TICKET_LEN,
    NONCE_LEN,
    SEAL_OVERHEAD,
    TAG_LEN,
    TicketContents,
    assemble_ticket,
    decode_contents,
    encode_contents,
    encode_header,
    parse_ticket,
)

VECTOR = json.loads((Path(__file__).parent / "vectors" / "ticket_v1.json").read_text())


def vector_state() -> ResumptionState:
    raw = VECTOR["state"]
    return ResumptionState(**{k: bytes.fromhex(v) if isinstance(v, str) else v
                              for k, v in raw.items()})


def vector_contents() -> TicketContents:
    return TicketContents(bytes.fromhex(VECTOR["ticket_id"]), VECTOR["issued_at"],
                          VECTOR["expires_at"], vector_state())


def test_header_is_pinned() -> None:
    assert encode_header(bytes.fromhex(VECTOR["key_id"])).hex() == VECTOR["header"]


def test_plaintext_is_pinned() -> None:
    assert encode_contents(vector_contents()).hex() == VECTOR["plaintext"]


def test_pinned_ticket_opens_with_software_aes_gcm() -> None:
    """The format is exactly AES-256-GCM(nonce, plaintext, aad=header): any AEAD library that
    holds the key (here a published test key, never a real one) opens a pinned ticket."""
    ticket = bytes.fromhex(VECTOR["ticket"])
    parsed = parse_ticket(ticket)
    assert parsed.key_id.hex() == VECTOR["key_id"]
    assert parsed.header.hex() == VECTOR["header"]
    nonce, body = parsed.sealed[:NONCE_LEN], parsed.sealed[NONCE_LEN:]
    assert nonce.hex() == VECTOR["nonce"]
    plaintext = AESGCM(bytes.fromhex(VECTOR["aes256_key"])).decrypt(nonce, body, parsed.header)
    assert decode_contents(plaintext) == vector_contents()


def test_layout_offsets() -> None:
    ticket = bytes.fromhex(VECTOR["ticket"])
    assert ticket[0] == 1 and ticket[1:4] == bytes(3)
    assert ticket[4:12].hex() == VECTOR["key_id"]
    assert ticket[12:24].hex() == VECTOR["nonce"]
    assert len(ticket) == HEADER_LEN + NONCE_LEN + len(VECTOR["plaintext"]) // 2 + TAG_LEN


def test_typical_ticket_is_at_most_400_octets() -> None:
    state = replace(vector_state(), id_i=bytes([2, 0, 0, 0]) + b"i" * 26,
                    id_r=bytes([2, 0, 0, 0]) + b"r" * 26, gateway_data=b"")
    contents = replace(vector_contents(), state=state)
    size = HEADER_LEN + NONCE_LEN + len(encode_contents(contents)) + TAG_LEN
    assert size <= 400


@pytest.mark.parametrize("ticket", [b"", b"\x01", bytes(MIN_TICKET_LEN - 1),
                                    bytes(MAX_TICKET_LEN + 1)])
def test_bad_lengths_are_invalid(ticket: bytes) -> None:
    with pytest.raises(InvalidTicket):
        parse_ticket(ticket)


def test_unknown_version_and_nonzero_reserved_are_invalid() -> None:
    ticket = bytearray.fromhex(VECTOR["ticket"])
    for position, value in ((0, 3), (0, 0), (0, 0xFF), (1, 1), (3, 0x80)):
        bad = bytearray(ticket)
        bad[position] = value
        with pytest.raises(InvalidTicket):
            parse_ticket(bytes(bad))


def test_minimum_length_depends_on_the_version() -> None:
    v1 = bytes.fromhex(VECTOR["header"]) + bytes(MIN_TICKET_LEN - HEADER_LEN)
    assert parse_ticket(v1).version == FORMAT_V1
    v2 = encode_header(bytes(8), FORMAT_V2_TPM) + bytes(MIN_TICKET_LEN - HEADER_LEN)
    with pytest.raises(InvalidTicket, match="version 2"):
        parse_ticket(v2)
    extra = SEAL_OVERHEAD[FORMAT_V2_TPM] - SEAL_OVERHEAD[FORMAT_V1]
    assert parse_ticket(v2 + bytes(extra)).version == FORMAT_V2_TPM


def test_every_plaintext_truncation_is_invalid() -> None:
    plaintext = bytes.fromhex(VECTOR["plaintext"])
    for cut in range(len(plaintext)):
        with pytest.raises(InvalidTicket):
            decode_contents(plaintext[:cut])


def test_trailing_octets_are_invalid() -> None:
    with pytest.raises(InvalidTicket):
        decode_contents(bytes.fromhex(VECTOR["plaintext"]) + b"\x00")


def test_assemble_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match="limits"):
        assemble_ticket(encode_header(bytes(8)), b"short")


@given(st.binary(max_size=2 * MAX_TICKET_LEN))
def test_parse_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(InvalidTicket):
        parse_ticket(data)


@given(st.binary(max_size=1200))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(InvalidTicket):
        decode_contents(data)


states = st.builds(
    ResumptionState,
    id_i=st.binary(min_size=4, max_size=256), id_r=st.binary(min_size=4, max_size=256),
    spi_i=st.binary(min_size=8, max_size=8), spi_r=st.binary(min_size=8, max_size=8),
    sk_d=st.sampled_from(sorted(set(PRF_KEY_LENGTHS.values()))).flatmap(
        lambda n: st.binary(min_size=n, max_size=n)),
    encr_id=st.integers(0, 0xFFFF), encr_key_bits=st.integers(0, 0xFFFF),
    prf_id=st.integers(0, 0xFFFF), integ_id=st.integers(0, 0xFFFF),
    dh_group=st.integers(0, 0xFFFF), auth_method=st.integers(0, 0xFF),
    gateway_data=st.binary(max_size=256))


@given(states, st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1))
def test_contents_round_trip(state: ResumptionState, ticket_id: bytes, issued: int,
                             expires: int) -> None:
    contents = TicketContents(ticket_id, issued, expires, state)
    assert decode_contents(encode_contents(contents)) == contents


def test_state_repr_hides_sk_d() -> None:
    assert VECTOR["state"]["sk_d"] not in repr(vector_state())
    assert "sk_d=<32 octets>" in repr(vector_state())
