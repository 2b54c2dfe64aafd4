"""What the client returns, and the conversions between protobuf messages and these objects.

Notify helpers produce the octets a gateway puts on the wire (through ``authority.ikev2``):
``IssuedTicket.notify_payload()`` is a whole N(TICKET_LT_OPAQUE) payload,
``Redeemed.nack_payload()`` / ``ticket_nack_payload()`` a whole N(TICKET_NACK) payload.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.ikev2.notify import (
    TICKET_NACK,
    Notify,
    TicketLtOpaque,
    TicketSignal,
    encode_notify_payload,
    ticket_to_notify,
)
from authority.state import ResumptionState

_STATE_FIELDS = ("id_i", "id_r", "spi_i", "spi_r", "sk_d", "encr_id", "encr_key_bits",
                 "prf_id", "integ_id", "dh_group", "auth_method", "gateway_data")


class StateLike(Protocol):
    """Anything with the twelve fields of a resumption state: ``authority.state.
    ResumptionState``, the ``ResumptionState`` protobuf message, or a gateway's own object."""

    @property
    def id_i(self) -> bytes: ...
    @property
    def id_r(self) -> bytes: ...
    @property
    def spi_i(self) -> bytes: ...
    @property
    def spi_r(self) -> bytes: ...
    @property
    def sk_d(self) -> bytes: ...
    @property
    def encr_id(self) -> int: ...
    @property
    def encr_key_bits(self) -> int: ...
    @property
    def prf_id(self) -> int: ...
    @property
    def integ_id(self) -> int: ...
    @property
    def dh_group(self) -> int: ...
    @property
    def auth_method(self) -> int: ...
    @property
    def gateway_data(self) -> bytes: ...


class RedeemResult(enum.IntEnum):
    """The redeem / consume results, numbered as ``ticketauthority.v1.RedeemResult``."""

    UNSPECIFIED = 0
    OK = 1
    INVALID = 2
    EXPIRED = 3
    REPLAYED = 4
    REVOKED = 5


#: result number -> RedeemResult (a dict lookup: the enum's own call is several times slower)
_RESULTS: dict[int, RedeemResult] = {int(r): r for r in RedeemResult}


def ticket_nack_notify() -> Notify:
    """N(TICKET_NACK) as a ``Notify`` (protocol 0, no SPI, no data). Never raises."""
    return ticket_to_notify(TicketSignal(TICKET_NACK))


def ticket_nack_payload(next_payload: int = 0) -> bytes:
    """A whole N(TICKET_NACK) Notify payload (generic header included): what a gateway sends
    when it will not resume, including when the authority is unavailable.

    Raises PayloadError (authority.ikev2) if ``next_payload`` is over 255."""
    return encode_notify_payload(ticket_nack_notify(), next_payload)


@dataclass(frozen=True)
class IssuedTicket:
    """A sealed ticket. ``lifetime`` is the granted lifetime in seconds, ``expires_at`` Unix
    seconds, ``key_id`` 16 hex digits, ``lt_opaque`` the N(TICKET_LT_OPAQUE) notify data as the
    authority sent it (4-octet lifetime, then the ticket)."""

    ticket: bytes
    lifetime: int
    expires_at: float
    key_id: str
    lt_opaque: bytes

    def __repr__(self) -> str:
        return (f"IssuedTicket(ticket=<{len(self.ticket)} octets>, lifetime={self.lifetime}, "
                f"expires_at={self.expires_at}, key_id={self.key_id})")

    def notify(self) -> Notify:
        """N(TICKET_LT_OPAQUE) as a ``Notify``, e.g. for ``ResumeResponse.notifies``.

        Raises PayloadError if the lifetime does not fit 32 bits or the ticket is empty."""
        return ticket_to_notify(TicketLtOpaque(self.lifetime, self.ticket))

    def notify_payload(self, next_payload: int = 0) -> bytes:
        """The whole N(TICKET_LT_OPAQUE) Notify payload (generic header, protocol 0, SPI size 0,
        type 16409, lifetime, ticket), ready to go into the IKE_AUTH response's SK payload.

        Raises PayloadError as ``notify`` does, or for a ``next_payload`` over 255."""
        return encode_notify_payload(self.notify(), next_payload)


@dataclass(frozen=True)
class Redeemed:
    """The answer to a redeem. ``state``, ``ticket_id``, ``expires_at``, ``issued_at``,
    ``realm`` and ``policy_epoch`` are set only when ``result`` is OK; ``key_id`` whenever the
    ticket's integrity verified. ``reissue``: the ticket's key no longer seals, so hand the
    client a fresh ticket in the resumed IKE_AUTH."""

    result: RedeemResult
    state: ResumptionState | None = None
    ticket_id: bytes = b""
    key_id: str = ""
    expires_at: float | None = None
    issued_at: float | None = None
    reissue: bool = False
    realm: str = ""
    policy_epoch: int = 0

    @property
    def ok(self) -> bool:
        """The ticket may be resumed."""
        return self.result is RedeemResult.OK

    def nack_notify(self) -> Notify:
        """N(TICKET_NACK) for a refused ticket.

        Raises ValueError if the result is OK (answer with Nr then, not a NACK)."""
        if self.ok:
            raise ValueError("the ticket was redeemed (OK): answer with Nr, not TICKET_NACK")
        return ticket_nack_notify()

    def nack_payload(self, next_payload: int = 0) -> bytes:
        """The whole N(TICKET_NACK) Notify payload for a refused ticket.

        Raises ValueError if the result is OK; PayloadError for a ``next_payload`` over 255."""
        return encode_notify_payload(self.nack_notify(), next_payload)


@dataclass(frozen=True)
class ItemError:
    """One failed item of a batch (the others are unaffected): ``code`` is a
    ``grpc.StatusCode``, ``message`` starts with the field (``items[3].state.sk_d: ...``)."""

    code: Any
    message: str


def _seconds(msg: Any, name: str) -> float | None:
    """A Timestamp field as Unix seconds (None when unset): ``ToNanoseconds() / 1e9``, with the
    nanosecond sum made here (the well-known type's method is Python too). Never raises."""
    if not msg.HasField(name):
        return None
    stamp = getattr(msg, name)
    seconds: float = (stamp.seconds * 1_000_000_000 + stamp.nanos) / 1e9
    return seconds


def state_to_proto(state: StateLike) -> authority_pb2.ResumptionState:
    """The state as a ``ResumptionState`` message (a message is copied as is).

    Raises AttributeError if a field is missing, TypeError/ValueError for a wrong-typed field."""
    if isinstance(state, authority_pb2.ResumptionState):
        copy = authority_pb2.ResumptionState()
        copy.CopyFrom(state)
        return copy
    return authority_pb2.ResumptionState(
        **{name: getattr(state, name) for name in _STATE_FIELDS})


def state_from_proto(msg: authority_pb2.ResumptionState) -> ResumptionState:
    """A ``ResumptionState`` message as the domain dataclass. Never raises."""
    return ResumptionState(id_i=msg.id_i, id_r=msg.id_r, spi_i=msg.spi_i, spi_r=msg.spi_r,
                           sk_d=msg.sk_d, encr_id=msg.encr_id, encr_key_bits=msg.encr_key_bits,
                           prf_id=msg.prf_id, integ_id=msg.integ_id, dh_group=msg.dh_group,
                           auth_method=msg.auth_method, gateway_data=msg.gateway_data)


def issue_request(state: StateLike, lifetime: int,
                  realm: str = "") -> authority_pb2.IssueTicketRequest:
    """Raises ValueError for a lifetime outside 0..2^32-1; as ``state_to_proto`` otherwise."""
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime: {lifetime} outside 0..2^32-1 seconds")
    return authority_pb2.IssueTicketRequest(state=state_to_proto(state),
                                            lifetime_seconds=lifetime, realm=realm)


def issued_from_proto(msg: authority_pb2.IssueTicketResponse) -> IssuedTicket:
    """Never raises."""
    return IssuedTicket(ticket=msg.ticket, lifetime=msg.lifetime_seconds,
                        expires_at=_seconds(msg, "expires_at") or 0.0, key_id=msg.key_id,
                        lt_opaque=msg.ticket_lt_opaque)


def redeemed_from_proto(msg: authority_pb2.RedeemTicketResponse) -> Redeemed:
    """Never raises (an unknown result number becomes UNSPECIFIED)."""
    result = _RESULTS.get(msg.result, RedeemResult.UNSPECIFIED)
    state = state_from_proto(msg.state) if msg.HasField("state") else None
    return Redeemed(result=result, state=state, ticket_id=msg.ticket_id, key_id=msg.key_id,
                    expires_at=_seconds(msg, "expires_at"),
                    issued_at=_seconds(msg, "issued_at"), reissue=msg.reissue,
                    realm=msg.realm, policy_epoch=msg.policy_epoch)


def result_from_number(number: int) -> RedeemResult:
    """Never raises (an unknown number becomes UNSPECIFIED)."""
    return _RESULTS.get(number, RedeemResult.UNSPECIFIED)


def item_error(msg: authority_pb2.ItemError) -> ItemError:
    """Never raises."""
    code = next((c for c in grpc.StatusCode if c.value[0] == msg.code), grpc.StatusCode.UNKNOWN)
    return ItemError(code, msg.message)


def issue_batch(states: Sequence[StateLike], lifetime: int, batch_id: int,
                realm: str = "") -> authority_pb2.IssueTicketsRequest:
    """Raises as ``issue_request`` does."""
    return authority_pb2.IssueTicketsRequest(
        items=[issue_request(s, lifetime, realm) for s in states], batch_id=batch_id)


def issued_batch(msg: authority_pb2.IssueTicketsResponse) -> list[IssuedTicket | ItemError]:
    """Never raises."""
    return [issued_from_proto(i.ticket) if i.HasField("ticket") else item_error(i.error)
            for i in msg.items]


def redeem_batch(tickets: Sequence[bytes], consume: bool, batch_id: int,
                 realm: str = "") -> authority_pb2.RedeemTicketsRequest:
    """Never raises."""
    return authority_pb2.RedeemTicketsRequest(
        items=[authority_pb2.RedeemTicketRequest(ticket=t, consume=consume, realm=realm)
               for t in tickets],
        batch_id=batch_id)


def redeemed_batch(msg: authority_pb2.RedeemTicketsResponse) -> list[Redeemed | ItemError]:
    """Never raises."""
    return [redeemed_from_proto(i.redeemed) if i.HasField("redeemed") else item_error(i.error)
            for i in msg.items]
