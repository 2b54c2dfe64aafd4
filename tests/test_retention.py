"""Retention across a lowered ``tickets.max_lifetime`` (issue 12 point 2): tickets already out
keep the lifetime they were granted, so consumed entries, revocations and a rotated key's
decryption window must last as long as the longest of them, not the new maximum. Real SoftHSM2,
real gRPC, a manual clock, restarts on the same state directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.config import TicketPolicy
from authority.store.sqlite import SqliteStore
from tests.conftest import START, Harness, issue, redeem

OK = authority_pb2.REDEEM_RESULT_OK
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
EXPIRED = authority_pb2.REDEEM_RESULT_EXPIRED
HOUR = 3600
LONG = 8 * HOUR


def restart_with_max(h: Harness, max_lifetime: int) -> None:
    """Stop, then start on the same state dir with ``tickets.max_lifetime`` changed."""
    h.stop()
    tickets = TicketPolicy(default_lifetime=min(HOUR, max_lifetime), max_lifetime=max_lifetime)
    h.start(replace(h.config, tickets=tickets))


@pytest.fixture
def long_then_short(tmp_path: Path) -> Iterator[Harness]:
    """A server that issued with the default 8 h maximum, then restarted with 1 h."""
    h = Harness(tmp_path / "state", "pkcs11")
    h.start()
    yield h
    h.stop()


def test_consumed_and_revoked_survive_a_lowered_max_lifetime(long_then_short: Harness) -> None:
    h = long_then_short
    tickets = [issue(h.tickets, n, lifetime=LONG).ticket for n in range(4)]
    h.clock.advance(60)
    restart_with_max(h, HOUR)
    consumed, revoked, redeemed, _untouched = tickets
    handle = redeem(h.tickets, consumed).ticket_id
    assert h.tickets.ConsumeTicket(authority_pb2.ConsumeTicketRequest(ticket_id=handle)).result \
        == OK
    assert redeem(h.tickets, redeemed, consume=True).result == OK
    reply = h.admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(
        ticket_id=redeem(h.tickets, revoked).ticket_id[:16]))
    assert reply.expires_at.seconds >= START + LONG  # as long as the ticket it covers
    old_key = h.authority.ring.primary_id
    h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    opens_until = {r.key_id: r.opens_until for r in h.authority.ring.records()}[old_key]
    assert opens_until is not None and opens_until >= START + LONG

    restart_with_max(h, HOUR)         # a second start at 1 h keeps the horizon
    h.clock.advance(2 * HOUR)
    h.authority.maintain()            # purges what it may, closes the windows it may
    expected = [REPLAYED, REVOKED, REPLAYED, OK]
    assert [redeem(h.tickets, t).result for t in tickets] == expected
    restart_with_max(h, HOUR)
    assert [redeem(h.tickets, t).result for t in tickets] == expected

    h.clock.advance(START + LONG - h.clock.now())
    assert [redeem(h.tickets, t).result for t in tickets] == [EXPIRED] * 4
    h.clock.advance(reply.expires_at.seconds - h.clock.now())  # the horizon: restart + 8 h
    h.authority.maintain()
    assert h.authority.store.consumed_count(h.clock.now()) == 0
    assert not h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations


def test_the_horizon_passes(long_then_short: Harness) -> None:
    """Once every long ticket has expired, the lower maximum bounds retention again."""
    h = long_then_short
    issue(h.tickets, 1, lifetime=LONG)
    restart_with_max(h, HOUR)
    h.clock.advance(LONG + 10)
    restart_with_max(h, HOUR)
    reply = h.admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(id_i=b"\x02\x00\x00\x00who"))
    assert reply.expires_at.seconds == int(h.clock.now()) + 1 + HOUR
    old_key = h.authority.ring.primary_id
    h.admin.RotateKey(admin_pb2.RotateKeyRequest())
    record = {r.key_id: r for r in h.authority.ring.records()}[old_key]
    assert record.opens_until == h.clock.now() + HOUR


def test_raising_the_maximum_needs_no_horizon(tmp_path: Path) -> None:
    """The store remembers the maximum each start ran with; a raise keeps no horizon, a lower
    one gets now + the previous maximum."""
    store = SqliteStore(tmp_path / "authority.db")
    try:
        assert store.record_max_lifetime(HOUR, START) == 0
        assert store.record_max_lifetime(LONG, START + 10) == 0
        assert store.record_max_lifetime(HOUR, START + 20) == START + 20 + LONG
        assert store.record_max_lifetime(HOUR, START + 30) == START + 20 + LONG
        assert store.record_max_lifetime(2 * HOUR, START + 40) == START + 20 + LONG
        assert store.lifetime_horizon() == START + 20 + LONG
    finally:
        store.close()
    reopened = SqliteStore(tmp_path / "authority.db")
    try:
        assert reopened.lifetime_horizon() == START + 20 + LONG
    finally:
        reopened.close()
