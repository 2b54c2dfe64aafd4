"""A development PKI for mTLS (``ticket-authority certs init DIR``): one CA, the server's
certificate and one gateway and one admin client certificate with SPIFFE-style URI SANs.

For trying mTLS on one machine and for tests; production certificates come from the
operator's own CA (a SPIFFE issuer, an internal PKI).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
GATEWAY_NAME = "gw1"
ADMIN_NAME = "ops"


@dataclass(frozen=True)
class DevPki:
    """Where ``init_dev_pki`` wrote each file (certificates 0644, keys 0600)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    gateway_cert: Path
    gateway_key: Path
    admin_cert: Path
    admin_key: Path
    trust_domain: str
    server_name: str

    @property
    def gateway_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/gateway/{GATEWAY_NAME}"

    @property
    def admin_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/admin/{ADMIN_NAME}"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ike-ticket-authority dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue_certificate(subject: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      ca_key: ec.EllipticCurvePrivateKey, san: list[x509.GeneralName],
                      *, server: bool, validity: datetime.timedelta = VALIDITY
                      ) -> x509.Certificate:
    """A leaf certificate signed by the CA: ``server`` selects serverAuth or clientAuth.
    Never raises for valid keys."""
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    return (x509.CertificateBuilder().subject_name(_name(subject))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def make_ca(common_name: str = "ticket-authority dev CA",
            validity: datetime.timedelta = VALIDITY
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 CA. Never raises."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start (replaces an existing file).
    Raises OSError."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate (mode 0644), atomically. Raises OSError."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def server_san(server_name: str) -> list[x509.GeneralName]:
    """DNS localhost, IP 127.0.0.1 and ::1, and ``server_name`` (a DNS name or an IP)."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        extra: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        extra = x509.DNSName(server_name)
    if extra not in names:
        names.append(extra)
    return names


def init_dev_pki(directory: Path, trust_domain: str = "example.org",
                 server_name: str = "localhost", *, force: bool = False) -> DevPki:
    """Create the development PKI in ``directory`` (made 0700 if new).

    Raises FileExistsError if ``ca.pem`` is already there (unless ``force``), ValueError for an
    empty trust domain or server name, OSError if a file cannot be written.
    """
    if not trust_domain or "/" in trust_domain or ":" in trust_domain:
        raise ValueError(f"trust domain must be a bare name such as example.org, "
                         f"got {trust_domain!r}")
    if not server_name:
        raise ValueError("server name must not be empty")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = directory.resolve()   # absolute paths in the printed [tls] table
    pki = DevPki(directory, directory / "ca.pem", directory / "ca.key",
                 directory / "server.pem", directory / "server.key",
                 directory / "gateway.pem", directory / "gateway.key",
                 directory / "admin.pem", directory / "admin.key", trust_domain, server_name)
    if pki.ca_cert.exists() and not force:
        raise FileExistsError(f"{pki.ca_cert} exists; choose another directory")
    ca_cert, ca_key = make_ca()
    write_private(pki.ca_key, key_pem(ca_key))
    write_public(pki.ca_cert, cert_pem(ca_cert))
    leaves: list[tuple[Path, Path, str, list[x509.GeneralName], bool]] = [
        (pki.server_cert, pki.server_key, server_name, server_san(server_name), True),
              (pki.gateway_cert, pki.gateway_key, f"gateway {GATEWAY_NAME}",
               [x509.UniformResourceIdentifier(pki.gateway_uri)], False),
              (pki.admin_cert, pki.admin_key, f"admin {ADMIN_NAME}",
               [x509.UniformResourceIdentifier(pki.admin_uri)], False)]
    for cert_path, key_path, subject, san, server in leaves:
        key = _key()
        cert = issue_certificate(subject, key, ca_cert, ca_key, san, server=server)
        write_private(key_path, key_pem(key))
        write_public(cert_path, cert_pem(cert))
    return pki


def instructions(pki: DevPki) -> str:
    """What ``certs init`` prints: the ``[tls]`` table to paste and the client flags."""
    d = pki.directory
    flags = (f"--tls-ca {pki.ca_cert} --tls-cert {pki.admin_cert} --tls-key {pki.admin_key} "
             f"--tls-server-name {pki.server_name}")
    return (f"Development PKI in {d} (CA, server, gateway {pki.gateway_uri}, "
            f"admin {pki.admin_uri}); valid 1 year.\n"
            f"Paste into your config file (ticket-authority serve --config FILE):\n\n"
            f"[tls]\n"
            f'cert_file = "{pki.server_cert}"\n'
            f'key_file = "{pki.server_key}"\n'
            f'client_ca_file = "{pki.ca_cert}"\n'
            f'trust_domain = "{pki.trust_domain}"\n\n'
            f"Admin commands:\n"
            f"  ticket-authority status --listen 127.0.0.1:50051 {flags}\n"
            f"A gateway (authority.client):\n"
            f"  ClientTls(ca_file='{pki.ca_cert}', cert_file='{pki.gateway_cert}', "
            f"key_file='{pki.gateway_key}', server_name='{pki.server_name}')\n"
            f"  ticket-authority demo --authority 127.0.0.1:50051 --tls-ca {pki.ca_cert} "
            f"--tls-cert {pki.gateway_cert} --tls-key {pki.gateway_key} "
            f"--tls-server-name {pki.server_name}\n")
