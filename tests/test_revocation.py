"""Revocation over a real server: each selector revokes exactly the tickets it covers, REVOKED
lasts until expiry, revocations persist and are purged, bad requests name their field, and a
version 1 state store is migrated."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.conftest import START, Harness, issue, redeem, sample_state

OK = authority_pb2.REDEEM_RESULT_OK
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
EXPIRED = authority_pb2.REDEEM_RESULT_EXPIRED
INVALID = authority_pb2.REDEEM_RESULT_INVALID
MAX_LIFETIME = 8 * 3600


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def revoke(h: Harness, **selector: Any) -> admin_pb2.RevokeTicketsResponse:
    return h.admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(**selector))


State = authority_pb2.ResumptionState
# Each selector, as a function of the tickets' states and redeem handles; the tickets it must
# cover by index (tickets 0 and 1 share id_i; 2 has its own).
SELECTORS: dict[str, tuple[Callable[[list[State], list[bytes]], dict[str, Any]], set[int]]] = {
    "id_i": (lambda s, _: {"id_i": s[0].id_i}, {0, 1}),
    "old_sa": (lambda s, _: {"old_sa": admin_pb2.SaSelector(spi_i=s[2].spi_i,
                                                             spi_r=s[2].spi_r)}, {2}),
    "ticket_id": (lambda _, handles: {"ticket_id": handles[1][:16]}, {1}),
    "ticket_handle": (lambda _, handles: {"ticket_id": handles[2]}, {2}),
    "issued_before": (lambda _s, _h: {"issued_before": ts(START + 10)}, {0, 1}),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_revocation_table(harness: Harness, name: str) -> None:
    h = harness
    states = [sample_state(1), sample_state(2, id_i=sample_state(1).id_i), sample_state(3)]
    tickets = []
    for n, state in enumerate(states):
        if n == 2:
            h.clock.advance(20)  # ticket 2 is issued after the issued_before cutoff
        tickets.append(h.tickets.IssueTicket(
            authority_pb2.IssueTicketRequest(state=state, lifetime_seconds=3600)).ticket)
    handles = [redeem(h.tickets, t).ticket_id for t in tickets]
    make, covered = SELECTORS[name]
    reply = revoke(h, reason=f"test {name}", **make(states, handles))
    assert reply.revocation_id >= 1
    expected = [REVOKED if i in covered else OK for i in range(3)]
    assert [redeem(h.tickets, t).result for t in tickets] == expected
    # a REVOKED redeem with consume changes nothing; a later ticket for the same SA is fine
    assert [redeem(h.tickets, t, consume=True).result for t in tickets] == expected
    h.clock.advance(1)  # a revocation covers its whole second (tickets carry whole seconds)
    later = h.tickets.IssueTicket(authority_pb2.IssueTicketRequest(state=states[0])).ticket
    if name != "issued_before":
        assert redeem(h.tickets, later).result == OK

    listed = h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
    assert [r.revocation_id for r in listed] == [reply.revocation_id]
    assert listed[0].reason == f"test {name}"
    assert listed[0].expires_at == reply.expires_at

    h.restart()  # persisted
    assert [redeem(h.tickets, t).result for t in tickets] == [
        REVOKED if i in covered else authority_pb2.REDEEM_RESULT_REPLAYED for i in range(3)]
    h.clock.advance(3600)
    assert [redeem(h.tickets, t).result for t in tickets] == [EXPIRED] * 3

    # purged only once every covered ticket has expired
    h.authority.maintain()
    assert len(h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations) == 1
    h.clock.advance(reply.expires_at.seconds - h.clock.now())
    h.authority.maintain()
    assert not h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
    h.restart()
    assert not h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations


def test_revocation_lives_as_long_as_the_tickets_it_covers(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    ticket = issue(h.tickets, 1, lifetime=10**6).ticket  # clamped to the maximum lifetime
    reply = revoke(h, id_i=sample_state(1).id_i)
    assert reply.expires_at.seconds >= START + MAX_LIFETIME
    h.clock.advance(MAX_LIFETIME - 1)
    h.authority.maintain()
    assert redeem(h.tickets, ticket).result == REVOKED
    h.clock.advance(1)
    assert redeem(h.tickets, ticket).result == EXPIRED


def test_revoked_only_for_authentic_tickets(pkcs11_harness: Harness) -> None:
    h = pkcs11_harness
    ticket = bytearray(issue(h.tickets, 1).ticket)
    h.clock.advance(2)
    revoke(h, issued_before=ts(START + 1))
    ticket[-1] ^= 1
    assert redeem(h.tickets, bytes(ticket)).result == INVALID


@pytest.mark.parametrize(("selector", "field"), [
    ({}, "selector"),
    ({"id_i": b""}, "id_i"),
    ({"id_i": b"\x02\x00\x00"}, "id_i"),
    ({"id_i": bytes(257)}, "id_i"),
    ({"old_sa": admin_pb2.SaSelector(spi_i=bytes(8))}, "old_sa.spi_r"),
    ({"old_sa": admin_pb2.SaSelector(spi_i=bytes(7), spi_r=bytes(8))}, "old_sa.spi_i"),
    ({"ticket_id": bytes(15)}, "ticket_id"),
    ({"ticket_id": bytes(17)}, "ticket_id"),
    ({"issued_before": Timestamp()}, "issued_before"),
    ({"issued_before": ts(START + 3600)}, "issued_before"),
    ({"id_i": sample_state(1).id_i, "reason": "r" * 257}, "reason"),
])
def test_bad_revoke_requests(pkcs11_harness: Harness, selector: dict[str, Any],
                             field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        revoke(pkcs11_harness, **selector)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:")
    assert not pkcs11_harness.admin.ListRevocations(
        admin_pb2.ListRevocationsRequest()).revocations


# -- the store ---------------------------------------------------------------------------------

_V1_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (key_id BLOB PRIMARY KEY, state INTEGER NOT NULL, created_at REAL NOT NULL,
    seal_count INTEGER NOT NULL, sealing_ended_at REAL, opens_until REAL, destroyed_at REAL);
CREATE TABLE consumed (ticket_id BLOB PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO keys VALUES (x'0102030405060708', 1, 1800000000.0, 4096, NULL, NULL, NULL);
INSERT INTO consumed VALUES (x'00112233445566778899aabbccddeeff', 1800003600);
"""


def test_schema_1_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "authority.db"
    with sqlite3.connect(path) as db:
        db.executescript(_V1_SCHEMA)
    store = SqliteStore(path)
    try:
        assert [r.key_id.hex() for r in store.load_keys()] == ["0102030405060708"]
        assert store.consumed_among([bytes.fromhex("00112233445566778899aabbccddeeff")],
                                    START) == {bytes.fromhex("00112233445566778899aabbccddeeff")}
        assert store.load_revocations(START) == [] and store.load_epochs() == {}
        assert store.bump_epoch("blue", START) == 1
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name='schema'").fetchone() == (
            str(SCHEMA_VERSION),)
    reopened = SqliteStore(path)
    assert reopened.load_epochs() == {"blue": 1}
    reopened.close()


def test_existing_state_dir_keeps_working(pkcs11_harness: Harness) -> None:
    """A state dir written before revocations (schema 1) opens with its keys and tickets."""
    h = pkcs11_harness
    ticket = issue(h.tickets, 1).ticket
    h.stop()
    with sqlite3.connect(h.state_dir / "authority.db") as db:
        db.executescript("DROP TABLE revocations; DROP TABLE realms; "
                         "UPDATE meta SET value='1' WHERE name='schema';")
    h.start()
    assert redeem(h.tickets, ticket).result == OK
    revoke(h, id_i=sample_state(1).id_i)
    assert redeem(h.tickets, ticket).result == REVOKED


def test_unknown_schema_is_refused(tmp_path: Path) -> None:
    from authority.errors import StartupError

    path = tmp_path / "authority.db"
    with sqlite3.connect(path) as db:
        db.executescript(_V1_SCHEMA.replace("'schema', '1'", "'schema', '99'"))
    with pytest.raises(StartupError, match="schema 99"):
        SqliteStore(path)


@pytest.mark.parametrize(("kind", "value", "field"), [
    ("id_i", b"\x02\x00\x00", "id_i"),
    ("id_i", bytes(257), "id_i"),
    ("old_sa", bytes(15), "old_sa"),
    ("ticket_id", bytes(40), "ticket_id"),
    ("owner", b"x", "selector"),
])
def test_policy_checks_each_selector_before_the_audit(tmp_path: Path, kind: str, value: bytes,
                                                      field: str) -> None:
    """Policy.revoke itself (not only the gRPC layer) refuses a value that cannot select its
    kind, before its audit hook runs; a good one is audited with the effective cutoff."""
    from authority.clock import ManualClock
    from authority.errors import InvalidArgument
    from authority.policy import Policy

    store = SqliteStore(tmp_path / "authority.db")
    lines: list[tuple[str, str, dict[str, Any]]] = []
    policy = Policy(store, ManualClock(START), 3600,
                    audit=lambda actor, action, details: lines.append((actor, action,
                                                                       dict(details))))
    try:
        policy.load()
        with pytest.raises(InvalidArgument) as err:
            policy.revoke(kind, value, reason="test")
        assert err.value.field == field
        assert lines == []
        record = policy.revoke("ticket_id", bytes(16), reason="test", actor="alice")
        assert lines == [("alice", "tickets.revoke", {
            "selector": "ticket_id", "value": bytes(16).hex(), "issued_before": START + 1,
            "reason": "test", "expires_at": START + 1 + 3600})]
        assert store.load_revocations(START) == [record]
    finally:
        store.close()
