"""The role matrix, generated: every method of every service the mTLS listener serves, called
with every role's certificate, with a certificate that has no role and with one from outside
the trust domain, on both server modes.

The methods come from the service descriptors (and the server's own reflection list of what it
serves), so an RPC is in the matrix the day it is added. Who may call what is written here
once, per service, independently of authority/service/auth.py: a service this table does not
know fails the test until someone decides who may call it.

A call that passes the role check may still fail for its (empty) request, or be UNIMPLEMENTED
by its servicer (grpcio-health-checking's thread-pool servicer has no Health/List); the matrix
only asks whether the role check let it through: refused calls are PERMISSION_DENIED (no role,
or another role) or UNAUTHENTICATED (outside the trust domain), and every other code means the
call got past the role check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.config import ADMIN, GATEWAY, ROLES
from tests.test_tls_roles import Tls, tls_fixture  # noqa: F401

ANYONE = "anyone with a certificate the handshake accepts"

# Who may call each service, by full name. Reflection describes every service: admins only.
CALLERS: dict[str, str] = {
    authority_pb2.DESCRIPTOR.services_by_name["TicketAuthority"].full_name: GATEWAY,
    admin_pb2.DESCRIPTOR.services_by_name["TicketAdmin"].full_name: ADMIN,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name: ANYONE,
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name: ADMIN,
}
NO_ROLE = "no role"
OUTSIDE = "outside the trust domain"
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@dataclass(frozen=True)
class Caller:
    """A client certificate: the role it maps to (or NO_ROLE / OUTSIDE) and its files."""

    name: str
    cert: Path
    key: Path


def callers(tls: Tls, tmp: Path) -> list[Caller]:
    """One certificate per role, one in the trust domain with no role, one outside it."""
    assert set(ROLES) == {GATEWAY, ADMIN}, "a new role: give it a certificate here"
    domain = tls.pki.trust_domain
    made = [Caller(GATEWAY, tls.pki.gateway_cert, tls.pki.gateway_key),
            Caller(ADMIN, tls.pki.admin_cert, tls.pki.admin_key)]
    for name, uri in ((NO_ROLE, f"spiffe://{domain}/printer/p1"),
                      (OUTSIDE, "spiffe://elsewhere.test/admin/ops")):
        cert, key = tls.client_cert(tmp, name.replace(" ", "-"),
                                    [x509.UniformResourceIdentifier(uri)])
        made.append(Caller(name, cert, key))
    return made


def expected(service: str, caller: str) -> set[grpc.StatusCode] | None:
    """The codes a refused call gets, or None when the role check must let it through.

    Raises KeyError for a service nobody has decided about."""
    allowed = CALLERS[service]
    if allowed in (ANYONE, caller):
        return None
    if caller == OUTSIDE:
        return {grpc.StatusCode.UNAUTHENTICATED}
    return {grpc.StatusCode.PERMISSION_DENIED}


def served_services(tls: Tls) -> set[str]:
    """The services the listener serves, as its reflection lists them (asked as an admin)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(tls.admin())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {service.name for service in reply.list_services_response.service}


def methods(services: set[str]) -> list[MethodDescriptor]:
    """Every method of ``services``, from their descriptors."""
    pool = descriptor_pool.Default()
    found: list[MethodDescriptor] = []
    for name in sorted(services):
        service: ServiceDescriptor = pool.FindServiceByName(name)
        found += list(service.methods)
    return found


def call(channel: grpc.Channel, method: MethodDescriptor) -> grpc.StatusCode:
    """Call ``method`` with an empty request (one message on a request stream) and return the
    status; a response stream is cancelled after its first message (Health/Watch never ends)."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    multicallable = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString)
    request: Any = iter([request_type()]) if method.client_streaming else request_type()
    try:
        if not method.server_streaming:
            multicallable(request, timeout=10)
            return grpc.StatusCode.OK
        responses = multicallable(request, timeout=10)
        try:
            next(responses)
        except StopIteration:
            return responses.code()  # type: ignore[no-any-return]
        responses.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]


def test_every_method_of_every_served_service_checks_the_callers_role(
        tls: Tls, tmp_path: Path) -> None:
    served = served_services(tls)
    assert set(CALLERS) <= served, f"not served: {set(CALLERS) - served}"
    unknown = served - set(CALLERS)
    assert not unknown, f"served but nobody decided who may call it: {unknown}"
    everything = methods(served)
    assert len(everything) >= 19   # 7 ticket, 8 admin, health Check and Watch, reflection
    wrong: list[str] = []
    for caller in callers(tls, tmp_path):
        channel = tls.channel(caller.cert, caller.key)
        for method in everything:
            code = call(channel, method)
            refused = expected(method.containing_service.full_name, caller.name)
            if refused is None and code in REFUSED:
                wrong.append(f"{caller.name} -> {method.full_name}: {code.name}, "
                             "expected the call to reach its handler")
            elif refused is not None and code not in refused:
                wrong.append(f"{caller.name} -> {method.full_name}: {code.name}, "
                             f"expected {' or '.join(sorted(c.name for c in refused))}")
    assert not wrong, "\n".join(wrong)
