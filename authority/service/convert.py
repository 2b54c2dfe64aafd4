"""Translate between protobuf messages and domain objects; request validation names the field."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.errors import AuthorityError, InvalidArgument
from authority.keyring import KeyRing
from authority.keys import KeyRecord
from authority.policy import BY_ID_I, BY_ISSUED_BEFORE, BY_OLD_SA, BY_TICKET_ID
from authority.sealer import TICKET_HANDLE_LEN, IssuedTicket, RedeemStatus, Redemption
from authority.state import ID_MAX_LEN, ID_MIN_LEN, ResumptionState
from authority.store.base import LeaseRecord, ReplicaRecord, RevocationRecord
from authority.ticket_format import KEY_ID_LEN, TICKET_ID_LEN

# gRPC status code numbers by name (google.rpc.Code), without importing grpc here.
_CODES = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "PERMISSION_DENIED": 7, "FAILED_PRECONDITION": 9,
          "RESOURCE_EXHAUSTED": 8, "UNAVAILABLE": 14, "UNKNOWN": 2}

_STATE_FIELDS = tuple(f.name for f in fields(ResumptionState))

T = TypeVar("T")


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp for Unix seconds."""
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def state_from_proto(msg: authority_pb2.IssueTicketRequest,
                     field: str = "state") -> ResumptionState:
    """The request's state as a domain object (validated later by the sealer).

    Raises: InvalidArgument naming ``field`` if the state is missing.
    """
    if not msg.HasField("state"):
        raise InvalidArgument(field, "required")
    s = msg.state
    return ResumptionState(**{name: getattr(s, name) for name in _STATE_FIELDS})


def fill_state(message: authority_pb2.ResumptionState, state: ResumptionState) -> None:
    """Write the domain state into ``message`` in place (no temporary message and copy: this is
    on every OK redeem, ~2.7 µs per item cheaper than building one and ``CopyFrom``)."""
    message.id_i = state.id_i
    message.id_r = state.id_r
    message.spi_i = state.spi_i
    message.spi_r = state.spi_r
    message.sk_d = state.sk_d
    message.encr_id = state.encr_id
    message.encr_key_bits = state.encr_key_bits
    message.prf_id = state.prf_id
    message.integ_id = state.integ_id
    message.dh_group = state.dh_group
    message.auth_method = state.auth_method
    message.gateway_data = state.gateway_data


def issue_response(issued: IssuedTicket) -> authority_pb2.IssueTicketResponse:
    """The IssueTicket reply for a sealed ticket."""
    return authority_pb2.IssueTicketResponse(
        ticket=issued.ticket, lifetime_seconds=issued.lifetime,
        expires_at=timestamp(issued.expires_at), key_id=issued.key_id.hex(),
        ticket_lt_opaque=issued.lt_opaque)


def redeem_response(result: Redemption,
                    reply: authority_pb2.RedeemTicketResponse | None = None
                    ) -> authority_pb2.RedeemTicketResponse:
    """The RedeemTicket reply (filled into ``reply`` if given); only OK carries the state."""
    if reply is None:
        reply = authority_pb2.RedeemTicketResponse()
    reply.result = result.status  # type: ignore[assignment]  # an IntEnum: the proto number
    if result.contents is not None and result.key_id is not None:
        c = result.contents
        fill_state(reply.state, c.state)
        reply.expires_at.seconds = c.expires_at
        reply.issued_at.seconds = c.issued_at
        reply.key_id = result.key_id.hex()
        reply.ticket_id = result.handle
        reply.reissue = result.reissue
        reply.realm = c.realm
        reply.policy_epoch = c.policy_epoch
    return reply


def result_name(status: RedeemStatus) -> str:
    """The proto enum name of a redeem status (REDEEM_RESULT_OK, ...)."""
    return f"REDEEM_RESULT_{status.name}"


def _maybe(seconds: float | None) -> Timestamp | None:
    return None if seconds is None else timestamp(seconds)


def key_id_from_text(text: str, field: str = "key_id") -> bytes:
    """Parse a 16-hex-digit key id.

    Raises: InvalidArgument naming ``field``.
    """
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != KEY_ID_LEN:
        raise InvalidArgument(field, f"expected {2 * KEY_ID_LEN} hex digits, got {text!r:.40}")
    return raw


def key_info(record: KeyRecord, ring: KeyRing) -> admin_pb2.KeyInfo:
    """A key record as a KeyInfo message."""
    rotates_at = ring.rotates_at(record)
    opens_until = record.opens_until
    if opens_until is None and rotates_at is not None:
        opens_until = rotates_at + ring.max_lifetime
    if record.destroyed_at is not None:
        opens_until = record.destroyed_at
    return admin_pb2.KeyInfo(
        key_id=record.key_id.hex(), state=f"KEY_STATE_{record.state.name}",
        created_at=timestamp(record.created_at), opens_until=_maybe(opens_until),
        sealing_ended_at=_maybe(record.sealing_ended_at),
        destroyed_at=_maybe(record.destroyed_at), seal_count=record.seal_count,
        rotates_at=_maybe(rotates_at))


def revocation_selector(request: admin_pb2.RevokeTicketsRequest
                        ) -> tuple[str, bytes, float | None]:
    """The (kind, value, issued_before) of a RevokeTickets request.

    Raises: InvalidArgument naming the selector field.
    """
    which = request.WhichOneof("selector")
    if which == "id_i":
        if not ID_MIN_LEN <= len(request.id_i) <= ID_MAX_LEN:
            raise InvalidArgument("id_i", f"{ID_MIN_LEN} to {ID_MAX_LEN} octets (the IDi payload "
                                          f"body), got {len(request.id_i)}")
        return BY_ID_I, request.id_i, None
    if which == "old_sa":
        for name in ("spi_i", "spi_r"):
            if len(getattr(request.old_sa, name)) != 8:
                raise InvalidArgument(f"old_sa.{name}", "must be 8 octets")
        return BY_OLD_SA, request.old_sa.spi_i + request.old_sa.spi_r, None
    if which == "ticket_id":
        if len(request.ticket_id) not in (TICKET_ID_LEN, TICKET_ID_LEN + 8, TICKET_HANDLE_LEN):
            raise InvalidArgument("ticket_id", f"must be {TICKET_ID_LEN} octets (or the "
                                               f"{TICKET_HANDLE_LEN}-octet redeem handle)")
        return BY_TICKET_ID, request.ticket_id[:TICKET_ID_LEN], None
    if which == "issued_before":
        seconds = request.issued_before.ToNanoseconds() / 1e9
        if seconds <= 0:
            raise InvalidArgument("issued_before", "must be after 1970-01-01T00:00:00Z")
        return BY_ISSUED_BEFORE, b"", seconds
    raise InvalidArgument("selector", "one of id_i, old_sa, ticket_id, issued_before is "
                                      "required")


def revocation_info(record: RevocationRecord) -> admin_pb2.Revocation:
    """A stored revocation as a message."""
    return admin_pb2.Revocation(
        revocation_id=record.revocation_id, kind=record.kind, value=record.value,
        issued_before=timestamp(record.issued_before), created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at), reason=record.reason)


def replica_status(record: ReplicaRecord, lease: LeaseRecord | None, now: float,
                   timeout: float, me: str) -> admin_pb2.ReplicaStatus:
    """A replica's record as GetStatus shows it: live if its last heartbeat is at most
    ``timeout`` seconds before ``now``; ``me`` is the answering replica's id."""
    return admin_pb2.ReplicaStatus(
        replica_id=record.replica_id, host=record.host, pid=record.pid,
        started_at=timestamp(record.started_at), last_heartbeat=timestamp(record.heartbeat_at),
        ring_version=max(record.ring_version, 0), live=record.heartbeat_at >= now - timeout,
        holds_lease=lease is not None and lease.holder == record.replica_id
        and lease.expires_at > now, this_replica=record.replica_id == me)


def lease_status(lease: LeaseRecord, now: float) -> admin_pb2.LeaseStatus:
    """The stored lease as GetStatus shows it (expired by ``now``)."""
    return admin_pb2.LeaseStatus(holder=lease.holder, epoch=lease.epoch,
                                 expires_at=timestamp(lease.expires_at),
                                 expired=lease.expires_at <= now)


def item_error(exc: AuthorityError) -> authority_pb2.ItemError:
    """A per-item failure of a batch."""
    return authority_pb2.ItemError(code=_CODES[exc.status], message=exc.message)


def check_batch(count: int, limit: int) -> None:
    """Raises: InvalidArgument naming ``items`` if a batch has more than ``limit`` items (an
    empty batch is allowed and answered with no items)."""
    if count > limit:
        raise InvalidArgument("items", f"at most {limit} items per batch, got {count}")


def issue_batch_response(results: list[IssuedTicket | AuthorityError],
                         batch_id: int) -> authority_pb2.IssueTicketsResponse:
    """The IssueTickets reply, items in request order."""
    return _with_items(authority_pb2.IssueTicketsResponse(batch_id=batch_id), results,
                       lambda item, issued: item.ticket.CopyFrom(issue_response(issued)))


def redeem_batch_response(results: list[Redemption | AuthorityError],
                          batch_id: int) -> authority_pb2.RedeemTicketsResponse:
    """The RedeemTickets reply, items in request order."""
    return _with_items(authority_pb2.RedeemTicketsResponse(batch_id=batch_id), results,
                       lambda item, redeemed: redeem_response(redeemed, item.redeemed))


def consume_batch_response(results: Sequence[RedeemStatus | AuthorityError],
                           batch_id: int) -> authority_pb2.ConsumeTicketsResponse:
    """The ConsumeTickets reply, items in request order."""
    return _with_items(authority_pb2.ConsumeTicketsResponse(batch_id=batch_id), results,
                       lambda item, status: item.consumed.CopyFrom(
                           authority_pb2.ConsumeTicketResponse(result=result_name(status))))


def _with_items(reply: T, results: Sequence[Any], fill: Callable[[Any, Any], object]) -> T:
    """``reply`` with one item per result, in order: an ItemError for an AuthorityError, else
    what ``fill(item, result)`` puts in it."""
    items: Any = reply.items  # type: ignore[attr-defined]
    for result in results:
        item = items.add()
        if isinstance(result, AuthorityError):
            item.error.CopyFrom(item_error(result))
        else:
            fill(item, result)
    return reply
