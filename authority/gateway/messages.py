"""Building the gateway's responses: plain (IKE_SA_INIT, IKE_SESSION_RESUME) and encrypted
(SK{...}) replies, notifies, and the refusal that carries an encrypted AUTHENTICATION_FAILED."""

from __future__ import annotations

from collections.abc import Sequence

from authority.gateway.session import IkeSa
from authority.ikev2.errors import PayloadError
from authority.ikev2.notify import Notify, decode_notify_body, encode_notify_body
from authority.ikev2.sk import encrypt_message
from authority.ikev2.wire import (
    FLAG_RESPONSE,
    PAYLOAD_NOTIFY,
    IkeHeader,
    RawPayload,
    encode_message,
)

NO_PROPOSAL_CHOSEN = 14
INVALID_KE_PAYLOAD = 17
AUTHENTICATION_FAILED = 24
NO_ADDITIONAL_SAS = 35


class Refusal(Exception):
    """An exchange the gateway answers with an encrypted N(AUTHENTICATION_FAILED) and whose SA
    it then forgets; ``str`` says why (for the log, never sent)."""

    def __init__(self, why: str, sa: IkeSa, header: IkeHeader) -> None:
        super().__init__(why)
        self.reply = encrypted_reply(sa, header, [notify_payload(AUTHENTICATION_FAILED)])


def notify_payload(notify_type: int, data: bytes = b"") -> RawPayload:
    """A Notify payload of ``notify_type`` (protocol 0, no SPI). Raises PayloadError for a type
    outside 16 bits."""
    return RawPayload(PAYLOAD_NOTIFY, False, encode_notify_body(Notify(notify_type, data)))


def notifies(payloads: Sequence[RawPayload]) -> list[Notify]:
    """The notifies among ``payloads``, in order; malformed ones are skipped. Never raises."""
    out: list[Notify] = []
    for payload in payloads:
        if payload.payload_type == PAYLOAD_NOTIFY:
            try:
                out.append(decode_notify_body(payload.body))
            except PayloadError:
                continue
    return out


def has_notify(payloads: Sequence[RawPayload], notify_type: int) -> bool:
    """Whether a notify of ``notify_type`` is among ``payloads``. Never raises."""
    return any(n.notify_type == notify_type for n in notifies(payloads))


def plain_reply(request: IkeHeader, payloads: Sequence[RawPayload],
                spi_r: bytes | None = None) -> bytes:
    """An unencrypted response to ``request`` (same exchange and message id; ``spi_r`` when the
    responder picked one, else the request's).

    Raises PayloadError for a payload that cannot be encoded."""
    header = IkeHeader(request.spi_i, request.spi_r if spi_r is None else spi_r, 0,
                       request.exchange_type, FLAG_RESPONSE, request.message_id, 0)
    return encode_message(header, list(payloads))


def encrypted_reply(sa: IkeSa, request: IkeHeader, payloads: Sequence[RawPayload]) -> bytes:
    """SK{payloads} in response to ``request``, sealed with the SA's SK_er.

    Raises PayloadError for a payload that cannot be encoded."""
    return encrypt_message(sa.spi_i, sa.spi_r, request.exchange_type, FLAG_RESPONSE,
                           request.message_id, payloads, sa.keys.sk_er)
