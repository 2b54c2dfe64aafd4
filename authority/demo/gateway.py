"""A demo IKEv2 responder ("gateway"): a UDP socket on 127.0.0.1, a thread, and a
``TicketClient``. It issues tickets for SAs it holds, answers IKE_SESSION_RESUME by redeeming the
ticket at the authority, and verifies the resumed IKE_AUTH before consuming the ticket."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

from authority.client import (
    IssuedTicket,
    RedeemResult,
    TicketClient,
    TicketClientError,
    ticket_nack_notify,
)
from authority.demo.narrator import Narrator
from authority.demo.sa import InitialSa, name
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
    auth_initiator,
    auth_matches,
    auth_responder,
    decode_resume_request,
    derive_resumed_keys,
    encode_resume_response,
)
from authority.ikev2.notify import Notify, encode_notify_body
from authority.ikev2.wire import (
    FLAG_RESPONSE,
    IKE_AUTH,
    IKE_HEADER_LEN,
    IKE_SESSION_RESUME,
    PAYLOAD_AUTH,
    PAYLOAD_IDI,
    PAYLOAD_IDR,
    PAYLOAD_NOTIFY,
    ZERO_SPI,
    RawPayload,
    decode_ike_header,
)
from authority.state import ResumptionState

AUTHENTICATION_FAILED = 24
NONCE_LEN = 32
Address = tuple[str, int]


@dataclass
class ResumedSa:
    """A gateway's view of an SA it resumed, kept until the IKE_AUTH that completes it."""

    spi_i: bytes
    spi_r: bytes
    ni: bytes
    nr: bytes
    request: bytes
    response: bytes
    state: ResumptionState
    ticket_id: bytes
    keys: SaKeys
    authenticated: bool = False


@dataclass
class GatewayLog:
    """What a gateway saw, for the demo's result."""

    redeems: list[RedeemResult] = field(default_factory=list)
    consumes: list[RedeemResult] = field(default_factory=list)
    auth_checks: list[bool] = field(default_factory=list)
    nacks_sent: int = 0
    errors: list[str] = field(default_factory=list)


class Gateway:
    """One responder of the cluster. ``start`` begins answering, ``stop`` makes it die."""

    def __init__(self, label: str, client: TicketClient, narrator: Narrator) -> None:
        self.label = label
        self.client = client
        self.log = GatewayLog()
        self.sessions: dict[tuple[bytes, bytes], ResumedSa] = {}
        self._say = narrator.say
        self._more = narrator.more
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        host, port = self._sock.getsockname()
        self.address: Address = (host, port)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"gateway-{label}", daemon=True)

    @property
    def who(self) -> str:
        return f"gateway {self.label}"

    def start(self) -> None:
        """Start answering datagrams on ``address``."""
        self._thread.start()

    def stop(self) -> None:
        """Die: stop answering and close the socket (datagrams to it are lost). Never raises."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sock.close()

    # -- issuing -------------------------------------------------------------------------------

    def issue_ticket(self, sa: InitialSa, initiator: Address, lifetime: int) -> IssuedTicket:
        """Seal ``sa`` at the authority and send the initiator N(TICKET_LT_OPAQUE).

        Raises TicketClientError when the authority refuses or cannot be reached."""
        issued = self.client.issue(sa, lifetime)
        self._say(f"{self.who} -> authority",
                  f"IssueTicket: ticket of {len(issued.ticket)} octets, key {issued.key_id}, "
                  f"lifetime {issued.lifetime} s")
        payload = issued.notify_payload()
        self._say(f"{self.who} -> initiator",
                  f"N(TICKET_LT_OPAQUE) payload ({len(payload)} octets), UDP "
                  f"{self.address[1]} -> {initiator[1]}:")
        self._more(short(payload, 28, 6))
        self._more("(really inside the IKE_AUTH response's SK payload; sent bare here)")
        self._sock.sendto(payload, initiator)
        return issued

    # -- serving -------------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._handle(data, peer)
            except Exception as exc:  # a responder drops what it cannot handle and goes on
                self.log.errors.append(f"{type(exc).__name__}: {exc}")
                self._say(self.who, f"dropped a datagram: {type(exc).__name__}: {exc}")

    def _handle(self, data: bytes, peer: Address) -> None:
        header = decode_ike_header(data[:IKE_HEADER_LEN])
        if header.response:
            return
        if header.exchange_type == IKE_SESSION_RESUME:
            self._resume(data, peer)
        elif header.exchange_type == IKE_AUTH:
            self._authenticate(data, peer, header.spi_i, header.spi_r)

    def _resume(self, data: bytes, peer: Address) -> None:
        request = decode_resume_request(data)
        self._say(f"{self.who} <- initiator",
                  f"IKE_SESSION_RESUME request ({len(data)} octets) decoded:")
        self._more(f"SPIi {request.spi_i.hex()}, Ni {short(request.nonce, 6, 2)}, "
                   f"N(TICKET_OPAQUE) {short(request.ticket)}")
        try:
            redeemed = self.client.redeem(request.ticket)
        except TicketClientError as exc:
            self._say(f"{self.who} -> authority", f"RedeemTicket failed: {exc}")
            self._refuse(request, peer, "the authority is unavailable")
            return
        self.log.redeems.append(redeemed.result)
        self._say(f"{self.who} -> authority",
                  f"RedeemTicket(consume=false): {redeemed.result.name}")
        if not redeemed.ok or redeemed.state is None:
            self._refuse(request, peer, f"ticket {redeemed.result.name}")
            return
        state = redeemed.state
        self._more(f"state: IDi {describe_id(state.id_i)}, old SPIs {state.spi_i.hex()}/"
                   f"{state.spi_r.hex()}")
        self._more(f"{name('prf', state.prf_id)}, {name('encr', state.encr_id)}/"
                   f"{state.encr_key_bits}, SK_d {short(state.sk_d)}")
        self._more(f"gateway data {state.gateway_data.decode('ascii', 'replace')!r}")
        spi_r, nr = random_spi(), os.urandom(NONCE_LEN)
        response = encode_resume_response(ResumeResponse(request.spi_i, spi_r, nr))
        keys = derive_resumed_keys(state.prf_id, state.sk_d, request.nonce, nr, request.spi_i,
                                   spi_r, state.encr_id, state.encr_key_bits, state.integ_id)
        self.sessions[(request.spi_i, spi_r)] = ResumedSa(
            request.spi_i, spi_r, request.nonce, nr, data, response, state,
            redeemed.ticket_id, keys)
        self._say(self.who, f"derives the resumed SA's keys: SK_d {short(keys.sk_d)}, "
                            f"SK_pi {short(keys.sk_pi)}, ...")
        self._say(f"{self.who} -> initiator",
                  f"IKE_SESSION_RESUME response ({len(response)} octets):")
        self._more(f"HDR(exchange 38, SPIi {request.spi_i.hex()}, SPIr {spi_r.hex()}), "
                   f"Nr {short(nr)}")
        self._sock.sendto(response, peer)

    def _refuse(self, request: ResumeRequest, peer: Address, why: str) -> None:
        response = encode_resume_response(
            ResumeResponse(request.spi_i, ZERO_SPI, None, (ticket_nack_notify(),)))
        self.log.nacks_sent += 1
        self._say(f"{self.who} -> initiator",
                  f"N(TICKET_NACK) ({why}): the client must fall back to IKE_SA_INIT")
        self._sock.sendto(response, peer)

    def _authenticate(self, data: bytes, peer: Address, spi_i: bytes, spi_r: bytes) -> None:
        sa = self.sessions.get((spi_i, spi_r))
        if sa is None or sa.authenticated:
            raise PayloadError("IKE_AUTH for an unknown SA")
        _, payloads = decrypt_message(data, sa.keys.sk_ei)
        id_i = find(payloads, PAYLOAD_IDI)
        received = auth_data(find(payloads, PAYLOAD_AUTH))
        self._say(f"{self.who} <- initiator",
                  f"IKE_AUTH ({len(data)} octets), SK{{IDi, AUTH}} opened with SK_ei:")
        self._more(f"IDi {describe_id(id_i)}, AUTH {short(received)}")
        same_id = id_i == sa.state.id_i
        expected = auth_initiator(sa.state.prf_id, sa.keys.sk_pi, sa.request, sa.nr, id_i)
        verified = same_id and auth_matches(expected, received)
        self.log.auth_checks.append(verified)
        self._say(self.who, f"IDi {'matches' if same_id else 'DIFFERS from'} the ticket's IDi")
        self._more(f"AUTH = prf(SK_pi, RealMessage1 | Nr | prf(SK_pi, IDi')) "
                   f"{'verified' if verified else 'DOES NOT verify'}")
        inner: list[RawPayload]
        if verified:
            consumed = self._consume(sa)
            verified = consumed is not RedeemResult.REPLAYED
        if verified:
            sa.authenticated = True
            auth = auth_responder(sa.state.prf_id, sa.keys.sk_pr, sa.response, sa.ni,
                                  sa.state.id_r)
            inner = [RawPayload(PAYLOAD_IDR, False, sa.state.id_r),
                     RawPayload(PAYLOAD_AUTH, False, auth_body(auth))]
            what = f"SK{{IDr, AUTH {short(auth)}}} sealed with SK_er"
        else:
            inner = [RawPayload(PAYLOAD_NOTIFY, False,
                                encode_notify_body(Notify(AUTHENTICATION_FAILED)))]
            what = "SK{N(AUTHENTICATION_FAILED)}"
        reply = encrypt_message(spi_i, spi_r, IKE_AUTH, FLAG_RESPONSE, 1, inner, sa.keys.sk_er)
        self._say(f"{self.who} -> initiator", f"IKE_AUTH response ({len(reply)} octets): {what}")
        self._sock.sendto(reply, peer)

    def _consume(self, sa: ResumedSa) -> RedeemResult | None:
        """Mark the ticket used now that IKE_AUTH verified (RFC 5723 §9). None when the
        authority could not be reached (the SA is resumed anyway)."""
        try:
            result = self.client.consume(sa.ticket_id)
        except TicketClientError as exc:
            self._say(f"{self.who} -> authority", f"ConsumeTicket failed: {exc}")
            return None
        self.log.consumes.append(result)
        self._say(f"{self.who} -> authority",
                  f"ConsumeTicket(ticket id {short(sa.ticket_id)}): {result.name}"
                  + ("" if result is RedeemResult.OK else ": someone resumed it first"))
        return result
