"""IKEv2 wire codecs (RFC 7296 §3.1, §3.2, §3.9, §3.10; RFC 5723 §4.3, §8): hypothesis round
trips for every codec, strict decoding with named errors, and malformed input (every truncation,
random bytes, random mutations) that must raise PayloadError and nothing else."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authority.ikev2 import payloads as p
from authority.ikev2.notify import (
    TICKET_ACK,
    TICKET_NOTIFY_TYPES,
    TICKET_REQUEST,
)
from authority.ikev2.payloads import (
    COOKIE,
    TICKET_LT_OPAQUE,
    TICKET_NACK,
    TICKET_OPAQUE,
    IkeHeader,
    Notify,
    PayloadError,
    PayloadHeader,
    RawPayload,
    ResumeRequest,
    ResumeResponse,
    TicketLtOpaque,
    TicketOpaque,
    TicketSignal,
)
from authority.ikev2.wire import (
    FLAG_INITIATOR,
    FLAG_RESPONSE,
    FLAG_VERSION,
    IKE_SESSION_RESUME,
    PAYLOAD_NONCE,
    PAYLOAD_NOTIFY,
    PAYLOAD_SA,
    PAYLOAD_VENDOR_ID,
)

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("1112131415161718")
ZERO = bytes(8)
NONCE = bytes(range(32))
TICKET = b"\x01" + bytes(range(60))
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

spis = st.binary(min_size=8, max_size=8)
nonzero_spis = spis.filter(any)
nonces = st.binary(min_size=16, max_size=256)
tickets = st.binary(min_size=1, max_size=300)
bodies = st.binary(max_size=64)
other_status_types = st.integers(16384, 65535).filter(
    lambda t: t != COOKIE and t not in TICKET_NOTIFY_TYPES)
notifies_any = st.builds(Notify, notify_type=st.integers(0, 65535), data=bodies,
                         protocol_id=st.integers(0, 255), spi=st.binary(max_size=16))
status_notifies = st.builds(Notify, notify_type=other_status_types, data=bodies,
                            protocol_id=st.integers(0, 255), spi=st.binary(max_size=8))
vendor_ids = st.lists(bodies, max_size=2).map(tuple)
cookies = st.binary(min_size=1, max_size=64)


# --- round trips ---------------------------------------------------------------------------

ike_headers = st.builds(
    IkeHeader, spi_i=spis, spi_r=spis, next_payload=st.integers(0, 255),
    exchange_type=st.integers(0, 255),
    flags=st.sampled_from([0, FLAG_INITIATOR, FLAG_RESPONSE, FLAG_VERSION,
                           FLAG_INITIATOR | FLAG_VERSION, FLAG_RESPONSE | FLAG_VERSION]),
    message_id=st.integers(0, 2**32 - 1), length=st.integers(28, 2**32 - 1),
    minor_version=st.integers(0, 15))


@FAST
@given(ike_headers)
def test_ike_header_round_trip(header: IkeHeader) -> None:
    octets = p.encode_ike_header(header)
    assert len(octets) == 28
    assert p.decode_ike_header(octets) == header


def test_ike_header_layout() -> None:
    header = IkeHeader(SPI_I, SPI_R, 40, IKE_SESSION_RESUME, FLAG_INITIATOR, 7, 100)
    assert p.encode_ike_header(header) == SPI_I + SPI_R + bytes([40, 0x20, 38, 0x08]) + \
        struct.pack(">II", 7, 100)


@FAST
@given(st.integers(0, 255), st.booleans(), st.integers(4, 65535))
def test_payload_header_round_trip(nxt: int, critical: bool, length: int) -> None:
    header = PayloadHeader(nxt, critical, length)
    assert p.decode_payload_header(p.encode_payload_header(header)) == header


@FAST
@given(st.integers(0, 255), st.booleans(), bodies)
def test_generic_payload_round_trip(nxt: int, critical: bool, body: bytes) -> None:
    octets = p.encode_generic_payload(nxt, body, critical)
    assert p.decode_generic_payload(octets) == (PayloadHeader(nxt, critical, 4 + len(body)), body)


@FAST
@given(nonces, st.integers(0, 255))
def test_nonce_payload_round_trip(nonce: bytes, nxt: int) -> None:
    header, decoded = p.decode_nonce_payload(p.encode_nonce_payload(nonce, nxt))
    assert decoded == nonce and header == PayloadHeader(nxt, False, 4 + len(nonce))


@FAST
@given(notifies_any, st.integers(0, 255))
def test_notify_round_trip(notify: Notify, nxt: int) -> None:
    assert p.decode_notify_body(p.encode_notify_body(notify)) == notify
    header, decoded = p.decode_notify_payload(p.encode_notify_payload(notify, nxt))
    assert decoded == notify and header.next_payload == nxt


ticket_notifies = st.one_of(
    st.builds(TicketLtOpaque, lifetime=st.integers(0, 2**32 - 1), ticket=tickets),
    st.builds(TicketOpaque, ticket=tickets),
    st.builds(TicketSignal, notify_type=st.sampled_from([TICKET_REQUEST, TICKET_ACK,
                                                         TICKET_NACK])))


@FAST
@given(ticket_notifies)
def test_ticket_notify_round_trip(ticket: Any) -> None:
    notify = p.ticket_to_notify(ticket)
    assert notify.protocol_id == 0 and notify.spi == b""
    _, decoded = p.decode_notify_payload(p.encode_notify_payload(notify))
    assert p.ticket_from_notify(decoded) == ticket


def test_ticket_notify_layouts() -> None:
    lt = p.encode_notify_payload(p.ticket_to_notify(TicketLtOpaque(3600, b"T")))
    assert lt == bytes([0, 0, 0, 13, 0, 0]) + struct.pack(">HI", 16409, 3600) + b"T"
    opaque = p.encode_notify_payload(p.ticket_to_notify(TicketOpaque(b"T")))
    assert opaque == bytes([0, 0, 0, 9, 0, 0]) + struct.pack(">H", 16413) + b"T"
    for kind in (16410, 16411, 16412):
        empty = p.encode_notify_payload(p.ticket_to_notify(TicketSignal(kind)))
        assert empty == bytes([0, 0, 0, 8, 0, 0]) + struct.pack(">H", kind)


raw_payloads = st.lists(st.builds(RawPayload, payload_type=st.integers(1, 255),
                                  critical=st.booleans(), body=bodies), max_size=5)


@FAST
@given(raw_payloads)
def test_payload_chain_round_trip(payloads: list[RawPayload]) -> None:
    first, octets = p.encode_payload_chain(payloads)
    assert p.decode_payload_chain(first, octets) == payloads


@FAST
@given(ike_headers, raw_payloads)
def test_message_round_trip(header: IkeHeader, payloads: list[RawPayload]) -> None:
    octets = p.encode_message(header, payloads)
    decoded_header, decoded = p.decode_message(octets)
    assert decoded == payloads
    assert decoded_header.length == len(octets)
    assert (decoded_header.spi_i, decoded_header.flags, decoded_header.message_id) == \
        (header.spi_i, header.flags, header.message_id)


requests = st.builds(ResumeRequest, spi_i=nonzero_spis, nonce=nonces, ticket=tickets,
                     cookie=st.none() | cookies,
                     notifies=st.lists(status_notifies, max_size=2).map(tuple),
                     vendor_ids=vendor_ids)
accepting = st.builds(ResumeResponse, spi_i=nonzero_spis, spi_r=nonzero_spis,
                      nonce=nonces, notifies=st.lists(status_notifies, max_size=2).map(tuple),
                      vendor_ids=vendor_ids)
refusing = st.builds(
    ResumeResponse, spi_i=nonzero_spis, spi_r=spis, nonce=st.none(),
    notifies=st.lists(st.one_of(st.just(Notify(TICKET_NACK)),
                                cookies.map(lambda c: Notify(COOKIE, c)),
                                st.builds(Notify, notify_type=st.integers(1, 16383)),
                                status_notifies), min_size=1, max_size=3).map(tuple),
    vendor_ids=vendor_ids)
responses = st.one_of(accepting, refusing)


@FAST
@given(requests)
def test_resume_request_round_trip(request: ResumeRequest) -> None:
    octets = p.encode_resume_request(request)
    assert p.decode_resume_request(octets) == request
    header, payloads = p.decode_message(octets)
    assert header.spi_r == ZERO and header.exchange_type == 38 and header.flags == FLAG_INITIATOR
    assert header.message_id == 0
    if request.cookie is not None:
        assert p.decode_notify_body(payloads[0].body) == Notify(COOKIE, request.cookie)


@FAST
@given(responses)
def test_resume_response_round_trip(response: ResumeResponse) -> None:
    octets = p.encode_resume_response(response)
    assert p.decode_resume_response(octets) == response


def test_minimal_request_layout() -> None:
    octets = p.encode_resume_request(ResumeRequest(SPI_I, NONCE, TICKET))
    nonce_payload = bytes([PAYLOAD_NOTIFY, 0]) + struct.pack(">H", 36) + NONCE
    notify = bytes([0, 0]) + struct.pack(">H", 8 + len(TICKET)) + bytes([0, 0]) + \
        struct.pack(">H", 16413) + TICKET
    header = SPI_I + ZERO + bytes([PAYLOAD_NONCE, 0x20, 38, 0x08]) + \
        struct.pack(">II", 0, 28 + len(nonce_payload) + len(notify))
    assert octets == header + nonce_payload + notify


def test_response_properties() -> None:
    ok = ResumeResponse(SPI_I, SPI_R, NONCE)
    assert ok.accepted and not ok.nacked and ok.cookie is None
    nack = p.decode_resume_response(p.encode_resume_response(
        ResumeResponse(SPI_I, ZERO, None, (Notify(TICKET_NACK),))))
    assert nack.nacked and not nack.accepted
    busy = ResumeResponse(SPI_I, ZERO, None, (Notify(COOKIE, b"c" * 20),))
    assert p.decode_resume_response(p.encode_resume_response(busy)).cookie == b"c" * 20


# --- strict decoding: each rule has a named error -------------------------------------------

def raw_request(payloads: list[RawPayload], *, spi_i: bytes = SPI_I, spi_r: bytes = ZERO,
                exchange: int = 38, flags: int = FLAG_INITIATOR, message_id: int = 0) -> bytes:
    return p.encode_message(IkeHeader(spi_i, spi_r, 0, exchange, flags, message_id, 0), payloads)


def nonce_p(nonce: bytes = NONCE) -> RawPayload:
    return RawPayload(PAYLOAD_NONCE, False, nonce)


def notify_p(notify: Notify, critical: bool = False) -> RawPayload:
    return RawPayload(PAYLOAD_NOTIFY, critical, p.encode_notify_body(notify))


TICKET_P = notify_p(Notify(TICKET_OPAQUE, TICKET))
COOKIE_P = notify_p(Notify(COOKIE, b"cookie"))


def test_strict_request_baseline_decodes() -> None:
    decoded = p.decode_resume_request(raw_request([COOKIE_P, TICKET_P, nonce_p()]))
    assert decoded == ResumeRequest(SPI_I, NONCE, TICKET, b"cookie")


@pytest.mark.parametrize(("octets", "message"), [
    (raw_request([nonce_p()]), "exactly one TICKET_OPAQUE, got 0"),
    (raw_request([nonce_p(), TICKET_P, TICKET_P]), "exactly one TICKET_OPAQUE, got 2"),
    (raw_request([TICKET_P]), "exactly one Nonce payload, got 0"),
    (raw_request([nonce_p(), nonce_p(), TICKET_P]), "exactly one Nonce payload, got 2"),
    (raw_request([nonce_p(), COOKIE_P, TICKET_P]), "COOKIE must appear at most once"),
    (raw_request([COOKIE_P, COOKIE_P, nonce_p(), TICKET_P]), "COOKIE must appear at most"),
    (raw_request([notify_p(Notify(COOKIE, bytes(65))), nonce_p(), TICKET_P]),
     "COOKIE: 65 octets"),
    (raw_request([notify_p(Notify(COOKIE)), nonce_p(), TICKET_P]), "COOKIE: 0 octets"),
    (raw_request([nonce_p(bytes(15)), TICKET_P]), "Nonce: 15 octets, must be 16..256"),
    (raw_request([nonce_p(bytes(257)), TICKET_P]), "Nonce: 257 octets"),
    (raw_request([nonce_p(), TICKET_P], spi_r=SPI_R), "SPIr must be zero"),
    (raw_request([nonce_p(), TICKET_P], spi_i=ZERO), "SPIi must be 8 non-zero octets"),
    (raw_request([nonce_p(), TICKET_P], exchange=34), "expected IKE_SESSION_RESUME"),
    (raw_request([nonce_p(), TICKET_P], flags=FLAG_INITIATOR | FLAG_RESPONSE),
     "R flag must be clear"),
    (raw_request([nonce_p(), TICKET_P], flags=0), "I flag must be set"),
    (raw_request([nonce_p(), TICKET_P], message_id=1), "message id must be 0"),
    (raw_request([nonce_p(), TICKET_P, RawPayload(PAYLOAD_SA, False, b"")]),
     "payload type 33 does not belong"),
    (raw_request([nonce_p(), TICKET_P, RawPayload(200, True, b"x")]),
     "unsupported critical payload type 200"),
    (raw_request([nonce_p(), notify_p(Notify(TICKET_OPAQUE, TICKET, protocol_id=1))]),
     "TICKET_OPAQUE: protocol id must be 0"),
    (raw_request([nonce_p(), notify_p(Notify(TICKET_OPAQUE, TICKET, spi=b"\x01" * 4))]),
     "TICKET_OPAQUE: SPI size must be 0"),
    (raw_request([nonce_p(), notify_p(Notify(TICKET_OPAQUE))]), "TICKET_OPAQUE: ticket missing"),
    (raw_request([nonce_p(), TICKET_P, notify_p(Notify(TICKET_ACK, b"x"))]),
     "TICKET_ACK: must carry no data"),
])
def test_request_rules(octets: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        p.decode_resume_request(octets)


def test_unknown_non_critical_payload_is_skipped() -> None:
    octets = raw_request([nonce_p(), RawPayload(200, False, b"ignored"), TICKET_P])
    assert p.decode_resume_request(octets) == ResumeRequest(SPI_I, NONCE, TICKET)


def test_reserved_bits_and_minor_version_are_ignored() -> None:
    octets = bytearray(p.encode_resume_request(ResumeRequest(SPI_I, NONCE, TICKET)))
    octets[17] = 0x2F          # minor version 15
    octets[19] |= 0x07 | 0xC0  # reserved flag bits
    octets[28 + 1] |= 0x7F     # reserved bits of the first payload header
    assert p.decode_resume_request(bytes(octets)) == ResumeRequest(SPI_I, NONCE, TICKET)


def _with_header_field(octets: bytes, offset: int, value: bytes) -> bytes:
    return octets[:offset] + value + octets[offset + len(value):]


GOOD = p.encode_resume_request(ResumeRequest(SPI_I, NONCE, TICKET))


@pytest.mark.parametrize(("octets", "message"), [
    (b"", "message truncated: 0 octets"),
    (GOOD[:27], "message truncated"),
    (GOOD + b"\x00", "length field says"),
    (_with_header_field(GOOD, 24, struct.pack(">I", len(GOOD) + 4)) + bytes(4),
     "4 trailing octets after the last payload"),
    (_with_header_field(GOOD, 17, b"\x30"), "unsupported major version 3"),
    (_with_header_field(GOOD, 24, struct.pack(">I", 27)), "shorter than the header"),
    (_with_header_field(GOOD, 30, struct.pack(">H", 3)), "shorter than the header"),
    (_with_header_field(GOOD, 30, struct.pack(">H", 4000)), "runs past the end"),
    (_with_header_field(GOOD, 16, bytes([PAYLOAD_VENDOR_ID])), "exactly one Nonce"),
    (GOOD[:-1] , "length field says"),
])
def test_framing_rules(octets: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        p.decode_resume_request(octets)


def test_chain_ending_early_is_trailing_octets() -> None:
    first, chain = p.encode_payload_chain([nonce_p(), TICKET_P])
    broken = bytes([0]) + chain[1:]  # first payload says "no next payload"
    with pytest.raises(PayloadError, match="trailing octets"):
        p.decode_payload_chain(first, broken)
    with pytest.raises(PayloadError, match="header truncated"):
        p.decode_payload_chain(first, chain[:2])


@pytest.mark.parametrize(("notify", "message"), [
    (Notify(TICKET_LT_OPAQUE, b"\x00\x00\x0e"), "TICKET_LT_OPAQUE: lifetime missing"),
    (Notify(TICKET_LT_OPAQUE, b"\x00\x00\x0e\x10"), "TICKET_LT_OPAQUE: ticket missing"),
    (Notify(TICKET_LT_OPAQUE, b"\x00\x00\x0e\x10T", protocol_id=3),
     "TICKET_LT_OPAQUE: protocol id must be 0, got 3"),
    (Notify(TICKET_LT_OPAQUE, b"\x00\x00\x0e\x10T", spi=b"x"), "SPI size must be 0, got 1"),
    (Notify(TICKET_OPAQUE), "TICKET_OPAQUE: ticket missing"),
    (Notify(TICKET_REQUEST, b"x"), "TICKET_REQUEST: must carry no data"),
    (Notify(TICKET_NACK, protocol_id=1), "TICKET_NACK: protocol id must be 0"),
    (Notify(COOKIE, b"x"), "not an RFC 5723 ticket notify"),
])
def test_ticket_notify_rules(notify: Notify, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        p.ticket_from_notify(notify)


def test_ticket_lt_opaque_decodes_lifetime() -> None:
    notify = Notify(TICKET_LT_OPAQUE, struct.pack(">I", 2**32 - 1) + b"ticket")
    assert p.ticket_from_notify(notify) == TicketLtOpaque(2**32 - 1, b"ticket")


@pytest.mark.parametrize(("body", "message"), [
    (b"\x00\x00\x40", "fixed part needs 4"),
    (b"\x00\x04\x40\x1d\x00", "SPI Size 4 runs past the end"),
])
def test_notify_body_rules(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        p.decode_notify_body(body)


def raw_response(payloads: list[RawPayload], spi_r: bytes = SPI_R,
                 flags: int = FLAG_RESPONSE) -> bytes:
    return raw_request(payloads, spi_r=spi_r, flags=flags)


@pytest.mark.parametrize(("octets", "message"), [
    (raw_response([]), "neither a Nonce nor a Notify"),
    (raw_response([nonce_p()], spi_r=ZERO), "non-zero SPIr"),
    (raw_response([nonce_p(), notify_p(Notify(TICKET_NACK))]), "Nr together with TICKET_NACK"),
    (raw_response([nonce_p(), notify_p(Notify(24))]), "Nr together with"),
    (raw_response([nonce_p(), nonce_p()]), "2 Nonce payloads"),
    (raw_response([nonce_p()], flags=FLAG_INITIATOR), "R flag must be set"),
    (raw_response([nonce_p()], flags=FLAG_RESPONSE | FLAG_INITIATOR), "I flag must be clear"),
    (raw_response([notify_p(Notify(TICKET_NACK, b"x"))]), "TICKET_NACK: must carry no data"),
    (raw_response([RawPayload(250, True, b"")]), "unsupported critical payload type 250"),
])
def test_response_rules(octets: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        p.decode_resume_response(octets)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: p.encode_resume_request(ResumeRequest(ZERO, NONCE, TICKET)), "SPIi"),
    (lambda: p.encode_resume_request(ResumeRequest(SPI_I, NONCE[:15], TICKET)), "Nonce"),
    (lambda: p.encode_resume_request(ResumeRequest(SPI_I, NONCE, b"")), "ticket missing"),
    (lambda: p.encode_resume_request(ResumeRequest(SPI_I, NONCE, TICKET, b"")), "COOKIE"),
    (lambda: p.encode_resume_request(ResumeRequest(SPI_I, NONCE, TICKET, None,
                                                   (Notify(COOKIE, b"c"),))), "own fields"),
    (lambda: p.encode_resume_request(ResumeRequest(SPI_I, NONCE, bytes(70000))), "too long"),
    (lambda: p.encode_resume_response(ResumeResponse(SPI_I, ZERO, NONCE)), "non-zero SPIr"),
    (lambda: p.encode_resume_response(ResumeResponse(SPI_I, SPI_R)), "neither"),
    (lambda: p.encode_resume_response(ResumeResponse(SPI_I, SPI_R[:4], NONCE)), "SPIr must be"),
    (lambda: p.encode_ike_header(IkeHeader(SPI_I, SPI_R, 0, 38, 0x01, 0, 28)), "reserved flag"),
    (lambda: p.encode_ike_header(IkeHeader(SPI_I, SPI_R[:7], 0, 38, 0, 0, 28)), "8 octets"),
    (lambda: p.encode_ike_header(IkeHeader(SPI_I, SPI_R, 0, 38, 0, 0, 28, 3)), "major"),
    (lambda: p.encode_ike_header(IkeHeader(SPI_I, SPI_R, 0, 38, 0, 2**32, 28)), "message id"),
    (lambda: p.encode_ike_header(IkeHeader(SPI_I, SPI_R, 0, 38, 0, 0, 20)), "shorter"),
    (lambda: p.encode_payload_header(PayloadHeader(0, False, 3)), "outside 4..65535"),
    (lambda: p.encode_notify_body(Notify(70000)), "type 70000"),
    (lambda: p.encode_notify_body(Notify(1, protocol_id=256)), "protocol id 256"),
    (lambda: p.encode_notify_body(Notify(1, spi=bytes(256))), "SPI of 256"),
    (lambda: p.ticket_to_notify(TicketLtOpaque(-1, b"t")), "lifetime -1"),
    (lambda: p.ticket_to_notify(TicketLtOpaque(2**32, b"t")), "lifetime"),
    (lambda: p.ticket_to_notify(TicketSignal(TICKET_OPAQUE)), "not a ticket signal"),
    (lambda: p.encode_payload_chain([RawPayload(0, False, b"")]), "outside 1..255"),
])
def test_encoders_refuse_bad_values(call: Callable[[], object], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        call()


# --- malformed input: PayloadError, or a value that matches the octets -------------------

FLAG_BITS = FLAG_INITIATOR | FLAG_RESPONSE | FLAG_VERSION
CRITICAL_BIT = 0x80


def reserved_bits_cleared(payload: bytes) -> bytes:
    """One payload with the RESERVED bits of its generic header cleared (§3.2: ignored on
    receipt, so the re-encoding has them zero)."""
    return payload[:1] + bytes([payload[1] & CRITICAL_BIT]) + payload[2:]


def check_ike_header(octets: bytes, header: IkeHeader) -> None:
    assert p.encode_ike_header(header) == octets[:19] + bytes([octets[19] & FLAG_BITS]) + \
        octets[20:]


def check_payload_header(octets: bytes, header: PayloadHeader) -> None:
    assert p.encode_payload_header(header) == reserved_bits_cleared(octets)


def check_generic(octets: bytes, value: tuple[PayloadHeader, bytes]) -> None:
    header, body = value
    assert body == octets[4:] and header.length == len(octets)
    assert p.encode_generic_payload(header.next_payload, body, header.critical) == \
        reserved_bits_cleared(octets)


def check_notify_payload(octets: bytes, value: tuple[PayloadHeader, Notify]) -> None:
    header, notify = value
    assert p.encode_notify_payload(notify, header.next_payload, header.critical) == \
        reserved_bits_cleared(octets)


def check_chain(octets: bytes, payloads: list[RawPayload]) -> None:
    first, data = (octets[0] if octets else 0), octets[1:]
    assert (payloads[0].payload_type if payloads else 0) == first
    assert sum(4 + len(payload.body) for payload in payloads) == len(data)
    assert p.decode_payload_chain(*p.encode_payload_chain(payloads)) == payloads


def check_message(octets: bytes, value: tuple[IkeHeader, list[RawPayload]]) -> None:
    header, payloads = value
    assert (header.spi_i, header.spi_r, header.length) == (octets[:8], octets[8:16], len(octets))
    assert p.decode_message(p.encode_message(header, payloads)) == value


def check_request(octets: bytes, request: ResumeRequest) -> None:
    assert request.spi_i == octets[:8] and octets[8:16] == ZERO
    assert request.nonce in octets and request.ticket in octets
    assert p.decode_resume_request(p.encode_resume_request(request)) == request


def check_response(octets: bytes, response: ResumeResponse) -> None:
    assert (response.spi_i, response.spi_r) == (octets[:8], octets[8:16])
    assert p.decode_resume_response(p.encode_resume_response(response)) == response


def check_notify_body(octets: bytes, notify: Notify) -> None:
    assert p.encode_notify_body(notify) == octets


def ticket_of(octets: bytes) -> Any:
    return p.ticket_from_notify(p.decode_notify_body(octets))


def check_ticket(octets: bytes, ticket: Any) -> None:
    assert p.encode_notify_body(p.ticket_to_notify(ticket)) == octets


# Each decoder, and what a value it returns must say about the octets it came from.
DECODERS: dict[str, tuple[Callable[[bytes], Any], Callable[[bytes, Any], None]]] = {
    "resume_request": (p.decode_resume_request, check_request),
    "resume_response": (p.decode_resume_response, check_response),
    "message": (p.decode_message, check_message),
    "ike_header": (p.decode_ike_header, check_ike_header),
    "payload_header": (p.decode_payload_header, check_payload_header),
    "generic_payload": (p.decode_generic_payload, check_generic),
    "nonce_payload": (p.decode_nonce_payload, check_generic),
    "notify_payload": (p.decode_notify_payload, check_notify_payload),
    "notify_body": (p.decode_notify_body, check_notify_body),
    "payload_chain": (lambda b: p.decode_payload_chain(b[0] if b else 0, b[1:]), check_chain),
    "ticket_notify": (ticket_of, check_ticket),
}


def decoded_or_payload_error(name: str, octets: bytes) -> bool:
    """Decode ``octets`` with decoder ``name``: either PayloadError (False) or a value whose
    check against the octets holds (True)."""
    decode, check = DECODERS[name]
    try:
        value = decode(octets)
    except PayloadError:
        return False
    check(octets, value)
    return True


@FAST
@given(requests)
def test_every_truncated_request_raises(request: ResumeRequest) -> None:
    octets = p.encode_resume_request(request)
    for cut in range(len(octets)):
        with pytest.raises(PayloadError):
            p.decode_resume_request(octets[:cut])


@FAST
@given(responses)
def test_every_truncated_response_raises(response: ResumeResponse) -> None:
    octets = p.encode_resume_response(response)
    for cut in range(len(octets)):
        with pytest.raises(PayloadError):
            p.decode_resume_response(octets[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_to_what_they_carry_or_raise_payload_error(octets: bytes) -> None:
    for name in DECODERS:
        decoded_or_payload_error(name, octets)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([FLAG_INITIATOR, FLAG_RESPONSE]), nonzero_spis, spis,
       st.integers(0, 255), st.binary(max_size=160))
def test_random_payloads_behind_a_valid_header(flags: int, spi_i: bytes, spi_r: bytes,
                                               first: int, body: bytes) -> None:
    header = IkeHeader(spi_i, spi_r, first, IKE_SESSION_RESUME, flags, 0, 28 + len(body))
    octets = p.encode_ike_header(header) + body
    for name in ("resume_request", "resume_response", "message"):
        decoded_or_payload_error(name, octets)


@settings(max_examples=200, deadline=None)
@given(st.one_of(requests.map(p.encode_resume_request),
                 responses.map(p.encode_resume_response)),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_messages_decode_to_what_they_carry_or_raise(octets: bytes,
                                                   edits: list[tuple[int, int]]) -> None:
    mutated = bytearray(octets)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    assume(bytes(mutated) != octets)
    for name in ("resume_request", "resume_response", "message"):
        decoded_or_payload_error(name, bytes(mutated))


def chain_octets(payloads: list[RawPayload]) -> bytes:
    first, data = p.encode_payload_chain(payloads)
    return bytes([first]) + data


single_payloads = st.one_of(
    ike_headers.map(p.encode_ike_header),
    st.builds(p.encode_generic_payload, st.integers(0, 255), bodies, st.booleans()),
    st.builds(p.encode_nonce_payload, nonces, st.integers(0, 255), st.booleans()),
    st.builds(p.encode_notify_payload, notifies_any, st.integers(0, 255), st.booleans()),
    notifies_any.map(p.encode_notify_body),
    ticket_notifies.map(lambda ticket: p.encode_notify_body(p.ticket_to_notify(ticket))),
    raw_payloads.map(chain_octets))


@settings(max_examples=300, deadline=None)
@given(single_payloads,
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=2),
       st.integers(0, 2), st.binary(max_size=2))
def test_payloads_with_edits_decode_to_what_they_carry_or_raise(
        octets: bytes, edits: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    mutated = bytearray(octets)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    edited = bytes(mutated[:len(mutated) - cut] if cut else mutated) + tail
    for name in DECODERS:
        decoded_or_payload_error(name, edited)
