"""The resumption exchanges a gateway answers (RFC 5723 §4.3): IKE_SESSION_RESUME, after a
redeem at the authority, and the IKE_AUTH of the resumed SA, which consumes the ticket once the
initiator's AUTH verified (§9) and may ask for a new ticket."""

from __future__ import annotations

import os

from authority.client import RedeemResult
from authority.client.models import ticket_nack_notify
from authority.gateway.authority import AuthorityLink
from authority.gateway.initial import NONCE_LEN, state_of
from authority.gateway.messages import (
    NO_PROPOSAL_CHOSEN,
    Refusal,
    encrypted_reply,
    has_notify,
    notify_payload,
)
from authority.gateway.session import IkeSa
from authority.gateway.settings import GatewaySettings
from authority.ikev2.auth import auth_initiator, auth_matches, auth_responder
from authority.ikev2.bodies import auth_body, auth_data, find, find_optional, random_spi
from authority.ikev2.keys import derive_resumed_keys
from authority.ikev2.notify import TICKET_REQUEST
from authority.ikev2.payloads import (
    ResumeRequest,
    ResumeResponse,
    decode_resume_request,
    encode_resume_response,
)
from authority.ikev2.proposals import IkeSuite
from authority.ikev2.sk import decrypt_message
from authority.ikev2.wire import (
    PAYLOAD_AUTH,
    PAYLOAD_IDI,
    PAYLOAD_IDR,
    PAYLOAD_SA,
    ZERO_SPI,
    IkeHeader,
    RawPayload,
)


def nack(request: ResumeRequest) -> bytes:
    """The IKE_SESSION_RESUME response that refuses the ticket: N(TICKET_NACK), SPIr zero; the
    initiator falls back to IKE_SA_INIT. Never raises."""
    return encode_resume_response(ResumeResponse(request.spi_i, ZERO_SPI, None,
                                                 (ticket_nack_notify(),)))


def answer_resume(settings: GatewaySettings, authority: AuthorityLink,
                  data: bytes) -> tuple[IkeSa | None, bytes]:
    """The IKE_SESSION_RESUME response and the resumed SA, or (None, N(TICKET_NACK)) when the
    authority does not return the state (any result but OK, or unreachable) or the ticket's
    transforms are not ones this gateway speaks.

    Raises PayloadError for a malformed request (the caller drops it)."""
    request = decode_resume_request(data)
    redeemed = authority.redeem(request.ticket, settings.realm)
    if redeemed is None or redeemed.state is None:
        return None, nack(request)
    state = redeemed.state
    offered = (state.encr_id, state.encr_key_bits)
    if offered not in settings.acceptable.encryption or state.integ_id:
        return None, nack(request)
    spi_r, nr = random_spi(), os.urandom(NONCE_LEN)
    response = encode_resume_response(ResumeResponse(request.spi_i, spi_r, nr))
    keys = derive_resumed_keys(state.prf_id, state.sk_d, request.nonce, nr, request.spi_i,
                               spi_r, state.encr_id, state.encr_key_bits, state.integ_id)
    suite = IkeSuite(0, state.encr_id, state.encr_key_bits, state.prf_id, state.integ_id,
                     state.dh_group)
    sa = IkeSa(request.spi_i, spi_r, request.nonce, nr, data, response, suite, keys,
               resumed=state, ticket_id=redeemed.ticket_id)
    return sa, response


def answer_resumed_auth(settings: GatewaySettings, authority: AuthorityLink, sa: IkeSa,
                        data: bytes, header: IkeHeader) -> bytes:
    """The response to the resumed SA's IKE_AUTH: IDr and AUTH (and a new ticket if asked for)
    once IDi (and IDr, if sent) equal the ticket's, the AUTH verified in the gateway's reading
    and the authority consumed the ticket (or could not be reached: the SA is resumed, logged).

    Raises PayloadError for a message that does not open or parse; Refusal with the encrypted
    N(AUTHENTICATION_FAILED) for a wrong ID or AUTH, or a ticket consumed before."""
    state = sa.resumed
    assert state is not None
    _, inner = decrypt_message(data, sa.keys.sk_ei)
    id_i, auth = find(inner, PAYLOAD_IDI), find(inner, PAYLOAD_AUTH)
    received = auth_data(auth)                    # PayloadError for a body under 4 octets
    id_r = find_optional(inner, PAYLOAD_IDR)
    reading = settings.resumed_auth
    expected = auth_initiator(state.prf_id, sa.keys.sk_pi, sa.first_request, sa.nr, id_i,
                              reading)
    if id_i != state.id_i or (id_r is not None and id_r != state.id_r):
        raise Refusal("IDi or IDr differs from the ticket's", sa, header)
    if not auth_matches(expected, received):
        raise Refusal(f"the resumed AUTH does not verify (reading {reading})", sa, header)
    sa.peer_id = id_i
    new_ticket = authority.issue_soon(state_of(sa, state.id_r), settings.ticket_lifetime,
                                      settings.realm) if has_notify(inner, TICKET_REQUEST) \
        else None                               # sealed while the consume is in flight
    if authority.consume(sa.ticket_id) in (RedeemResult.REPLAYED, RedeemResult.EXPIRED):
        raise Refusal("the ticket was consumed before (or expired)", sa, header)  # new one unsent
    sa.established = True
    ours = auth_responder(state.prf_id, sa.keys.sk_pr, sa.first_response, sa.ni, state.id_r,
                          reading)
    reply = [RawPayload(PAYLOAD_IDR, False, state.id_r),
             RawPayload(PAYLOAD_AUTH, False, auth_body(ours, auth[0]))]
    if new_ticket is not None:
        reply.append(new_ticket.result())
    if find_optional(inner, PAYLOAD_SA) is not None:
        reply.append(notify_payload(NO_PROPOSAL_CHOSEN))
    return encrypted_reply(sa, header, reply)
