"""Roles from the client certificate, and which role may call which method.

With ``[tls]`` and client certificates the TLS handshake already proved that the caller holds a
certificate signed by ``tls.client_ca_file`` (a caller without one, or with one from another
CA, never gets this far: its handshake fails and it sees UNAVAILABLE). ``authorize`` -- run by
both servers' guards before a call's request is read (authority/service/admission.py) --
reads the verified certificate's URI SAN from the call's auth context and maps it to a role
(``tls.role_map``; by default ``spiffe://<trust-domain>/gateway/*`` -> gateway and
``spiffe://<trust-domain>/admin/*`` -> admin):

- ``ticketauthority.v1.TicketAuthority``: gateway;
- ``ticketauthority.v1.TicketAdmin`` (GetStatus included) and server reflection: admin;
- ``grpc.health.v1.Health``: open to every caller that completed the handshake.

A certificate without exactly one URI SAN, or whose URI is outside the trust domain, is
UNAUTHENTICATED; an identity in the trust domain with no role, or with another role, is
PERMISSION_DENIED. On a plaintext loopback listener (no ``[tls]``) there is no role check:
local development keeps every method open.

``tls.realms`` further limits gateways to realms (``RealmLimits``): the ticket servicer refuses
an issue or redeem naming a realm the caller's certificate is not allowed with
PERMISSION_DENIED (per item in a batch). A caller matching no pattern, or without a
certificate URI (plaintext, TLS without client certificates), is unrestricted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from authority.config import ADMIN, GATEWAY, TlsSettings
from authority.errors import PermissionDenied

log = logging.getLogger(__name__)

TICKET_PREFIX = "/ticketauthority.v1.TicketAuthority/"
ADMIN_PREFIX = "/ticketauthority.v1.TicketAdmin/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/",
                       "/grpc.reflection.v1.ServerReflection/")
OPEN = "open"


def required_role(method: str) -> str | None:
    """The role a method needs, ``OPEN`` for health, None for a method no role may call.
    Never raises."""
    if method.startswith(TICKET_PREFIX):
        return GATEWAY
    if method.startswith(ADMIN_PREFIX) or method.startswith(REFLECTION_PREFIXES):
        return ADMIN
    if method.startswith(HEALTH_PREFIX):
        return OPEN
    return None


@dataclass(frozen=True)
class Identity:
    """A caller: the URI from its certificate and the role it maps to (None: no role)."""

    uri: str
    role: str | None


class Denied(Exception):
    """The caller may not make this call: ``code`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RoleMap:
    """URI patterns to roles, tried in order; ``*`` matches one path segment."""

    def __init__(self, trust_domain: str, role_map: Sequence[tuple[str, str]]) -> None:
        self.trust_domain = trust_domain
        self._prefix = f"spiffe://{trust_domain}/"
        self._rules = [(self._compile(pattern.replace("{trust_domain}", trust_domain)), role)
                       for pattern, role in role_map]

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        return re.compile("".join("[^/]+" if part == "*" else re.escape(part)
                                  for part in re.split(r"(\*)", pattern)))

    @classmethod
    def from_settings(cls, tls: TlsSettings) -> RoleMap:
        return cls(tls.trust_domain, tls.role_map)

    def identify(self, uris: Sequence[str]) -> Identity:
        """The identity of a verified certificate's URI SANs.

        Raises: Denied(UNAUTHENTICATED) without exactly one URI, or for a URI that no pattern
        maps and that lies outside the trust domain."""
        if len(uris) != 1:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         f"the client certificate must carry exactly one URI SAN "
                         f"(spiffe://{self.trust_domain}/...), found {len(uris)}")
        uri = uris[0]
        for rule, role in self._rules:
            if rule.fullmatch(uri):
                return Identity(uri, role)
        if not uri.startswith(self._prefix):
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         f"{uri} is not in trust domain {self.trust_domain}")
        return Identity(uri, None)


class RealmLimits:
    """Gateway URI patterns (as in ``RoleMap``) to the realms they may use; first match wins."""

    def __init__(self, trust_domain: str,
                 realms: Sequence[tuple[str, Sequence[str]]]) -> None:
        self._rules = [(RoleMap._compile(pattern.replace("{trust_domain}", trust_domain)),
                        frozenset(allowed)) for pattern, allowed in realms]

    @classmethod
    def from_settings(cls, tls: TlsSettings | None) -> RealmLimits | None:
        """None when nothing is limited (no ``[tls]``, no client certificates, no table)."""
        if tls is None or not tls.require_client_cert or not tls.realms:
            return None
        return cls(tls.trust_domain, tls.realms)

    def allowed(self, uri: str) -> frozenset[str] | None:
        """The realms ``uri`` may use, None for unrestricted. Never raises."""
        for rule, realms in self._rules:
            if rule.fullmatch(uri):
                return realms
        return None

    def checker(self, context: grpc.ServicerContext) -> RealmCheck:
        """The realm check of this call's caller. Never raises."""
        uris = peer_uris(context)
        if len(uris) != 1:
            return RealmCheck(uris[0] if uris else "", None)
        return RealmCheck(uris[0], self.allowed(uris[0]))


@dataclass(frozen=True)
class RealmCheck:
    """The realms one caller may use (``allowed`` None: any)."""

    uri: str
    allowed: frozenset[str] | None

    def refusal(self, realm: str, field: str | None = None) -> PermissionDenied | None:
        """The error for a realm this caller may not use (its message starts with ``field``
        when given, as batch item errors do), else None. Never raises."""
        if self.allowed is None or realm in self.allowed:
            return None
        prefix = f"{field}: " if field else ""
        return PermissionDenied(f"{prefix}realm {realm!r} not allowed for {self.uri}")

    def check(self, realm: str) -> None:
        """Raises: PermissionDenied naming the realm and the caller."""
        refused = self.refusal(realm)
        if refused is not None:
            raise refused


UNRESTRICTED = RealmCheck("", None)


def peer_uris(context: grpc.ServicerContext) -> list[str]:
    """The URI SANs of the caller's verified certificate (empty without TLS or a certificate).
    Never raises."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return []
    if "peer_uri" in auth:
        return [v.decode("utf-8", "replace") for v in auth["peer_uri"]]
    pem = auth.get("x509_pem_cert")
    if not pem:
        return []
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem[0])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def caller_identity(context: grpc.ServicerContext) -> str:
    """Who is calling, for the audit log: the verified certificate's URI SAN, or ``local`` for
    a caller without one (plaintext loopback, the admin socket). Never raises."""
    uris = peer_uris(context)
    return uris[0] if len(uris) == 1 else "local"


def authorize(roles: RoleMap, method: str, context: grpc.ServicerContext,
              uris: list[str] | None = None) -> Identity | None:
    """Check one call; returns the caller's identity (None for health). ``uris``: the
    caller's ``peer_uris`` when already read.

    Raises: Denied."""
    needed = required_role(method)
    if needed == OPEN:
        return None
    identity = roles.identify(peer_uris(context) if uris is None else uris)
    if needed is None or identity.role != needed:
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{identity.uri} (role {identity.role or 'none'}) may not call {method}")
    if needed == ADMIN:
        log.info("admin call %s by %s from %s", method, identity.uri, context.peer())
    return identity
