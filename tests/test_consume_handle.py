"""ConsumeTicket takes only handles a redeem authenticated (issue 12 point 10): the handle is
ticket id (16) | expiry (8) | tag (16), the tag a truncated HMAC-SHA256 under a key the store
keeps. A made-up, altered or old-style handle is INVALID_ARGUMENT naming ``ticket_id`` and stores
nothing; a real one consumes once, also across a restart. Real SoftHSM2, real gRPC."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.sealer import TICKET_HANDLE_LEN
from authority.store.sqlite import SqliteStore
from tests.conftest import START, Harness, issue, redeem

OK = authority_pb2.REDEEM_RESULT_OK
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED
EXPIRED = authority_pb2.REDEEM_RESULT_EXPIRED


def consume(h: Harness, handle: bytes) -> int:
    return h.tickets.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=handle)).result


def consumed(h: Harness) -> int:
    return h.authority.store.consumed_count(h.clock.now())


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


def test_made_up_handles_are_refused_and_store_nothing(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    ticket = issue(h.tickets, 1).ticket
    real = redeem(h.tickets, ticket).ticket_id
    assert len(real) == TICKET_HANDLE_LEN == 40
    later = (int(START) + 3600).to_bytes(8, "big")
    made_up = {
        "random id, live expiry (the old 24-octet form)": os.urandom(16) + later,
        "the real id and expiry without a tag": real[:24],
        "random 40 octets": os.urandom(40),
        "zeros": bytes(40),
        "real with a flipped tag": _flip(real, 39),
        "real with a longer expiry": real[:16] + (int(START) + 10**6).to_bytes(8, "big")
                                     + real[24:],
        "real with another id": _flip(real, 0),
        "too long": real + b"\x00",
    }
    for name, handle in made_up.items():
        with pytest.raises(grpc.RpcError) as err:
            consume(h, handle)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert err.value.details().startswith("ticket_id: "), name
        assert consumed(h) == 0, f"{name} was stored"
    assert redeem(h.tickets, ticket).result == OK  # nothing above consumed the real ticket


def test_a_real_handle_consumes_once_across_a_restart(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    first, second = (issue(h.tickets, n).ticket for n in (1, 2))
    handles = [redeem(h.tickets, t).ticket_id for t in (first, second)]
    assert handles[0] != handles[1]
    assert consume(h, handles[0]) == OK
    assert consume(h, handles[0]) == REPLAYED
    assert consumed(h) == 1
    assert redeem(h.tickets, first).result == REPLAYED
    h.restart()          # the handle key is the store's: handles made before still work
    assert consume(h, handles[0]) == REPLAYED
    assert consume(h, handles[1]) == OK
    assert redeem(h.tickets, second).result == REPLAYED
    assert consumed(h) == 2
    third = issue(h.tickets, 3).ticket
    handle = redeem(h.tickets, third).ticket_id
    h.clock.advance(h.config.tickets.default_lifetime)
    assert consume(h, handle) == EXPIRED  # an expired ticket's handle stores nothing
    assert consumed(h) == 0


def test_the_handle_key_is_made_once_and_kept(tmp_path: Path) -> None:
    """32 random octets made on first use and kept in the store's meta table (so a restart, and
    later a replica on the same store, accepts the handles made before); another store has
    another key."""
    path = tmp_path / "authority.db"
    store = SqliteStore(path)
    try:
        key = store.handle_key()
        assert len(key) == 32
        assert store.handle_key() == key
    finally:
        store.close()
    for other, same in ((path, True), (tmp_path / "other.db", False)):
        reopened = SqliteStore(other)
        try:
            assert (reopened.handle_key() == key) is same
        finally:
            reopened.close()


def test_consume_tickets_answers_each_handle_in_one_batch(pkcs11_harness: Harness) -> None:
    """ConsumeTickets: OK for each fresh handle, REPLAYED for one repeated in the batch (after
    its first) and for one consumed before, EXPIRED for an expired ticket, an ItemError naming
    ``items[i].ticket_id`` for a made-up handle (nothing stored for it); a batch over
    ``server.max_batch_items`` is INVALID_ARGUMENT naming ``items``."""
    h = pkcs11_harness
    handles = [redeem(h.tickets, issue(h.tickets, n).ticket).ticket_id for n in range(4)]
    assert consume(h, handles[3]) == OK
    short_lived = issue(h.tickets, 9, lifetime=60).ticket
    expired = redeem(h.tickets, short_lived).ticket_id
    h.clock.advance(61)
    request = authority_pb2.ConsumeTicketsRequest(batch_id=7, items=[
        authority_pb2.ConsumeTicketRequest(ticket_id=t) for t in
        [handles[0], handles[1], handles[0], _flip(handles[2], 39), handles[3], expired]])
    reply = h.tickets.ConsumeTickets(request)
    assert reply.batch_id == 7
    kinds = [item.WhichOneof("outcome") for item in reply.items]
    assert kinds == ["consumed", "consumed", "consumed", "error", "consumed", "consumed"]
    assert [item.consumed.result for item in reply.items if item.HasField("consumed")] == [
        OK, OK, REPLAYED, REPLAYED, EXPIRED]
    error = reply.items[3].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.message.startswith("items[3].ticket_id: ")
    assert consumed(h) == 3                           # handles 0, 1 and 3; not the made-up one
    assert consume(h, handles[2]) == OK               # its real handle was not spent
    too_many = authority_pb2.ConsumeTicketsRequest(items=[
        authority_pb2.ConsumeTicketRequest(ticket_id=handles[0])] * 1001)
    with pytest.raises(grpc.RpcError) as err:
        h.tickets.ConsumeTickets(too_many)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("items: ")
