"""The gateway kit's pieces for a full IKEv2 exchange: SA payload codec and proposal choice,
group 19 key exchange, the shared-key AUTH of RFC 7296 §2.15, the two readings of the resumed
AUTH, the responder engine's refusal to crash on anything a peer sends, and its bound on
half-open SAs (an index of their own: no walk over the established ones per new SA)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authority.gateway import Engine, GatewaySettings
from authority.gateway.session import IkeSa
from authority.ikev2.auth import MESSAGE_ONLY, RFC5723, auth_initiator, auth_responder, psk_auth
from authority.ikev2.bodies import ID_FQDN, id_body
from authority.ikev2.ecdh import DH_ECP_256, Ecp256, KeyExchange, decode_ke_body, encode_ke_body
from authority.ikev2.errors import PayloadError
from authority.ikev2.proposals import (
    PROTOCOL_IKE,
    TRANSFORM_DH,
    TRANSFORM_ENCR,
    TRANSFORM_INTEG,
    TRANSFORM_PRF,
    Acceptable,
    Proposal,
    Transform,
    choose_ike_suite,
    decode_sa_body,
    encode_sa_body,
    suite_proposal,
)
from authority.ikev2.wire import IKE_SA_INIT, IkeHeader, encode_ike_header

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

GCM16, CBC, SHA256, SHA512, HMAC_SHA2_256_128 = 20, 12, 5, 7, 12
PSK = b"0123456789abcdef0123456789abcdef"
ACCEPT = Acceptable(encryption=((GCM16, 256), (GCM16, 128)), prfs=(SHA256, SHA512),
                    dh_groups=(DH_ECP_256,))


def _proposal(number: int, *transforms: Transform) -> Proposal:
    return Proposal(number, PROTOCOL_IKE, b"", transforms)


def _gcm(bits: int = 256, prf: int = SHA256, dh: int = DH_ECP_256) -> tuple[Transform, ...]:
    return (Transform(TRANSFORM_ENCR, GCM16, bits), Transform(TRANSFORM_PRF, prf),
            Transform(TRANSFORM_DH, dh))


# -- the SA payload ------------------------------------------------------------------------------

def test_an_sa_body_round_trips_byte_exact() -> None:
    body = encode_sa_body([_proposal(1, *_gcm()), _proposal(2, Transform(TRANSFORM_ENCR, CBC, 128),
                                                            Transform(TRANSFORM_INTEG, 12),
                                                            Transform(TRANSFORM_PRF, SHA256),
                                                            Transform(TRANSFORM_DH, 14))])
    assert decode_sa_body(body)[0] == _proposal(1, *_gcm())
    assert encode_sa_body(decode_sa_body(body)) == body
    # RFC 7296 §3.3: proposal 1 is 8 + 3 transforms (12 with the key length, 8, 8) = 36 octets,
    # Last Substruc 2 (more follow), Key Length as a TV attribute 0x800e.
    assert body[:8] == bytes([2, 0, 0, 36, 1, 1, 0, 3])
    assert body[8:20] == bytes([3, 0, 0, 12, 1, 0, 0, 20, 0x80, 0x0e, 1, 0])


@pytest.mark.parametrize("offered, chosen", [
    ([_gcm()], (1, GCM16, 256, SHA256)),
    ([_gcm(128, SHA512)], (1, GCM16, 128, SHA512)),
    # the initiator's order of proposals wins; the first acceptable one is taken
    ([(Transform(TRANSFORM_ENCR, CBC, 256), Transform(TRANSFORM_INTEG, HMAC_SHA2_256_128),
       Transform(TRANSFORM_PRF, SHA256), Transform(TRANSFORM_DH, DH_ECP_256)), _gcm()],
     (2, GCM16, 256, SHA256)),
    ([_gcm(dh=14)], None),                      # no acceptable group
    ([_gcm(192)], None),                        # no acceptable key size
    ([(*_gcm(), Transform(TRANSFORM_INTEG, HMAC_SHA2_256_128))], None),  # integ with AEAD
])
def test_the_choice_follows_the_initiators_order_and_the_acceptable_set(
        offered: list[tuple[Transform, ...]], chosen: tuple[int, int, int, int] | None) -> None:
    proposals = [_proposal(i + 1, *t) for i, t in enumerate(offered)]
    suite = choose_ike_suite(decode_sa_body(encode_sa_body(proposals)), ACCEPT)
    got = None if suite is None else (suite.proposal_number, suite.encr_id,
                                      suite.encr_key_bits, suite.prf_id)
    assert got == chosen


def test_the_answer_carries_one_transform_of_each_type_numbered_as_offered() -> None:
    suite = choose_ike_suite([_proposal(7, *_gcm())], ACCEPT)
    assert suite is not None
    assert suite_proposal(suite) == _proposal(7, *_gcm())


@pytest.mark.parametrize("body", [b"", b"\x00", bytes([0, 0, 0, 8, 1, 1, 0, 1]),
                                  bytes([0, 0, 0, 200, 1, 1, 0, 0]),
                                  bytes([2, 0, 0, 8, 1, 1, 0, 0])])
def test_malformed_sa_bodies_are_payload_errors(body: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_sa_body(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_sa_body_decodes_or_is_a_payload_error(body: bytes) -> None:
    try:
        proposals = decode_sa_body(body)
    except PayloadError:
        return
    choose_ike_suite(proposals, ACCEPT)


# -- group 19 --------------------------------------------------------------------------------

def test_both_sides_of_group_19_agree_and_the_ke_body_round_trips() -> None:
    a, b = Ecp256(), Ecp256()
    assert len(a.public) == 64 and a.shared(b.public) == b.shared(a.public)
    assert len(a.shared(b.public)) == 32
    body = encode_ke_body(KeyExchange(DH_ECP_256, a.public))
    assert body[:4] == b"\x00\x13\x00\x00"
    assert decode_ke_body(body) == KeyExchange(DH_ECP_256, a.public)


@pytest.mark.parametrize("peer", [bytes(64), b"\x01" * 64, b"\x02" * 63])
def test_a_value_off_the_curve_is_refused(peer: bytes) -> None:
    with pytest.raises(PayloadError):
        Ecp256().shared(peer)


# -- AUTH ------------------------------------------------------------------------------------

def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def test_the_shared_key_auth_is_rfc_7296_section_2_15() -> None:
    sk_pi, message, nonce = os.urandom(32), b"\x11" * 28 + b"payloads", os.urandom(32)
    id_i = id_body(ID_FQDN, b"client.example")
    octets = message + nonce + _hmac(sk_pi, id_i)
    expected = _hmac(_hmac(PSK, b"Key Pad for IKEv2"), octets)
    assert psk_auth(SHA256, PSK, sk_pi, message, nonce, id_i) == expected
    with pytest.raises(ValueError, match="pre-shared key"):
        psk_auth(SHA256, b"", sk_pi, message, nonce, id_i)


def test_the_two_readings_of_the_resumed_auth() -> None:
    sk, message, nonce = os.urandom(32), b"\x22" * 28 + b"resume", os.urandom(32)
    id_r = id_body(ID_FQDN, b"gateway.example")
    rfc = _hmac(sk, message + nonce + _hmac(sk, id_r))
    assert auth_responder(SHA256, sk, message, nonce, id_r) == rfc
    assert auth_responder(SHA256, sk, message, nonce, id_r, RFC5723) == rfc
    assert auth_initiator(SHA256, sk, message, nonce, id_r, MESSAGE_ONLY) == _hmac(sk, message)
    with pytest.raises(ValueError, match="reading"):
        auth_initiator(SHA256, sk, message, nonce, id_r, "libreswan")


# -- settings and the engine -------------------------------------------------------------------

def _settings(**changes: object) -> GatewaySettings:
    values: dict[str, object] = {"local_id": id_body(ID_FQDN, b"gateway.example"), "psk": PSK}
    values.update(changes)
    return GatewaySettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes, field", [
    ({"psk": b"short"}, "psk"), ({"resumed_auth": "libreswan"}, "resumed_auth"),
    ({"local_id": b"\x02\x00\x00\x00"}, "local_id"), ({"ticket_lifetime": -1}, "ticket_lifetime"),
])
def test_settings_name_the_wrong_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _settings(**changes)


def test_the_settings_never_show_the_key() -> None:
    assert PSK.hex() not in repr(_settings()) and str(PSK) not in repr(_settings())


class _NoAuthority:
    """A ticket service that fails the test if the engine calls it for junk."""

    def issue(self, *_: object, **__: object) -> object:
        raise AssertionError("junk reached the authority")

    redeem = consume = issue


def _sa_init(payload_bytes: bytes) -> bytes:
    header = IkeHeader(os.urandom(8), bytes(8), 33, IKE_SA_INIT, 0x08, 0, 28 + len(payload_bytes))
    return encode_ike_header(header) + payload_bytes


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=160).map(_sa_init)))
def test_the_engine_drops_what_it_cannot_parse_and_never_raises(data: bytes) -> None:
    engine = Engine(_settings(), _NoAuthority())  # type: ignore[arg-type]
    reply = engine.handle(data, ("192.0.2.1", 500))
    assert reply is None or len(reply) >= 28
    assert engine.sas == {}


def _real_sa_init() -> bytes:
    from authority.ikev2.wire import (
        PAYLOAD_KE,
        PAYLOAD_NONCE,
        PAYLOAD_SA,
        RawPayload,
        encode_message,
    )
    payloads = [RawPayload(PAYLOAD_SA, False, encode_sa_body([_proposal(1, *_gcm())])),
                RawPayload(PAYLOAD_KE, False,
                           encode_ke_body(KeyExchange(DH_ECP_256, Ecp256().public))),
                RawPayload(PAYLOAD_NONCE, False, os.urandom(32))]
    return encode_message(IkeHeader(os.urandom(8), bytes(8), 0, IKE_SA_INIT, 0x08, 0, 0),
                          payloads)


def test_half_open_sas_are_bounded() -> None:
    """A peer that only ever sends IKE_SA_INIT cannot grow the gateway's SA table without
    bound: beyond MAX_HALF_OPEN the oldest waiting SA is forgotten (it failed before: 1,030)."""
    from authority.gateway.engine import MAX_HALF_OPEN

    engine = Engine(_settings(), _NoAuthority())  # type: ignore[arg-type]
    request = _real_sa_init()
    first = engine.handle(request, ("192.0.2.1", 500))
    assert first is not None and first[18] == IKE_SA_INIT and engine.sas
    assert engine.handle(request, ("192.0.2.1", 500)) == first      # a retransmission
    for _ in range(MAX_HALF_OPEN + 5):
        assert engine.handle(_real_sa_init(), ("192.0.2.1", 500)) is not None
    assert len(engine.sas) == MAX_HALF_OPEN


class _Initiator:
    """A minimal IKEv2 initiator in this test: IKE_SA_INIT with group 19, then IKE_AUTH with
    the pre-shared key, against the engine directly."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ecdh = Ecp256()
        self.spi_i, self.ni = os.urandom(8), os.urandom(32)
        self.id_i = id_body(ID_FQDN, b"client.example")

    def sa_init(self) -> None:
        from authority.ikev2.bodies import find
        from authority.ikev2.keys import derive_ike_keys, skeyseed
        from authority.ikev2.wire import (
            PAYLOAD_KE,
            PAYLOAD_NONCE,
            PAYLOAD_SA,
            RawPayload,
            decode_message,
            encode_message,
        )
        payloads = [RawPayload(PAYLOAD_SA, False, encode_sa_body([_proposal(1, *_gcm())])),
                    RawPayload(PAYLOAD_KE, False,
                               encode_ke_body(KeyExchange(DH_ECP_256, self.ecdh.public))),
                    RawPayload(PAYLOAD_NONCE, False, self.ni)]
        self.request = encode_message(IkeHeader(self.spi_i, bytes(8), 0, IKE_SA_INIT, 0x08, 0,
                                                0), payloads)
        reply = self.engine.handle(self.request, ("192.0.2.1", 500))
        assert reply is not None
        header, answer = decode_message(reply)
        self.spi_r, nr = header.spi_r, find(answer, PAYLOAD_NONCE)
        g_ir = self.ecdh.shared(decode_ke_body(find(answer, PAYLOAD_KE)).data)
        self.nr, self.response = nr, reply
        self.keys = derive_ike_keys(SHA256, skeyseed(SHA256, self.ni, nr, g_ir), self.ni, nr,
                                    self.spi_i, self.spi_r, GCM16, 256, 0)

    def auth(self, auth_payload_body: bytes) -> bytes | None:
        from authority.ikev2.sk import encrypt_message
        from authority.ikev2.wire import IKE_AUTH, PAYLOAD_AUTH, PAYLOAD_IDI, RawPayload
        inner = [RawPayload(PAYLOAD_IDI, False, self.id_i),
                 RawPayload(PAYLOAD_AUTH, False, auth_payload_body)]
        message = encrypt_message(self.spi_i, self.spi_r, IKE_AUTH, 0x08, 1, inner,
                                  self.keys.sk_ei)
        return self.engine.handle(message, ("192.0.2.1", 500))


def test_a_full_exchange_with_the_pre_shared_key_and_the_responders_auth_verifies() -> None:
    from authority.ikev2.bodies import auth_body, auth_data, find
    from authority.ikev2.sk import decrypt_message
    from authority.ikev2.wire import PAYLOAD_AUTH, PAYLOAD_IDR

    peer = _Initiator(Engine(_settings(), _NoAuthority()))  # type: ignore[arg-type]
    peer.sa_init()
    ours = psk_auth(SHA256, PSK, peer.keys.sk_pi, peer.request, peer.nr, peer.id_i)
    reply = peer.auth(auth_body(ours))
    assert reply is not None
    _, inner = decrypt_message(reply, peer.keys.sk_er)
    id_r = find(inner, PAYLOAD_IDR)
    expected = psk_auth(SHA256, PSK, peer.keys.sk_pr, peer.response, peer.ni, id_r)
    assert auth_data(find(inner, PAYLOAD_AUTH)) == expected
    assert ("ike-auth", "initiator authenticated with the pre-shared key") in peer.engine.events


@pytest.mark.parametrize("body", [b"", b"\x02", b"\x02\x00\x00\x00" + bytes(32)])
def test_a_bad_auth_payload_is_dropped_or_refused_never_an_error(body: bytes) -> None:
    """An empty AUTH body raised IndexError out of the engine, which ended the gateway's
    thread: any peer that completed IKE_SA_INIT could stop a gateway."""
    peer = _Initiator(Engine(_settings(), _NoAuthority()))  # type: ignore[arg-type]
    peer.sa_init()
    peer.auth(body)
    kinds = [kind for kind, _ in peer.engine.events]
    assert "error" not in kinds and kinds[-1] in ("dropped", "refused")


# -- the half-open bound: an index of its own, no scan of the SA table -------------------------


def _established(engine: Engine) -> tuple[bytes, bytes]:
    """An SA through IKE_SA_INIT and a PSK IKE_AUTH that verifies; its key."""
    from authority.ikev2.bodies import auth_body

    peer = _Initiator(engine)
    peer.sa_init()
    assert peer.auth(auth_body(psk_auth(SHA256, PSK, peer.keys.sk_pi, peer.request, peer.nr,
                                        peer.id_i))) is not None
    assert engine.sas[(peer.spi_i, peer.spi_r)].established
    return peer.spi_i, peer.spi_r


def _sa_init_key(engine: Engine) -> tuple[bytes, bytes]:
    """The key of a new half-open SA made by a real IKE_SA_INIT."""
    from authority.ikev2.wire import decode_ike_header

    reply = engine.handle(_real_sa_init(), ("192.0.2.1", 500))
    assert reply is not None
    header = decode_ike_header(reply[:28])
    return header.spi_i, header.spi_r


def _index_matches_the_table(engine: Engine) -> None:
    """The half-open index is the table's SAs not established, in the same (arrival) order."""
    assert list(engine.half_open) == [k for k, sa in engine.sas.items() if not sa.established]


def test_established_sas_survive_a_flood_past_the_bound() -> None:
    """Two established SAs, then MAX_HALF_OPEN + 5 IKE_SA_INITs: both kept, the 5 oldest
    waiting SAs forgotten and the newest MAX_HALF_OPEN kept."""
    from authority.gateway.engine import MAX_HALF_OPEN

    engine = Engine(_settings(), _NoAuthority())  # type: ignore[arg-type]
    done = [_established(engine), _established(engine)]
    flood = [_sa_init_key(engine) for _ in range(MAX_HALF_OPEN + 5)]
    assert all(engine.sas[key].established for key in done)
    assert len(engine.sas) == MAX_HALF_OPEN + 2
    assert [key for key in engine.sas if key not in done] == flood[5:]
    _index_matches_the_table(engine)


def test_an_sa_through_ike_auth_leaves_the_half_open_index() -> None:
    engine = Engine(_settings(), _NoAuthority())  # type: ignore[arg-type]
    waiting = _sa_init_key(engine)
    key = _established(engine)
    assert list(engine.half_open) == [waiting] and key in engine.sas
    _index_matches_the_table(engine)


def test_a_refused_ike_auth_leaves_the_table_and_the_index() -> None:
    """A wrong shared-key AUTH: AUTHENTICATION_FAILED, the SA gone from both."""
    from authority.ikev2.bodies import auth_body

    engine = Engine(_settings(), _NoAuthority())  # type: ignore[arg-type]
    peer = _Initiator(engine)
    peer.sa_init()
    key = (peer.spi_i, peer.spi_r)
    assert list(engine.half_open) == [key]
    assert peer.auth(auth_body(bytes(32))) is not None
    assert engine.events[-1][0] == "refused"
    assert key not in engine.sas and key not in engine.half_open
    _index_matches_the_table(engine)


SaKey = tuple[bytes, bytes]


class _CountedTable(dict[SaKey, IkeSa]):
    """An SA table that counts every walk over it (keys, values, items, iteration)."""

    def __init__(self) -> None:
        super().__init__()
        self.walks = 0

    def __iter__(self) -> Iterator[SaKey]:
        self.walks += 1
        return super().__iter__()

    def keys(self) -> dict_keys[SaKey, IkeSa]:
        self.walks += 1
        return super().keys()

    def values(self) -> dict_values[SaKey, IkeSa]:
        self.walks += 1
        return super().values()

    def items(self) -> dict_items[SaKey, IkeSa]:
        self.walks += 1
        return super().items()


def test_a_new_sa_does_not_walk_the_established_ones() -> None:
    """10,000 established SAs: new IKE_SA_INITs past the bound never walk the table (the
    bound scanned every SA at each one, O(table) per packet)."""
    from dataclasses import replace

    from authority.gateway.engine import MAX_HALF_OPEN

    engine = Engine(_settings(), _NoAuthority())  # type: ignore[arg-type]
    model = engine.sas[_established(engine)]
    table = _CountedTable()
    for n in range(10_000):
        spi_r = n.to_bytes(8, "big")
        table[(model.spi_i, spi_r)] = replace(model, spi_r=spi_r)
    engine.sas = table
    for _ in range(MAX_HALF_OPEN + 3):
        _sa_init_key(engine)
    assert table.walks == 0
    assert len(engine.half_open) == MAX_HALF_OPEN
    assert len(table) == 10_000 + MAX_HALF_OPEN
