"""The gateway kit's responder: a minimal IKEv2 responder that authenticates initiators with a
pre-shared key, hands out tickets from the authority (RFC 5723) and resumes sessions with them.

It is small on purpose and honest about it: IKE SAs only (a Child SA asked for in IKE_AUTH is
answered N(NO_PROPOSAL_CHOSEN), a CREATE_CHILD_SA request N(NO_ADDITIONAL_SAS)), AES-GCM-16 with
HMAC-SHA2 PRFs and group 19, no NAT traversal, no cookies, no fragmentation, no rekeying, no
certificates. It is what the libreswan interoperability test runs
(tests/test_interop_libreswan.py) and a reference for a gateway vendor wiring an IKE daemon to
the authority; it is not a VPN gateway.

    from authority.gateway import GatewaySettings, Responder
    settings = GatewaySettings(local_id=id_body(ID_FQDN, b"gateway.example"), psk=psk)
    with Responder(settings, TicketClient(...), bound_udp_socket):
        ...
"""

from __future__ import annotations

from authority.gateway.engine import Engine
from authority.gateway.responder import Responder
from authority.gateway.settings import GatewaySettings

__all__ = ["Engine", "GatewaySettings", "Responder"]
