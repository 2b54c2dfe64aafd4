"""A device or store that fails is UNAVAILABLE, never INVALID or INTERNAL, and changes nothing."""

from __future__ import annotations

import ctypes

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.app import pkcs11_settings
from tests.conftest import Harness, issue, redeem, sample_state

# The test pulls the library out from under python-pkcs11 on purpose; its finalisers complain.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_device_gone_is_unavailable(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    stub = harness.tickets
    ticket = issue(stub).ticket
    module = ctypes.CDLL(str(pkcs11_settings(harness.config).module))
    assert module.C_Finalize(None) == 0  # the library drops every session: the device is gone
    assert _code(lambda: redeem(stub, ticket)) == grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: harness.admin.RotateKey(admin_pb2.RotateKeyRequest())) == \
        grpc.StatusCode.UNAVAILABLE
    assert harness.authority.store.consumed_count(harness.clock.now()) == 0


def test_issue_on_a_gone_device_is_unavailable(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    stub = harness.tickets
    module = ctypes.CDLL(str(pkcs11_settings(harness.config).module))
    assert module.C_Finalize(None) == 0
    request = authority_pb2.IssueTicketRequest(state=sample_state())
    assert _code(lambda: stub.IssueTicket(request)) == grpc.StatusCode.UNAVAILABLE
    keys = [k.key_id for k in harness.admin.ListKeys(admin_pb2.ListKeysRequest()).keys]
    assert len(keys) == 1  # nothing rotated or lost


def test_store_failure_is_unavailable(harness: Harness) -> None:
    stub = harness.tickets
    ticket = issue(stub).ticket
    handle = redeem(stub, issue(stub, 1).ticket).ticket_id  # a real (authenticated) handle
    harness.authority.store.close()
    assert _code(lambda: redeem(stub, ticket, consume=True)) == grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: stub.ConsumeTicket(
        authority_pb2.ConsumeTicketRequest(ticket_id=handle))) == grpc.StatusCode.UNAVAILABLE


def test_token_unreadable_is_unavailable_not_serving_then_back_by_itself(
        pkcs11_harness: Harness) -> None:
    """The embedded token's directory moved away mid-service (issue 16, scenario 1): a valid
    ticket redeems UNAVAILABLE, never INVALID (before: INVALID, the device's "no such key"
    taken for a foreign ticket); health turns NOT_SERVING (before: SERVING throughout); once
    the directory is back the server serves again by itself (before: never, the module left
    finalised by a failed re-initialisation) and health is SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import wait_until

    harness = pkcs11_harness
    harness.authority.start_maintenance()   # the heartbeat that lists the device each second
    stub = harness.tickets
    health = health_pb2_grpc.HealthStub(harness.channel())
    ticket = issue(stub).ticket
    tokens = harness.state_dir / "hsm" / "tokens"
    away = tokens.with_name("tokens.away")
    tokens.rename(away)
    try:
        codes: set[object] = set()

        def gateway_retries_then_checks_health() -> bool:
            try:
                codes.add(redeem(stub, ticket).result)
            except grpc.RpcError as err:
                codes.add(err.code())
            return bool(health.Check(health_pb2.HealthCheckRequest()).status
                        == health_pb2.HealthCheckResponse.NOT_SERVING)

        wait_until(gateway_retries_then_checks_health, timeout=15)
        assert authority_pb2.REDEEM_RESULT_INVALID not in codes, codes
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
    finally:
        away.rename(tokens)
    wait_until(lambda: _code(lambda: redeem(stub, ticket)) == grpc.StatusCode.OK, timeout=10)
    assert redeem(stub, ticket).result == authority_pb2.REDEEM_RESULT_OK
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status
               == health_pb2.HealthCheckResponse.SERVING, timeout=10)


def test_an_idle_server_reports_a_lost_token_not_serving(pkcs11_harness: Harness) -> None:
    """No gateway calls at all: the token's directory moved away still turns health
    NOT_SERVING (the heartbeat probes an idle device), and SERVING again once it is back
    (before: SERVING throughout, until a gateway's call failed)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import wait_until

    harness = pkcs11_harness
    harness.authority.start_maintenance()
    health = health_pb2_grpc.HealthStub(harness.channel())
    tokens = harness.state_dir / "hsm" / "tokens"
    away = tokens.with_name("tokens.away")
    tokens.rename(away)
    try:
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=15)
    finally:
        away.rename(tokens)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status
               == health_pb2.HealthCheckResponse.SERVING, timeout=15)
