"""``ticket-authority certs init``: the development PKI, and the ``[tls]`` settings it feeds."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from authority.certs import init_dev_pki, issue_certificate, key_pem, make_ca, write_private
from authority.cli import main
from authority.config import TlsSettings
from authority.errors import ConfigError
from authority.settings_loader import load_config, validate_tls


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def test_certs_init_writes_private_keys_0600_and_certificates_that_chain(tmp_path: Path
                                                                         ) -> None:
    pki = init_dev_pki(tmp_path / "pki", trust_domain="corp.test", server_name="authority.test")
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    for key in (pki.ca_key, pki.server_key, pki.gateway_key, pki.admin_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (pki.ca_cert, pki.server_cert, pki.gateway_cert, pki.admin_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    ca = _load(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    store = Store([ca])
    server_verifier = PolicyBuilder().store(store).build_server_verifier(
        x509.DNSName("authority.test"))
    server_verifier.verify(_load(pki.server_cert), [])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(
        _load(pki.server_cert), [])
    client_verifier = PolicyBuilder().store(store).build_client_verifier()
    gateway = client_verifier.verify(_load(pki.gateway_cert), [])
    admin = client_verifier.verify(_load(pki.admin_cert), [])
    assert list(gateway.subjects or []) == [
        x509.UniformResourceIdentifier("spiffe://corp.test/gateway/gw1")]
    assert _uris(_load(pki.admin_cert)) == ["spiffe://corp.test/admin/ops"]
    assert admin.chain[-1] == ca
    # the server key belongs to the server certificate (validate_tls compares them)
    validate_tls(TlsSettings(pki.server_cert, pki.server_key, pki.ca_cert, "corp.test"))


def test_certs_init_refuses_an_existing_pki(tmp_path: Path) -> None:
    init_dev_pki(tmp_path)
    with pytest.raises(FileExistsError):
        init_dev_pki(tmp_path)
    assert main(["certs", "init", str(tmp_path)]) == 2


def test_cli_prints_a_tls_table_that_loads(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", str(tmp_path / "pki"), "--trust-domain", "corp.test"]) == 0
    out = capsys.readouterr().out
    assert "--tls-cert" in out and "spiffe://corp.test/admin/ops" in out
    table = out[out.index("[tls]"):out.index("\n\n", out.index("[tls]"))]
    toml = tmp_path / "authority.toml"
    toml.write_text(f'[server]\nlisten = "0.0.0.0:50051"\n{table}\n')
    config = load_config(toml, state_dir=tmp_path / "state")
    assert config.tls is not None
    assert config.tls.trust_domain == "corp.test"
    assert config.tls.cert_file == tmp_path / "pki" / "server.pem"
    assert config.server.listen == "0.0.0.0:50051"   # beyond loopback: allowed with [tls]


def test_listening_beyond_loopback_needs_tls_with_client_certs(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('[server]\nlisten = "0.0.0.0:50051"\n')
    with pytest.raises(ConfigError, match=r"^server\.listen: .*configure \[tls\]"):
        load_config(toml, state_dir=tmp_path)
    pki = init_dev_pki(tmp_path / "pki")
    toml.write_text('[server]\nlisten = "0.0.0.0:50051"\n[tls]\ncert_file = "pki/server.pem"\n'
                    'key_file = "pki/server.key"\nclient_ca_file = "pki/ca.pem"\n'
                    'trust_domain = "example.org"\nrequire_client_cert = false\n')
    with pytest.raises(ConfigError, match=r"^server\.listen:"):
        load_config(toml, state_dir=tmp_path)
    # relative paths are relative to the config file; loopback without client certs is fine
    config = load_config(toml, state_dir=tmp_path, listen="127.0.0.1:0")
    assert config.tls is not None and config.tls.key_file == pki.server_key


@pytest.mark.parametrize(("change", "setting"), [
    ('cert_file = "pki/missing.pem"', "tls.cert_file"),
    ('key_file = "pki/gateway.key"', "tls.key_file"),          # not the certificate's key
    ('client_ca_file = "pki/ca.key"', "tls.client_ca_file"),   # not a certificate
    ('trust_domain = ""', "tls.trust_domain"),
    ('trust_domain = "spiffe://x"', "tls.trust_domain"),
    ("require_client_cert = 1", "tls.require_client_cert"),
    ("colour = 1", "tls.colour"),
    ('role_map = { "spiffe://{trust_domain}/x/*" = "root" }', "tls.role_map"),
])
def test_wrong_tls_settings_name_the_setting(tmp_path: Path, change: str, setting: str) -> None:
    init_dev_pki(tmp_path / "pki")
    values = {"cert_file": '"pki/server.pem"', "key_file": '"pki/server.key"',
              "client_ca_file": '"pki/ca.pem"', "trust_domain": '"example.org"'}
    key, _, value = change.partition(" = ")
    values[key] = value
    body = "\n".join(f"{k} = {v}" for k, v in values.items())
    toml = tmp_path / "a.toml"
    toml.write_text(f"[tls]\n{body}\n")
    with pytest.raises(ConfigError, match=rf"^{setting.replace('.', '[.]')}"):
        load_config(toml, state_dir=tmp_path)


def test_role_map_is_configurable(tmp_path: Path) -> None:
    init_dev_pki(tmp_path / "pki")
    toml = tmp_path / "a.toml"
    toml.write_text('[tls]\ncert_file = "pki/server.pem"\nkey_file = "pki/server.key"\n'
                    'client_ca_file = "pki/ca.pem"\ntrust_domain = "example.org"\n'
                    '[tls.role_map]\n"spiffe://{trust_domain}/ops/*" = "admin"\n')
    config = load_config(toml, state_dir=tmp_path)
    assert config.tls is not None
    assert config.tls.role_map == (("spiffe://{trust_domain}/ops/*", "admin"),)


def test_issue_certificate_and_write_private_helpers(tmp_path: Path) -> None:
    ca, ca_key = make_ca("other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_certificate("x", key, ca, ca_key,
                             [x509.UniformResourceIdentifier("spiffe://a/gateway/b")],
                             server=False)
    assert _uris(cert) == ["spiffe://a/gateway/b"]
    path = tmp_path / "k.pem"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, key_pem(key))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
