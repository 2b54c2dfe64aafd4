"""Key rotation, retirement and automatic destruction, as a table of key ring states."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.keys import KeyState
from tests.conftest import Harness, issue, redeem

OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID

# (steps applied in order, expected result for a ticket sealed before the steps)
# rotate: RotateKey; retire: RetireKey(old key); window: clock past max lifetime + maintain;
# restart: stop and start on the same state dir.
TABLE = [
    ((), OK),
    (("rotate",), OK),
    (("rotate", "restart"), OK),
    (("rotate", "rotate"), OK),
    (("rotate", "retire"), INVALID),
    (("rotate", "retire", "restart"), INVALID),
    (("rotate", "restart", "retire"), INVALID),
    (("rotate", "window"), INVALID),
    (("rotate", "restart", "window", "restart"), INVALID),
]


@pytest.mark.parametrize(("steps", "expected"), TABLE, ids=["-".join(s) or "none"
                                                             for s, _ in TABLE])
def test_rotation_table(harness: Harness, steps: tuple[str, ...], expected: int) -> None:
    old = issue(harness.tickets, lifetime=harness.config.tickets.max_lifetime)
    old_key = old.key_id
    for step in steps:
        if step == "rotate":
            reply = harness.admin.RotateKey(admin_pb2.RotateKeyRequest())
            assert reply.new_key.key_id != reply.previous_key.key_id
            assert reply.new_key.state == admin_pb2.KEY_STATE_ACTIVE
            assert reply.previous_key.state == admin_pb2.KEY_STATE_DECRYPT_ONLY
        elif step == "retire":
            harness.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=old_key))
        elif step == "window":
            harness.clock.advance(harness.config.tickets.max_lifetime - 1)
            harness.authority.maintain()
            assert redeem(harness.tickets, old.ticket).result == authority_pb2.REDEEM_RESULT_OK
            harness.clock.advance(1)
            harness.authority.maintain()
        elif step == "restart":
            harness.restart()
    result = redeem(harness.tickets, old.ticket).result
    if result == authority_pb2.REDEEM_RESULT_EXPIRED:
        pytest.fail("a destroyed key's ticket must be INVALID, not EXPIRED")
    assert result == expected
    fresh = issue(harness.tickets)
    assert fresh.key_id == harness.authority.ring.primary_id.hex()
    assert (fresh.key_id == old_key) == ("rotate" not in steps)
    assert redeem(harness.tickets, fresh.ticket).result == OK
    if expected == INVALID:
        assert bytes.fromhex(old_key) not in harness.authority.backend.list_keys()


def test_list_keys_shows_states_and_windows(harness: Harness) -> None:
    harness.admin.RotateKey(admin_pb2.RotateKeyRequest())
    keys = harness.admin.ListKeys(admin_pb2.ListKeysRequest()).keys
    assert [k.state for k in keys] == [admin_pb2.KEY_STATE_DECRYPT_ONLY,
                                       admin_pb2.KEY_STATE_ACTIVE]
    old, new = keys
    lifetime = harness.config.tickets.max_lifetime
    assert old.opens_until.seconds == old.sealing_ended_at.seconds + lifetime
    assert new.rotates_at.seconds == new.created_at.seconds + harness.config.keys.rotation_period
    assert new.opens_until.seconds == new.rotates_at.seconds + lifetime
    harness.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=old.key_id))
    assert len(harness.admin.ListKeys(admin_pb2.ListKeysRequest()).keys) == 1
    everything = harness.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=True)).keys
    assert everything[0].state == admin_pb2.KEY_STATE_DESTROYED
    assert everything[0].destroyed_at.seconds > 0


@pytest.mark.parametrize(("key_id", "code"), [
    (None, grpc.StatusCode.FAILED_PRECONDITION),        # the sealing key
    ("00" * 8, grpc.StatusCode.NOT_FOUND),
    ("not-hex", grpc.StatusCode.INVALID_ARGUMENT),
    ("abcd", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_retire_refusals(harness: Harness, key_id: str | None, code: grpc.StatusCode) -> None:
    target = key_id if key_id is not None else harness.authority.ring.primary_id.hex()
    with pytest.raises(grpc.RpcError) as err:
        harness.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=target))
    assert err.value.code() == code
    assert harness.authority.backend.list_keys() == {harness.authority.ring.primary_id}


def test_scheduled_rotation(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(rotation_period=600)
    h.start()
    first = h.authority.ring.primary_id
    h.clock.advance(599)
    h.authority.maintain()
    assert h.authority.ring.primary_id == first
    h.clock.advance(1)
    h.authority.maintain()
    assert h.authority.ring.primary_id != first
    states = {r.key_id: r.state for r in h.authority.ring.records()}
    assert states[first] == KeyState.DECRYPT_ONLY


def test_seal_budget_forces_rotation(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(max_seals_per_key=5, seal_reservation=2)
    h.start()
    stub = h.tickets
    tickets = [issue(stub, n) for n in range(12)]
    key_ids = [t.key_id for t in tickets]
    assert [key_ids.count(k) for k in dict.fromkeys(key_ids)] == [5, 5, 2]
    assert all(redeem(stub, t.ticket).result == OK for t in tickets)
    records = h.authority.ring.records()
    assert [r.state for r in records] == [KeyState.DECRYPT_ONLY, KeyState.DECRYPT_ONLY,
                                          KeyState.ACTIVE]
    assert all(r.seal_count <= 5 for r in records)


def test_seal_budget_survives_restart(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(max_seals_per_key=5, seal_reservation=2)
    h.start()
    first = issue(h.tickets).key_id  # reserves 2 seals, uses 1
    h.restart()                      # the unused reservation counts as spent
    key_ids = [issue(h.tickets, n).key_id for n in range(4)]
    assert key_ids[:3] == [first] * 3 and key_ids[3] != first


def _device_unseals(h: Harness) -> float:
    """Unseal calls the authority has made to its device (its device-latency histogram)."""
    count = h.authority.metrics.registry.get_sample_value(
        "ticket_authority_device_operation_seconds_count", {"op": "unseal_many"})
    return count or 0.0


def test_closed_window_refuses_without_maintenance_or_device_call(harness: Harness) -> None:
    """A DECRYPT_ONLY key past its window opens nothing even before maintenance destroys it,
    and the refusal costs no device call (the window check in KeyRing.check_opens)."""
    lifetime = harness.config.tickets.max_lifetime
    old = issue(harness.tickets, lifetime=lifetime)
    harness.admin.RotateKey(admin_pb2.RotateKeyRequest())
    before = _device_unseals(harness)
    assert redeem(harness.tickets, old.ticket).result == OK
    assert _device_unseals(harness) == before + 1   # the count sees this authority's unseals
    window = {r.key_id.hex(): r.opens_until for r in harness.authority.ring.records()}
    closes = window[old.key_id]
    assert closes is not None
    harness.clock.advance(closes - harness.clock.now())  # the window closes; no maintenance
    assert redeem(harness.tickets, old.ticket).result == INVALID
    assert _device_unseals(harness) == before + 1
    states = {r.key_id.hex(): r.state for r in harness.authority.ring.records()}
    assert states[old.key_id] == KeyState.DECRYPT_ONLY   # still in the device, not yet destroyed
    assert bytes.fromhex(old.key_id) in harness.authority.backend.list_keys()
