"""``ticket-authority doctor`` against real parts: a SoftHSM2 token, a PostgreSQL database, a
development PKI and a running ``serve`` on them. The healthy setup exits 0 (with the server
running: doctor neither takes the state directory's lock nor disturbs the token); each broken
thing fails its own check with its fix and the exit code scripts read."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, ObjectClass

from authority.backends.pkcs11._module import REGISTRY
from authority.backends.pkcs11._token import find_token
from authority.backends.softhsm import provision_embedded_token
from authority.bench.serveproc import listening_address
from authority.certs import DevPki, cert_pem, init_dev_pki, issue_certificate, server_san
from authority.clock import CLOCK_OFFSET_ENV
from authority.config import Pkcs11Settings
from authority.doctor import diagnose
from authority.doctor.report import Check, Status, worst
from authority.settings_loader import load_config_for_checks
from tests.pkcs11_fixtures import KID, requires_softhsm
from tests.postgres_fixtures import (  # noqa: F401
    PostgresServer,
    postgres_server_fixture,
)

pytestmark = requires_softhsm


@dataclass
class Site:
    """A healthy installation: its files, the TOML that names them, the running server."""

    directory: Path
    pki: DevPki
    token: Pkcs11Settings
    pin_file: Path
    dsn: str
    dsn_file: Path
    server: subprocess.Popen[bytes]

    def toml(self, *, pin_file: Path | None = None, token_label: str | None = None,
             dsn_file: Path | None = None, cert: Path | None = None,
             key: Path | None = None) -> str:
        tls_cert = cert or self.pki.server_cert
        tls_key = key or self.pki.server_key
        return (f'state_dir = "{self.directory / "state"}"\n'
                f'[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\nprocesses = 1\n'
                f'device_processes = 0\n'
                f'[pkcs11]\nmodule = "{self.token.module}"\n'
                f'token_label = "{token_label or self.token.token_label}"\n'
                f'pin_file = "{pin_file or self.pin_file}"\n'
                f'softhsm2_conf = "{self.token.softhsm2_conf}"\n'
                f'[postgresql]\ndsn_file = "{dsn_file or self.dsn_file}"\n'
                f'[tls]\ncert_file = "{tls_cert}"\nkey_file = "{tls_key}"\n'
                f'client_ca_file = "{self.pki.ca_cert}"\n'
                f'trust_domain = "{self.pki.trust_domain}"\n')

    def write(self, tmp: Path, **changes: Path | str) -> Path:
        path = tmp / "doctor.toml"
        path.write_text(self.toml(**changes))   # type: ignore[arg-type]
        return path


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module", name="site")
def site_fixture(tmp_path_factory: pytest.TempPathFactory,
                 postgres_server: PostgresServer) -> Iterator[Site]:
    """The healthy installation, its server serving and holding the maintenance lease."""
    directory = tmp_path_factory.mktemp("doctor")
    token = provision_embedded_token(directory / "hsm")
    name = postgres_server.create_database()
    dsn = postgres_server.dsn(name)
    site = Site(directory, init_dev_pki(directory / "pki"), token, directory / "hsm" / "user.pin",
                dsn, _private(directory / "dsn", dsn), None)  # type: ignore[arg-type]
    config = directory / "serve.toml"
    config.write_text(site.toml())
    log = directory / "serve.log"
    with log.open("wb") as out:
        site.server = subprocess.Popen(
            [sys.executable, "-m", "authority.cli", "serve", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        listening_address(site.server, directory / "state", 90, log.read_text)
        _wait_for_lease(site, config)
        yield site
    finally:
        site.server.terminate()
        site.server.wait(timeout=30)
        postgres_server.drop_database(name)


def _wait_for_lease(site: Site, config: Path) -> None:
    """Until the server's replica holds the maintenance lease (its first heartbeats)."""
    deadline = time.monotonic() + 30
    while True:
        checks = _diagnose(config)
        if _one(checks, "replicas").status == Status.OK:
            return
        assert time.monotonic() < deadline, _one(checks, "replicas")
        time.sleep(0.2)


def _diagnose(config: Path) -> list[Check]:
    return diagnose(load_config_for_checks(config), config)


def _one(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, [c.name for c in checks]
    return found[0]


def _broken(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks if c.status in (Status.WARNING, Status.FAILURE)}


def test_a_healthy_setup_exits_0_while_its_server_runs(site: Site, tmp_path: Path) -> None:
    config = site.write(tmp_path)
    run = subprocess.run([sys.executable, "-m", "authority.cli", "doctor", "--config",
                          str(config), "--json"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert report["exit"] == 0 and report["status"] == "ok"
    assert set(statuses.values()) == {"ok"}, statuses
    for name in ("device.module", "device.token", "device.mechanisms", "device.login",
                 "device.key_attributes", "device.ring", "store.reachable", "store.schema",
                 "store.disk", "clock", "replicas", "permissions.secrets",
                 "permissions.state_dir", "certificates.server", "certificates.client_ca",
                 "certificates.key", "certificates.trust_domain"):
        assert name in statuses
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert "1 live" in details["replicas"] and "database server's" in details["clock"]
    assert f"in use by process {site.server.pid}" in details["permissions.state_dir"]
    password = site.dsn.rsplit("password=", 1)[1]
    pin = site.pin_file.read_text().strip()
    assert password not in run.stdout + run.stderr and pin not in run.stdout + run.stderr
    assert site.server.poll() is None   # not disturbed: still serving, lock still its own
    text = subprocess.run([sys.executable, "-m", "authority.cli", "doctor", "--config",
                           str(config)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert text.returncode == 0 and "[  ok   ] device.login" in text.stdout
    assert text.stdout.rstrip().endswith("exit 0")


def test_a_wrong_pin_file_fails_the_login(site: Site, tmp_path: Path) -> None:
    wrong = _private(tmp_path / "wrong.pin", "not-the-pin\n")
    checks = _diagnose(site.write(tmp_path, pin_file=wrong))
    login = _one(checks, "device.login")
    assert login.status == Status.FAILURE and "pkcs11.pin" in login.detail
    assert "pin_file" in login.hint and "lockout" in login.hint
    assert "not-the-pin" not in login.detail
    assert worst(checks) == 2


def test_a_missing_token_fails_naming_those_present(site: Site, tmp_path: Path) -> None:
    checks = _diagnose(site.write(tmp_path, token_label="no-such-token"))
    token = _one(checks, "device.token")
    assert token.status == Status.FAILURE and "tokens present: 'ticket-authority'" in token.detail
    assert "token_label" in token.hint
    assert worst(checks) == 2


def test_an_unprovisioned_embedded_token_fails_and_nothing_is_created(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    run = subprocess.run([sys.executable, "-m", "authority.cli", "doctor", "--state-dir",
                          str(state)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "[failure] device.token: the embedded SoftHSM2 token is not provisioned" in run.stdout
    assert "start 'ticket-authority serve' once" in run.stdout
    assert not state.exists()   # read-only: no token, no state directory, no database


def test_a_key_with_weak_attributes_fails(tmp_path: Path) -> None:
    token = provision_embedded_token(tmp_path / "state" / "hsm")
    module = REGISTRY.acquire(token.module, token.softhsm2_conf)
    try:
        session = find_token(module, token.token_label).open(rw=True,
                                                               user_pin=token.pin.reveal())
        try:
            session.generate_key(KeyType.AES, 256, id=KID, label=f"ita-{KID.hex()}",
                                 store=True, template={Attribute.EXTRACTABLE: True,
                                                       Attribute.SENSITIVE: False,
                                                       Attribute.PRIVATE: True})
            assert session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        finally:
            session.close()
    finally:
        REGISTRY.release()
    config = tmp_path / "weak.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    checks = _diagnose(config)
    weak = _one(checks, "device.key_attributes")
    assert weak.status == Status.FAILURE, weak
    assert KID.hex() in weak.detail and "extractable is true" in weak.detail
    assert "sensitive is false" in weak.detail and "keys retire" in weak.hint
    assert worst(checks) == 2


def test_a_certificate_expiring_in_10_days_is_a_warning(site: Site, tmp_path: Path) -> None:
    ca_key = serialization.load_pem_private_key(site.pki.ca_key.read_bytes(), password=None)
    server_key = serialization.load_pem_private_key(site.pki.server_key.read_bytes(),
                                                    password=None)
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(site.pki.ca_cert.read_bytes())
    cert = issue_certificate("localhost", server_key, ca, ca_key,  # type: ignore[arg-type]
                             server_san("localhost"), server=True,
                             validity=datetime.timedelta(days=10))
    short = tmp_path / "short.pem"
    short.write_bytes(cert_pem(cert))
    checks = _diagnose(site.write(tmp_path, cert=short))
    assert set(_broken(checks)) == {"certificates.server"}, _broken(checks)
    server = _one(checks, "certificates.server")
    assert server.status == Status.WARNING and "expiring within 30 days" in server.detail
    assert "(10 days" in server.detail or "(9 days" in server.detail
    assert "new certificate" in server.hint
    assert worst(checks) == 1


def test_a_key_not_matching_the_certificate_fails(site: Site, tmp_path: Path) -> None:
    checks = _diagnose(site.write(tmp_path, key=site.pki.gateway_key))
    key = _one(checks, "certificates.key")
    assert key.status == Status.FAILURE and "does not match" in key.detail
    assert "serve refuses to start" in key.hint
    assert _one(checks, "device.login").status == Status.OK   # the other checks still ran
    assert worst(checks) == 2


def test_a_world_readable_pin_file_fails(site: Site, tmp_path: Path) -> None:
    pin = tmp_path / "open.pin"
    shutil.copyfile(site.pin_file, pin)
    pin.chmod(0o644)
    checks = _diagnose(site.write(tmp_path, pin_file=pin))
    secrets = _one(checks, "permissions.secrets")
    assert secrets.status == Status.FAILURE and f"{pin} (pkcs11.pin_file)" in secrets.detail
    assert "0644" in secrets.detail and "chmod 0600" in secrets.hint
    assert _one(checks, "device.login").status == Status.OK
    assert worst(checks) == 2
    pin.chmod(0o640)
    group = _one(_diagnose(site.write(tmp_path, pin_file=pin)), "permissions.secrets")
    assert group.status == Status.WARNING


def test_an_unreachable_database_fails_without_its_password(site: Site,
                                                            tmp_path: Path) -> None:
    nowhere = tmp_path / "no-socket-here"
    nowhere.mkdir()
    dsn = site.dsn.replace(site.dsn.split()[0], f"host={nowhere}")
    checks = _diagnose(site.write(tmp_path, dsn_file=_private(tmp_path / "dsn", dsn)))
    store = _one(checks, "store.reachable")
    assert store.status == Status.FAILURE and str(nowhere) in store.detail
    assert "postgresql.dsn" in store.hint
    assert site.dsn.rsplit("password=", 1)[1] not in store.detail
    assert _one(checks, "replicas").status == Status.SKIP
    assert worst(checks) == 2


def test_a_clock_away_from_the_databases_fails(site: Site, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    offset = tmp_path / "offset"
    offset.write_text("10")
    monkeypatch.setenv(CLOCK_OFFSET_ENV, str(offset))
    checks = _diagnose(site.write(tmp_path))
    clock = _one(checks, "clock")
    skew = float(re.search(r"clock is ([-+][0-9.]+) s", clock.detail).group(1))  # type: ignore[union-attr]
    assert clock.status == Status.FAILURE and skew == pytest.approx(10, abs=0.5)
    assert "lease_duration" in clock.detail and "chrony" in clock.hint
    offset.write_text("2")
    assert _one(_diagnose(site.write(tmp_path)), "clock").status == Status.WARNING
