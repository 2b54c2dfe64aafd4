"""IKEv2 payload codecs for session resumption, and the IKE_SESSION_RESUME messages (RFC 5723
§4.3.1, §4.3.2). This module is the one place to import wire formats from: it re-exports the
framing (``wire``) and the Nonce/Notify/ticket codecs (``notify``).

Request (initiator -> responder, unprotected)::

    HDR(IKE_SESSION_RESUME, new SPIi, SPIr = 0, I flag, Message ID 0),
        [N(COOKIE),] Ni, N(TICKET_OPAQUE) [, N+] [, V+]

Response::

    HDR(SPIi, new SPIr, R flag, Message ID 0), Nr [, N+] [, V+]     resumption accepted
    HDR(SPIi, SPIr or 0, R flag), N(TICKET_NACK) | N(COOKIE) | N(error) ...   refused / retry

Decoding rules (each violation is a ``PayloadError`` naming it): the header must carry exchange
type 38, Message ID 0, a non-zero SPIi and the right I/R flags; the request must have SPIr 0,
exactly one Nonce, exactly one TICKET_OPAQUE and at most one COOKIE, which must be the first
payload; an accepting response needs a non-zero SPIr and no NACK/COOKIE/error notify, a
refusing one needs at least one notify. A payload of an unrecognised type is skipped unless its
critical bit is set (then the message is refused, RFC 7296 §2.5); recognised payloads that do
not belong in this exchange (SA, KE, SK, ...) are refused. The V flag and minor version are
ignored on receipt (§3.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from authority.ikev2.errors import PayloadError
from authority.ikev2.notify import (
    COOKIE,
    ERROR_TYPES_END,
    TICKET_LT_OPAQUE,
    TICKET_NACK,
    TICKET_NOTIFY_TYPES,
    TICKET_OPAQUE,
    Notify,
    TicketLtOpaque,
    TicketNotify,
    TicketOpaque,
    TicketSignal,
    check_cookie,
    check_nonce,
    decode_nonce_payload,
    decode_notify_body,
    decode_notify_payload,
    encode_nonce_payload,
    encode_notify_body,
    encode_notify_payload,
    ticket_from_notify,
    ticket_to_notify,
)
from authority.ikev2.wire import (
    FLAG_INITIATOR,
    FLAG_RESPONSE,
    IKE_SESSION_RESUME,
    KNOWN_PAYLOAD_TYPES,
    PAYLOAD_NONCE,
    PAYLOAD_NOTIFY,
    PAYLOAD_VENDOR_ID,
    ZERO_SPI,
    IkeHeader,
    PayloadHeader,
    RawPayload,
    decode_generic_payload,
    decode_ike_header,
    decode_message,
    decode_payload_chain,
    decode_payload_header,
    encode_generic_payload,
    encode_ike_header,
    encode_message,
    encode_payload_chain,
    encode_payload_header,
)

__all__ = [
    "COOKIE", "TICKET_LT_OPAQUE", "TICKET_NACK", "TICKET_OPAQUE", "IkeHeader", "Notify",
    "PayloadError", "PayloadHeader", "RawPayload", "ResumeRequest", "ResumeResponse",
    "TicketLtOpaque", "TicketNotify", "TicketOpaque", "TicketSignal", "check_cookie",
    "check_nonce", "decode_generic_payload", "decode_ike_header", "decode_message",
    "decode_nonce_payload", "decode_notify_body", "decode_notify_payload",
    "decode_payload_chain", "decode_payload_header", "decode_resume_request",
    "decode_resume_response", "encode_generic_payload", "encode_ike_header", "encode_message",
    "encode_nonce_payload", "encode_notify_body", "encode_notify_payload",
    "encode_payload_chain", "encode_payload_header", "encode_resume_request",
    "encode_resume_response", "ticket_from_notify", "ticket_to_notify",
]


@dataclass(frozen=True)
class ResumeRequest:
    """An IKE_SESSION_RESUME request. ``notifies`` are any notifies besides COOKIE and
    TICKET_OPAQUE, in order; ``vendor_ids`` are Vendor ID payload bodies."""

    spi_i: bytes
    nonce: bytes
    ticket: bytes
    cookie: bytes | None = None
    notifies: tuple[Notify, ...] = ()
    vendor_ids: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ResumeResponse:
    """An IKE_SESSION_RESUME response: ``nonce`` set when the responder resumes the SA."""

    spi_i: bytes
    spi_r: bytes
    nonce: bytes | None = None
    notifies: tuple[Notify, ...] = ()
    vendor_ids: tuple[bytes, ...] = ()

    @property
    def accepted(self) -> bool:
        """The responder resumed the session (it sent Nr)."""
        return self.nonce is not None

    @property
    def nacked(self) -> bool:
        """The responder refused the ticket (N(TICKET_NACK)): fall back to IKE_SA_INIT."""
        return any(n.notify_type == TICKET_NACK for n in self.notifies)

    @property
    def cookie(self) -> bytes | None:
        """The cookie to echo in a retried request, if the responder asked for one."""
        return next((n.data for n in self.notifies if n.notify_type == COOKIE), None)


def _header(spi_i: bytes, spi_r: bytes, flags: int) -> IkeHeader:
    return IkeHeader(spi_i, spi_r, 0, IKE_SESSION_RESUME, flags, 0, 0)


def _tail(notifies: Sequence[Notify], vendor_ids: Sequence[bytes]) -> list[RawPayload]:
    return ([RawPayload(PAYLOAD_NOTIFY, False, encode_notify_body(n)) for n in notifies]
            + [RawPayload(PAYLOAD_VENDOR_ID, False, bytes(v)) for v in vendor_ids])


def _validate_notify(notify: Notify) -> Notify:
    """Check COOKIE and the RFC 5723 notifies against their rules; other notifies pass as is."""
    if notify.notify_type == COOKIE:
        check_cookie(notify)
    elif notify.notify_type in TICKET_NOTIFY_TYPES:
        ticket_from_notify(notify)
    return notify


def _check_spi_i(spi_i: bytes) -> None:
    """Raises PayloadError unless SPIi is 8 octets, not all zero."""
    if len(spi_i) != len(ZERO_SPI) or spi_i == ZERO_SPI:
        raise PayloadError("IKE_SESSION_RESUME: SPIi must be 8 non-zero octets")


def encode_resume_request(request: ResumeRequest) -> bytes:
    """The octets of an IKE_SESSION_RESUME request.

    Raises PayloadError for a zero or wrong-size SPIi, a bad nonce, an empty ticket, a bad
    cookie, a COOKIE or TICKET_OPAQUE among ``notifies``, or an oversized payload."""
    _check_spi_i(request.spi_i)
    for notify in request.notifies:
        if notify.notify_type in (COOKIE, TICKET_OPAQUE):
            raise PayloadError("IKE_SESSION_RESUME request: put COOKIE and the ticket in their "
                               "own fields, not in notifies")
        _validate_notify(notify)
    payloads: list[RawPayload] = []
    if request.cookie is not None:
        cookie = Notify(COOKIE, request.cookie)
        check_cookie(cookie)
        payloads.append(RawPayload(PAYLOAD_NOTIFY, False, encode_notify_body(cookie)))
    ticket = ticket_to_notify(TicketOpaque(request.ticket))
    payloads += [RawPayload(PAYLOAD_NONCE, False, check_nonce(request.nonce)),
                 RawPayload(PAYLOAD_NOTIFY, False, encode_notify_body(ticket))]
    payloads += _tail(request.notifies, request.vendor_ids)
    return encode_message(_header(request.spi_i, ZERO_SPI, FLAG_INITIATOR), payloads)


def encode_resume_response(response: ResumeResponse) -> bytes:
    """The octets of an IKE_SESSION_RESUME response.

    Raises PayloadError for the combinations ``decode_resume_response`` refuses (zero SPIi, a
    nonce with a zero SPIr or with a NACK/COOKIE/error notify, neither nonce nor notify), a bad
    nonce or an oversized payload."""
    _check_response(response)
    payloads: list[RawPayload] = []
    if response.nonce is not None:
        payloads.append(RawPayload(PAYLOAD_NONCE, False, check_nonce(response.nonce)))
    payloads += _tail(response.notifies, response.vendor_ids)
    return encode_message(_header(response.spi_i, response.spi_r, FLAG_RESPONSE), payloads)


def _check_header(header: IkeHeader, response: bool) -> None:
    """Raises PayloadError unless the header fits an IKE_SESSION_RESUME request/response."""
    what = "response" if response else "request"
    if header.exchange_type != IKE_SESSION_RESUME:
        raise PayloadError(f"exchange type {header.exchange_type}, expected IKE_SESSION_RESUME "
                           f"({IKE_SESSION_RESUME})")
    if header.response != response:
        raise PayloadError(f"IKE_SESSION_RESUME {what}: R flag must be "
                           f"{'set' if response else 'clear'}")
    if header.initiator == response:
        raise PayloadError(f"IKE_SESSION_RESUME {what}: I flag must be "
                           f"{'clear' if response else 'set'}")
    if header.message_id != 0:
        raise PayloadError(f"IKE_SESSION_RESUME {what}: message id must be 0, "
                           f"got {header.message_id}")
    _check_spi_i(header.spi_i)


def _sort_payloads(payloads: list[RawPayload], what: str) -> tuple[
        list[bytes], list[tuple[int, Notify]], list[bytes]]:
    """Nonces, (position, notify) pairs and vendor IDs; unknown non-critical payloads skipped.

    Raises PayloadError for a bad nonce or notify, a payload that does not belong in the
    exchange, or an unrecognised critical payload."""
    nonces: list[bytes] = []
    notifies: list[tuple[int, Notify]] = []
    vendor_ids: list[bytes] = []
    for position, payload in enumerate(payloads):
        kind = payload.payload_type
        if kind == PAYLOAD_NONCE:
            nonces.append(check_nonce(payload.body))
        elif kind == PAYLOAD_NOTIFY:
            notifies.append((position, _validate_notify(decode_notify_body(payload.body))))
        elif kind == PAYLOAD_VENDOR_ID:
            vendor_ids.append(bytes(payload.body))
        elif kind in KNOWN_PAYLOAD_TYPES:
            raise PayloadError(f"{what}: payload type {kind} does not belong in this exchange")
        elif payload.critical:
            raise PayloadError(f"{what}: unsupported critical payload type {kind}")
    return nonces, notifies, vendor_ids


def decode_resume_request(data: bytes) -> ResumeRequest:
    """Parse and check an IKE_SESSION_RESUME request (rules in the module docstring).

    Raises PayloadError for any malformed or non-conforming octets."""
    what = "IKE_SESSION_RESUME request"
    header, payloads = decode_message(data)
    _check_header(header, response=False)
    if header.spi_r != ZERO_SPI:
        raise PayloadError(f"{what}: SPIr must be zero")
    nonces, notifies, vendor_ids = _sort_payloads(payloads, what)
    if len(nonces) != 1:
        raise PayloadError(f"{what}: expected exactly one Nonce payload, got {len(nonces)}")
    cookies = [(pos, n) for pos, n in notifies if n.notify_type == COOKIE]
    tickets = [n for _, n in notifies if n.notify_type == TICKET_OPAQUE]
    if len(tickets) != 1:
        raise PayloadError(f"{what}: expected exactly one TICKET_OPAQUE, got {len(tickets)}")
    if len(cookies) > 1 or (cookies and cookies[0][0] != 0):
        raise PayloadError(f"{what}: COOKIE must appear at most once, as the first payload")
    others = tuple(n for _, n in notifies if n.notify_type not in (COOKIE, TICKET_OPAQUE))
    return ResumeRequest(header.spi_i, nonces[0], tickets[0].data,
                         cookies[0][1].data if cookies else None, others, tuple(vendor_ids))


def _check_response(response: ResumeResponse) -> None:
    """Raises PayloadError for a response that breaks the rules of the module docstring."""
    what = "IKE_SESSION_RESUME response"
    _check_spi_i(response.spi_i)
    if len(response.spi_r) != len(ZERO_SPI):
        raise PayloadError(f"{what}: SPIr must be 8 octets")
    for notify in response.notifies:
        _validate_notify(notify)
    if response.nonce is None:
        if not response.notifies:
            raise PayloadError(f"{what}: neither a Nonce nor a Notify payload")
        return
    if response.spi_r == ZERO_SPI:
        raise PayloadError(f"{what}: a response with Nr must carry a non-zero SPIr")
    if any(_refuses(n) for n in response.notifies):
        raise PayloadError(f"{what}: Nr together with TICKET_NACK, COOKIE or an error notify")


def _refuses(notify: Notify) -> bool:
    return notify.notify_type in (TICKET_NACK, COOKIE) or notify.notify_type < ERROR_TYPES_END


def decode_resume_response(data: bytes) -> ResumeResponse:
    """Parse and check an IKE_SESSION_RESUME response (rules in the module docstring).

    Raises PayloadError for any malformed or non-conforming octets."""
    what = "IKE_SESSION_RESUME response"
    header, payloads = decode_message(data)
    _check_header(header, response=True)
    nonces, notifies, vendor_ids = _sort_payloads(payloads, what)
    if len(nonces) > 1:
        raise PayloadError(f"{what}: {len(nonces)} Nonce payloads, at most one allowed")
    response = ResumeResponse(header.spi_i, header.spi_r, nonces[0] if nonces else None,
                              tuple(n for _, n in notifies), tuple(vendor_ids))
    _check_response(response)
    return response

