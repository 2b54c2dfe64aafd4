"""What the listeners serve, for both server modes: the ticket service, and the admin service
with health and reflection on the same listener or on their own (``server.admin_listen``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.errors import StartupError

TICKET_SERVICE = authority_pb2.DESCRIPTOR.services_by_name["TicketAuthority"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["TicketAdmin"].full_name


def register(server: Any, tickets: Any, admin: Any, health_servicer: Any,
             admin_server: Any = None) -> None:
    """Add the ticket servicer to ``server``, and the admin servicer, health and reflection
    to ``admin_server`` (when given: ``server`` then gets health and reflection of the ticket
    service only) or to ``server``. Works for grpc and grpc.aio servers alike. Never raises."""
    authority_pb2_grpc.add_TicketAuthorityServicer_to_server(tickets, server)
    if admin_server is None:
        _add_admin(server, admin, health_servicer, (TICKET_SERVICE, ADMIN_SERVICE))
        return
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (TICKET_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    _add_admin(admin_server, admin, health_servicer, (ADMIN_SERVICE,))


def _add_admin(server: Any, admin: Any, health_servicer: Any, names: tuple[str, ...]) -> None:
    admin_pb2_grpc.add_TicketAdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)


def add_port(add: Callable[[], int], setting: str, listen: str) -> int:
    """Call ``add`` (a server's add_*_port); returns the bound port.
    Raises: StartupError naming ``setting`` when it cannot listen on ``listen``."""
    try:
        bound = int(add())
    except RuntimeError:
        bound = 0
    if not bound:
        raise StartupError(f"{setting}: cannot listen on {listen}")
    return bound
