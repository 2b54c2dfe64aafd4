"""The initial exchanges a gateway answers: IKE_SA_INIT (proposal choice, group 19, nonces,
keys) and the first IKE_AUTH with a pre-shared key (RFC 7296 §1.2, §2.15), which asks the
authority for a ticket when the initiator sent N(TICKET_REQUEST) (RFC 5723 §4.3.1)."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from authority.gateway.authority import AuthorityLink
from authority.gateway.messages import (
    INVALID_KE_PAYLOAD,
    NO_PROPOSAL_CHOSEN,
    Refusal,
    encrypted_reply,
    has_notify,
    notify_payload,
    plain_reply,
)
from authority.gateway.session import IkeSa
from authority.gateway.settings import GatewaySettings
from authority.ikev2.auth import auth_matches, psk_auth
from authority.ikev2.bodies import (
    AUTH_SHARED_KEY_MIC,
    auth_body,
    auth_data,
    find,
    find_optional,
    random_spi,
)
from authority.ikev2.ecdh import Ecp256, KeyExchange, decode_ke_body, encode_ke_body
from authority.ikev2.keys import derive_ike_keys, skeyseed
from authority.ikev2.notify import TICKET_REQUEST, check_nonce
from authority.ikev2.proposals import (
    choose_ike_suite,
    decode_sa_body,
    encode_sa_body,
    suite_proposal,
)
from authority.ikev2.sk import decrypt_message
from authority.ikev2.wire import (
    PAYLOAD_AUTH,
    PAYLOAD_IDI,
    PAYLOAD_IDR,
    PAYLOAD_KE,
    PAYLOAD_NONCE,
    PAYLOAD_SA,
    IkeHeader,
    RawPayload,
)
from authority.state import ResumptionState

NONCE_LEN = 32


def answer_sa_init(settings: GatewaySettings, data: bytes, header: IkeHeader,
                   payloads: Sequence[RawPayload]) -> tuple[IkeSa | None, bytes]:
    """The IKE_SA_INIT response, and the half-open SA when the request is accepted.

    Raises PayloadError for a malformed request (the caller drops it)."""
    suite = choose_ike_suite(decode_sa_body(find(payloads, PAYLOAD_SA)), settings.acceptable)
    exchange = decode_ke_body(find(payloads, PAYLOAD_KE))
    ni = check_nonce(find(payloads, PAYLOAD_NONCE))
    if suite is None:
        return None, plain_reply(header, [notify_payload(NO_PROPOSAL_CHOSEN)])
    if exchange.group != suite.dh_group:
        group = struct.pack(">H", suite.dh_group)
        return None, plain_reply(header, [notify_payload(INVALID_KE_PAYLOAD, group)])
    ecdh = Ecp256()
    g_ir = ecdh.shared(exchange.data)
    spi_r, nr = random_spi(), os.urandom(NONCE_LEN)
    response = plain_reply(header, [
        RawPayload(PAYLOAD_SA, False, encode_sa_body([suite_proposal(suite)])),
        RawPayload(PAYLOAD_KE, False, encode_ke_body(KeyExchange(suite.dh_group, ecdh.public))),
        RawPayload(PAYLOAD_NONCE, False, nr)], spi_r=spi_r)
    keys = derive_ike_keys(suite.prf_id, skeyseed(suite.prf_id, ni, nr, g_ir), ni, nr,
                           header.spi_i, spi_r, suite.encr_id, suite.encr_key_bits,
                           suite.integ_id)
    return IkeSa(header.spi_i, spi_r, ni, nr, data, response, suite, keys), response


def answer_auth(settings: GatewaySettings, authority: AuthorityLink, sa: IkeSa, data: bytes,
                header: IkeHeader) -> bytes:
    """The response to the first IKE_AUTH: IDr, AUTH and N(TICKET_LT_OPAQUE) (or N(TICKET_NACK)
    when the authority could not issue one) once the initiator's PSK AUTH verified; a Child SA
    request is answered N(NO_PROPOSAL_CHOSEN) (the kit makes IKE SAs only).

    Raises PayloadError for a message that does not open or parse; Refusal with the encrypted
    N(AUTHENTICATION_FAILED) to send when the AUTH or the IDr does not match."""
    _, inner = decrypt_message(data, sa.keys.sk_ei)
    id_i, auth = find(inner, PAYLOAD_IDI), find(inner, PAYLOAD_AUTH)
    id_r = find_optional(inner, PAYLOAD_IDR)
    prf_id = sa.suite.prf_id
    expected = psk_auth(prf_id, settings.psk, sa.keys.sk_pi, sa.first_request, sa.nr, id_i)
    received = auth_data(auth)                    # PayloadError for a body under 4 octets
    if auth[0] != AUTH_SHARED_KEY_MIC or not auth_matches(expected, received) or \
            (id_r is not None and id_r != settings.local_id):
        raise Refusal("the initiator's shared-key AUTH or IDr does not match", sa, header)
    sa.peer_id, sa.established = id_i, True
    ours = psk_auth(prf_id, settings.psk, sa.keys.sk_pr, sa.first_response, sa.ni,
                    settings.local_id)
    reply = [RawPayload(PAYLOAD_IDR, False, settings.local_id),
             RawPayload(PAYLOAD_AUTH, False, auth_body(ours))]
    reply += ticket_payloads(settings, authority, sa, inner, settings.local_id)
    if find_optional(inner, PAYLOAD_SA) is not None:
        reply.append(notify_payload(NO_PROPOSAL_CHOSEN))
    return encrypted_reply(sa, header, reply)


def ticket_payloads(settings: GatewaySettings, authority: AuthorityLink, sa: IkeSa,
                    inner: Sequence[RawPayload], id_r: bytes) -> list[RawPayload]:
    """N(TICKET_LT_OPAQUE) with a ticket for ``sa`` (whose IDr is ``id_r``) when the initiator
    asked for one (N(TICKET_NACK) when the authority refused or was unreachable); nothing
    otherwise. Never raises."""
    if not has_notify(inner, TICKET_REQUEST):
        return []
    return [authority.issue(state_of(sa, id_r), settings.ticket_lifetime, settings.realm)]


def state_of(sa: IkeSa, id_r: bytes) -> ResumptionState:
    """What a ticket for ``sa`` seals: its IDs, SPIs, SK_d, transforms and auth method."""
    suite = sa.suite
    return ResumptionState(
        id_i=sa.peer_id, id_r=id_r,
        spi_i=sa.spi_i, spi_r=sa.spi_r, sk_d=sa.keys.sk_d, encr_id=suite.encr_id,
        encr_key_bits=suite.encr_key_bits, prf_id=suite.prf_id, integ_id=suite.integ_id,
        dh_group=suite.dh_group,
        auth_method=sa.resumed.auth_method if sa.resumed else AUTH_SHARED_KEY_MIC)


__all__ = ["answer_auth", "answer_sa_init", "state_of", "ticket_payloads"]
