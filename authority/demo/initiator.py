"""The demo's IKEv2 initiator (the VPN client): holds the first SA, receives the ticket, and
resumes on another gateway with real IKE_SESSION_RESUME and IKE_AUTH messages over UDP."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from authority.demo.narrator import Narrator
from authority.demo.sa import InitialSa
from authority.demo.wire import (
    auth_body,
    auth_data,
    decrypt_message,
    describe_id,
    encrypt_message,
    find,
    random_spi,
    short,
)
from authority.ikev2 import (
    PayloadError,
    ResumeRequest,
    ResumeResponse,
    SaKeys,
    TicketLtOpaque,
    auth_initiator,
    auth_matches,
    auth_responder,
    decode_resume_response,
    derive_resumed_keys,
    encode_resume_request,
    ticket_from_notify,
)
from authority.ikev2.notify import decode_notify_payload
from authority.ikev2.wire import (
    FLAG_INITIATOR,
    IKE_AUTH,
    PAYLOAD_AUTH,
    PAYLOAD_IDI,
    PAYLOAD_IDR,
    RawPayload,
)

NONCE_LEN = 32
Address = tuple[str, int]


@dataclass
class Attempt:
    """One IKE_SESSION_RESUME exchange as the initiator saw it."""

    spi_i: bytes
    ni: bytes
    request: bytes
    response: bytes | None = None
    decoded: ResumeResponse | None = None


@dataclass
class AuthOutcome:
    """The resumed IKE_AUTH as the initiator saw it."""

    answered: bool = False
    responder_verified: bool = False
    refused: bool = False


class Initiator:
    """The client side: a UDP socket on 127.0.0.1 and the SA it got from gateway A."""

    who = "initiator"

    def __init__(self, sa: InitialSa, narrator: Narrator, timeout: float) -> None:
        self.sa = sa
        self.timeout = timeout
        self.ticket: TicketLtOpaque | None = None
        self._say = narrator.say
        self._more = narrator.more
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        host, port = self._sock.getsockname()
        self.address: Address = (host, port)

    def close(self) -> None:
        """Never raises."""
        self._sock.close()

    def _receive(self, timeout: float) -> bytes | None:
        self._sock.settimeout(timeout)
        try:
            data, _ = self._sock.recvfrom(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None
        return data

    def receive_ticket(self) -> TicketLtOpaque:
        """Wait for N(TICKET_LT_OPAQUE) from gateway A and keep the ticket.

        Raises PayloadError for anything else or for silence."""
        data = self._receive(self.timeout)
        if data is None:
            raise PayloadError("no N(TICKET_LT_OPAQUE) arrived")
        _, notify = decode_notify_payload(data)
        ticket = ticket_from_notify(notify)
        if not isinstance(ticket, TicketLtOpaque):
            raise PayloadError(f"expected TICKET_LT_OPAQUE, got notify type {notify.notify_type}")
        self.ticket = ticket
        self._say(self.who, f"decodes it: lifetime {ticket.lifetime} s, ticket "
                            f"{short(ticket.ticket)} ({len(ticket.ticket)} octets, opaque)")
        return ticket

    def new_attempt(self) -> Attempt:
        """A fresh IKE_SESSION_RESUME request (new SPIi, new Ni) carrying the ticket.

        Raises PayloadError if no ticket was received."""
        if self.ticket is None:
            raise PayloadError("no ticket to resume with")
        spi_i, ni = random_spi(), os.urandom(NONCE_LEN)
        request = encode_resume_request(ResumeRequest(spi_i, ni, self.ticket.ticket))
        return Attempt(spi_i, ni, request)

    def send(self, attempt: Attempt, gateway: Address, label: str,
             wait: float | None = None) -> Attempt:
        """Send the request to ``gateway`` and wait ``wait`` (default: the timeout) for the
        response. Raises PayloadError for a malformed response."""
        self._say(f"{self.who} -> {label}",
                  f"IKE_SESSION_RESUME request ({len(attempt.request)} octets), UDP "
                  f"{self.address[1]} -> {gateway[1]}:")
        self._more(f"HDR(exchange 38, SPIi {attempt.spi_i.hex()}, SPIr 0), Ni "
                   f"{short(attempt.ni)}, N(TICKET_OPAQUE)")
        self._sock.sendto(attempt.request, gateway)
        data = self._receive(self.timeout if wait is None else wait)
        if data is not None:
            attempt.response = data
            attempt.decoded = decode_resume_response(data)
        return attempt

    def derive(self, attempt: Attempt) -> SaKeys:
        """The resumed SA's keys from the old SK_d and this exchange's nonces and SPIs.

        Raises ValueError if the exchange was not accepted."""
        decoded = attempt.decoded
        if decoded is None or decoded.nonce is None:
            raise ValueError("the resumption was not accepted")
        sa = self.sa
        keys = derive_resumed_keys(sa.prf_id, sa.sk_d, attempt.ni, decoded.nonce, attempt.spi_i,
                                   decoded.spi_r, sa.encr_id, sa.encr_key_bits, sa.integ_id)
        self._say(self.who, f"derives the same way: SK_d {short(keys.sk_d)}, "
                            f"SK_pi {short(keys.sk_pi)}, ...")
        return keys

    def authenticate(self, attempt: Attempt, keys: SaKeys, gateway: Address,
                     label: str) -> AuthOutcome:
        """The resumed IKE_AUTH: send SK{IDi, AUTH}, verify the responder's AUTH.

        Raises ValueError if the exchange was not accepted, PayloadError for a malformed or
        undecryptable response."""
        decoded = attempt.decoded
        if decoded is None or decoded.nonce is None or attempt.response is None:
            raise ValueError("the resumption was not accepted")
        sa = self.sa
        auth = auth_initiator(sa.prf_id, keys.sk_pi, attempt.request, decoded.nonce, sa.id_i)
        inner = [RawPayload(PAYLOAD_IDI, False, sa.id_i),
                 RawPayload(PAYLOAD_AUTH, False, auth_body(auth))]
        message = encrypt_message(attempt.spi_i, decoded.spi_r, IKE_AUTH, FLAG_INITIATOR, 1,
                                  inner, keys.sk_ei)
        self._say(f"{self.who} -> {label}",
                  f"IKE_AUTH ({len(message)} octets): HDR(exchange 35, msgid 1), "
                  f"SK{{IDi, AUTH}} sealed with SK_ei")
        self._more(f"IDi {describe_id(sa.id_i)}, AUTH {short(auth)}")
        self._more("(no CERT; no SA/TSi/TSr: the demo negotiates no Child SA)")
        self._sock.sendto(message, gateway)
        outcome = AuthOutcome()
        data = self._receive(self.timeout)
        if data is None:
            self._say(self.who, "no IKE_AUTH response")
            return outcome
        outcome.answered = True
        _, payloads = decrypt_message(data, keys.sk_er)
        if not any(p.payload_type == PAYLOAD_AUTH for p in payloads):
            outcome.refused = True
            self._say(self.who, "IKE_AUTH refused by the responder")
            return outcome
        id_r = find(payloads, PAYLOAD_IDR)
        received = auth_data(find(payloads, PAYLOAD_AUTH))
        expected = auth_responder(sa.prf_id, keys.sk_pr, attempt.response, attempt.ni, id_r)
        outcome.responder_verified = id_r == sa.id_r and auth_matches(expected, received)
        self._say(self.who, f"opens SK with SK_er: IDr {describe_id(id_r)}")
        self._more(f"AUTH = prf(SK_pr, RealMessage2 | Ni | prf(SK_pr, IDr')) "
                   f"{'verified' if outcome.responder_verified else 'DOES NOT verify'}")
        return outcome
