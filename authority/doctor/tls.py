"""The certificate checks: the server's chain and the client CA are valid now and not expiring
within 30 days, the server's key matches its certificate, and the trust domain is the one the
certificates and the role map speak of."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authority.config import TlsSettings
from authority.doctor.report import Check, failure, ok, skip, warning

#: a certificate expiring within this many days is a warning
EXPIRY_WARNING_DAYS: Final = 30
_RENEW = ("issue a new certificate and replace the file (the server re-reads it: no "
          "restart needed)")


def check_certificates(tls: TlsSettings | None, now: float) -> list[Check]:
    """Every certificate check of ``[tls]`` (one skipped check without it). Never raises."""
    if tls is None:
        return [skip("certificates", "no [tls]: plaintext gRPC on loopback, no roles")]
    checks = [_validity("certificates.server", tls.cert_file, now),
              _validity("certificates.client_ca", tls.client_ca_file, now),
              _key_matches(tls), _trust_domain(tls)]
    return checks


def _load(path: Path) -> list[x509.Certificate]:
    """The PEM certificates in ``path``. Raises: OSError; ValueError (none, or not PEM)."""
    found = x509.load_pem_x509_certificates(path.read_bytes())
    if not found:
        raise ValueError("no certificate")
    return found


def _validity(name: str, path: Path, now: float) -> Check:
    """Each certificate in the file valid now; the earliest expiry beyond 30 days."""
    try:
        chain = _load(path)
    except (OSError, ValueError) as exc:
        return failure(name, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                       "point the [tls] setting at a readable PEM file")
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    for cert in chain:
        subject = cert.subject.rfc4514_string()
        if cert.not_valid_before_utc > moment:
            return failure(name, f"{path}: {subject} is not valid before "
                                 f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                           "check this host's clock, or the certificate's dates")
        if cert.not_valid_after_utc <= moment:
            return failure(name, f"{path}: {subject} expired on "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", _RENEW)
    first = min(chain, key=lambda c: c.not_valid_after_utc)
    days = (first.not_valid_after_utc - moment).total_seconds() / 86400
    detail = (f"{path}: {len(chain)} certificate(s), valid; the first expires on "
              f"{first.not_valid_after_utc:%Y-%m-%d} ({days:.0f} days: "
              f"{first.subject.rfc4514_string()})")
    if days < EXPIRY_WARNING_DAYS:
        return warning(name, detail.replace("valid;", f"expiring within "
                                                     f"{EXPIRY_WARNING_DAYS} days;"), _RENEW)
    return ok(name, detail)


def _key_matches(tls: TlsSettings) -> Check:
    """The private key is the first certificate's."""
    name = "certificates.key"
    try:
        leaf = _load(tls.cert_file)[0]
        key = serialization.load_pem_private_key(tls.key_file.read_bytes(), password=None)
    except OSError as exc:
        return failure(name, f"cannot read {exc.filename}: {exc.strerror}",
                       "make tls.key_file readable by the user serve runs as (mode 0600)")
    except (ValueError, TypeError) as exc:
        return failure(name, f"{tls.key_file} or {tls.cert_file}: {exc}",
                       "tls.key_file must be an unencrypted PEM private key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        return failure(name, f"{tls.key_file} does not match the first certificate of "
                             f"{tls.cert_file}",
                       "install the key the certificate was issued for (or the certificate "
                       "issued for this key): serve refuses to start")
    return ok(name, f"{tls.key_file} matches the server certificate")


def _trust_domain(tls: TlsSettings) -> Check:
    """A bare name, which the role map's SPIFFE patterns and the client CA's URI name
    constraints (if any) are about."""
    name, domain = "certificates.trust_domain", tls.trust_domain
    hint = (f"make tls.trust_domain the SPIFFE trust domain of your clients' certificates "
            f"(spiffe://{domain}/gateway/NAME)")
    if not domain or "/" in domain or ":" in domain:
        return failure(name, f"{domain!r} is not a bare name such as example.org", hint)
    prefix = f"spiffe://{domain}/"
    foreign = [p for p, _role in tls.role_map
               if p.startswith("spiffe://")
               and not p.replace("{trust_domain}", domain).startswith(prefix)]
    if foreign:
        return warning(name, f"role_map patterns outside {domain}: {', '.join(foreign)}",
                       hint + "; or correct tls.role_map")
    try:
        cas = _load(tls.client_ca_file)
    except (OSError, ValueError):
        return skip(name, "the client CA file cannot be read (see certificates.client_ca)")
    for ca in cas:
        permitted = _permitted_uris(ca)
        if permitted is not None and not any(_covers(c, domain) for c in permitted):
            return failure(name, f"the client CA {ca.subject.rfc4514_string()} may only sign "
                                 f"URIs in {', '.join(permitted)}, not {domain}", hint)
    return ok(name, f"{domain}: the role map's patterns are in it")


def _permitted_uris(ca: x509.Certificate) -> list[str] | None:
    """The URI hosts a CA's name constraints permit (None: unconstrained)."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    uris = [str(g.value) for g in constraints.permitted_subtrees or []
            if isinstance(g, x509.UniformResourceIdentifier)]
    return uris or None


def _covers(constraint: str, domain: str) -> bool:
    """RFC 5280 4.2.1.10: a URI host constraint ``host`` or ``.suffix``."""
    if constraint.startswith("."):
        return domain.endswith(constraint)
    return domain == constraint
