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
