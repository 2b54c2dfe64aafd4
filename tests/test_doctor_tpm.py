"""``ticket-authority doctor`` on the TPM backend, against a real swtpm with an owner
authorisation set and a state directory a real server ran on once (it made the first key):
the healthy setup passes every device check and leaves the TPM as it found it; a key made
under another template is named with the attribute it lacks; a wrong owner authorisation and
a stopped swtpm fail their checks with the fix, without a traceback and without printing
either authorisation. The embedded swtpm is never started by doctor, and beside a serve that
runs it doctor loads nothing into its few slots.

One swtpm for the module (the embedded test's server starts its own, as serve does)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.config import Secret, TpmSettings
from authority.doctor import diagnose
from authority.doctor.device import check_device
from authority.doctor.report import Check, Status, as_json, as_text, worst
from authority.settings_loader import load_config_for_checks
from tests.conftest import Harness, issue, make_config, redeem
from tests.tpm_fixtures import HAVE_PYTSS, HAVE_SWTPM, requires_tpm, template_without

pytestmark = requires_tpm

if HAVE_PYTSS and HAVE_SWTPM:
    from tpm2_pytss import ESAPI  # type: ignore[import-untyped, unused-ignore]
    from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
        ESYS_TR,
        TPM2_CAP,
        TPMA_OBJECT,
    )

    from authority.backends.tpm import SwtpmProcess
    from authority.backends.tpm.templates import aes_template, hmac_template, primary_template

OWNER_AUTH = "owner-auth-5b7e0c91"   # set on the module's swtpm: never in doctor's output
WRONG_AUTH = "wrong-auth-d24f6a13"
DEVICE = ("device.tpm", "device.capabilities", "device.parent", "device.keys",
          "device.key_attributes", "device.ring")
PLANTED = bytes.fromhex("bad0bad0bad0bad0")


@dataclass
class Site:
    """The module's swtpm (replaced when a test restarts it) and the state serve ran on."""

    directory: Path
    swtpm: SwtpmProcess
    state: Path

    @property
    def key_dir(self) -> Path:
        return self.state / "tpm" / "keys"

    def keys(self) -> list[str]:
        return sorted({p.name.split(".")[0] for p in self.key_dir.iterdir()})

    def config_file(self, tmp: Path, auth: str = OWNER_AUTH) -> Path:
        auth_file = tmp / "owner-auth"
        auth_file.write_text(auth + "\n")
        auth_file.chmod(0o600)
        path = tmp / "doctor.toml"
        path.write_text(f'state_dir = "{self.state}"\nbackend = "tpm"\n[tpm]\n'
                        f'tcti = "{self.swtpm.tcti}"\nowner_auth_file = "{auth_file}"\n')
        return path


def _esapi(tcti: str) -> Any:
    esapi = ESAPI(tcti)
    esapi.tr_set_auth(ESYS_TR.OWNER, OWNER_AUTH)
    return esapi


@pytest.fixture(scope="module", name="site")
def site_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A swtpm whose owner hierarchy has an authorisation, and a state directory a server
    ran on once with it (making the first key), stopped again."""
    directory = tmp_path_factory.mktemp("doctor-tpm")
    site = Site(directory, SwtpmProcess.start(directory / "swtpm"), directory / "state")
    try:
        esapi = ESAPI(site.swtpm.tcti)
        esapi.hierarchy_change_auth(ESYS_TR.OWNER, OWNER_AUTH)
        esapi.close()
        harness = Harness(site.state, "tpm")
        harness.start(replace(harness.config, tpm=TpmSettings(
            tcti=site.swtpm.tcti, owner_auth=Secret(OWNER_AUTH))))
        harness.stop()
        assert len(site.keys()) == 1
        yield site
    finally:
        site.swtpm.stop()


def _one(checks: list[Check], name: str) -> Check:
    found = [c for c in checks if c.name == name]
    assert len(found) == 1, [c.name for c in checks]
    return found[0]


def _transients(tcti: str) -> list[int]:
    """Transient objects loaded in the swtpm now (nobody else uses it between tests)."""
    esapi = ESAPI(tcti)
    try:
        _more, data = esapi.get_capability(TPM2_CAP.HANDLES, 0x80000000, 256)
        return [int(h) for h in data.data.handles]
    finally:
        esapi.close()


def _doctor(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return _doctor_run("--config", str(config), *flags)


def _doctor_run(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authority.cli", "doctor", *flags],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_healthy_state_dir_passes_every_tpm_check(site: Site, tmp_path: Path) -> None:
    blobs = {p.name: p.stat().st_mtime_ns for p in site.key_dir.iterdir()}
    run = _doctor(site.config_file(tmp_path), "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert {name: checks[name]["status"] for name in DEVICE if name in checks} == \
        dict.fromkeys(DEVICE, "ok"), report
    (key,) = site.keys()
    assert key in checks["device.keys"]["detail"]
    assert key in checks["device.key_attributes"]["detail"]
    assert "read back from the TPM" in checks["device.key_attributes"]["detail"]
    assert site.swtpm.tcti in checks["device.tpm"]["detail"]
    assert "owner authorisation is accepted" in checks["device.parent"]["detail"]
    assert checks["device.ring"]["detail"] == \
        "the TPM backend's key dir holds the key ring's 1 live key(s)"
    assert OWNER_AUTH not in run.stdout + run.stderr
    # read-only: every object doctor loaded is flushed, the key dir is untouched
    assert _transients(site.swtpm.tcti) == []
    assert {p.name: p.stat().st_mtime_ns for p in site.key_dir.iterdir()} == blobs


def _aes128(template: Any) -> None:
    template.publicArea.parameters.symDetail.sym.keyBits.aes = 128


def _plant(site: Site, change_aes: Callable[[Any], None] | None,
           change_hmac: Callable[[Any], None] | None, key_id: bytes = PLANTED) -> None:
    """A ticket key made here with tpm2-pytss under the backend's storage primary, its
    templates changed, its blobs written where serve keeps them."""
    esapi = _esapi(site.swtpm.tcti)
    try:
        primary, *_ = esapi.create_primary(None, primary_template(), ESYS_TR.OWNER)
        parts: dict[str, bytes] = {}
        for prefix, template, change in (("aes", aes_template(), change_aes),
                                         ("hmac", hmac_template(), change_hmac)):
            if change is not None:
                change(template)
            private, public, *_ = esapi.create(primary, None, template)
            parts |= {f"{prefix}.pub": public.marshal(), f"{prefix}.priv": private.marshal()}
        esapi.flush_context(primary)
    finally:
        esapi.close()
    for part, data in parts.items():
        (site.key_dir / f"{key_id.hex()}.{part}").write_bytes(data)


@pytest.mark.parametrize(("change_aes", "change_hmac", "named"), [
    # fixedParent clear: duplicable (under a fixedTPM parent the TPM wants fixedTPM to match)
    (template_without(TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.FIXEDTPM), None,
     ["aes.fixed_parent is false", "aes.fixed_tpm is false"]),
    (None, template_without(TPMA_OBJECT.NODA), ["hmac.no_da is false"]),
    (_aes128, None, ["aes.parameters differs"]),
], ids=["aes-without-fixed-parent", "hmac-without-noda", "aes-128"])
def test_a_key_made_under_another_template_is_named_with_what_differs(
        site: Site, tmp_path: Path, change_aes: Callable[[Any], None] | None,
        change_hmac: Callable[[Any], None] | None, named: list[str]) -> None:
    _plant(site, change_aes, change_hmac)
    try:
        checks = diagnose(load_config_for_checks(site.config_file(tmp_path)))
    finally:
        for planted in site.key_dir.glob(f"{PLANTED.hex()}.*"):
            planted.unlink()
    (good,) = site.keys()
    loads = _one(checks, "device.keys")     # the TPM would load it: serve refuses it first
    assert loads.status == Status.OK, loads
    assert loads.detail == (f"1 ticket key(s) load under the parent: {good}; not loaded: "
                            f"{PLANTED.hex()} (serve refuses them before loading: "
                            "device.key_attributes)")
    weak = _one(checks, "device.key_attributes")
    assert weak.status == Status.FAILURE, weak
    assert "1 of 2 ticket keys differ" in weak.detail and "serve refuses them" in weak.detail
    wrong = weak.detail.split(f"{PLANTED.hex()} (", 1)[1].split(")", 1)[0]
    assert sorted(wrong.split(", ")) == sorted(named)
    assert "keys retire" in weak.hint and "INVALID" in weak.hint
    assert worst(checks) == 2
    assert _transients(site.swtpm.tcti) == []


def test_a_ring_key_swapped_for_another_template_is_one_the_backend_cannot_use(
        site: Site, tmp_path: Path) -> None:
    (good,) = site.keys()
    saved = {p.name: p.read_bytes() for p in site.key_dir.iterdir()}
    _plant(site, template_without(TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.FIXEDTPM), None,
           bytes.fromhex(good))
    try:
        checks = diagnose(load_config_for_checks(site.config_file(tmp_path)))
    finally:
        for name, data in saved.items():
            (site.key_dir / name).write_bytes(data)
    ring = _one(checks, "device.ring")
    assert ring.status == Status.FAILURE, ring
    assert ring.detail == (f"the TPM backend cannot use 1 live key(s) of the key ring: {good} "
                           "(their blobs are not in the key dir, or the backend refuses them: "
                           "device.key_attributes)")
    assert "restore the key dir" in ring.hint and "MISSING" in ring.hint
    assert "token" not in ring.detail + ring.hint
    weak = _one(checks, "device.key_attributes")
    assert weak.status == Status.FAILURE and "aes.fixed_tpm is false" in weak.detail
    assert _one(checks, "device.keys").status == Status.OK   # nothing else to load


def test_a_tpm_state_dir_checked_without_its_config_is_named_a_tpm_state_dir(
        site: Site) -> None:
    checks = diagnose(load_config_for_checks(None, state_dir=site.state))
    wrong = _one(checks, "device.backend")
    assert wrong.status == Status.FAILURE, wrong
    assert wrong.detail.startswith(f"{site.state} is a TPM state dir: its store records "
                                   "backend tpm (key dir STATE_DIR/tpm/keys, the TPM at "), wrong
    assert "serve refuses to start on it with backend pkcs11" in wrong.detail
    assert "without --config" in wrong.detail
    assert 'backend = "tpm"' in wrong.hint
    assert not [c for c in checks if c.name in ("device.module", "device.token")]
    assert "SoftHSM2" not in as_text(checks)
    assert worst(checks) == 2


def test_a_damaged_blob_fails_its_load_naming_the_key(site: Site, tmp_path: Path) -> None:
    (good,) = site.keys()
    for part in ("aes.pub", "aes.priv", "hmac.pub", "hmac.priv"):
        data = bytearray((site.key_dir / f"{good}.{part}").read_bytes())
        if part == "aes.priv":
            data[-1] ^= 0x01     # the TPM's integrity check over the private part fails
        (site.key_dir / f"{PLANTED.hex()}.{part}").write_bytes(bytes(data))
    try:
        checks = diagnose(load_config_for_checks(site.config_file(tmp_path)))
    finally:
        for planted in site.key_dir.glob(f"{PLANTED.hex()}.*"):
            planted.unlink()
    loads = _one(checks, "device.keys")
    assert loads.status == Status.FAILURE, loads
    assert loads.detail.startswith(f"1 of 2 ticket keys do not load under the parent: "
                                   f"{PLANTED.hex()} (")
    assert "integrity check failed" in loads.detail and good not in loads.detail
    assert "restore the key dir" in loads.hint
    assert _one(checks, "device.key_attributes").status == Status.OK   # its public is intact
    assert _transients(site.swtpm.tcti) == []


def test_a_wrong_owner_auth_fails_the_parent_and_is_never_shown(site: Site,
                                                                tmp_path: Path) -> None:
    checks = diagnose(load_config_for_checks(site.config_file(tmp_path, WRONG_AUTH)))
    parent = _one(checks, "device.parent")
    assert parent.status == Status.FAILURE, parent
    assert parent.detail.startswith("tpm.owner_auth: the TPM at") and "refused" in parent.detail
    assert "owner_auth_file" in parent.hint
    assert _one(checks, "device.tpm").status == Status.OK
    assert _one(checks, "device.keys").status == Status.SKIP
    assert _one(checks, "device.key_attributes").status == Status.OK   # from the blobs
    for shown in (as_text(checks), as_json(checks)):
        assert WRONG_AUTH not in shown and OWNER_AUTH not in shown
    assert worst(checks) == 2


def test_the_embedded_swtpm_is_checked_beside_serve_and_never_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = make_config(state, "tpm")
    never = diagnose(replace(config, state_dir=tmp_path / "fresh"))
    first = _one(never, "device.tpm")
    assert first.status == Status.FAILURE and "never run" in first.detail
    assert "start 'ticket-authority serve' once" in first.hint
    assert not (tmp_path / "fresh").exists()

    harness = Harness(state, "tpm")
    harness.start(config)
    try:
        beside = diagnose(config)
        assert _one(beside, "device.tpm").status == Status.OK
        assert _one(beside, "device.capabilities").status == Status.OK
        for name in ("device.parent", "device.keys"):
            check = _one(beside, name)
            assert check.status == Status.SKIP, check
            assert "no resource manager" in check.detail
        attributes = _one(beside, "device.key_attributes")
        assert attributes.status == Status.OK and "read from their blobs" in attributes.detail
        assert worst([c for c in beside if c.name.startswith("device.")]) == 0
        stub = harness.tickets     # serve still seals and opens with its key
        assert redeem(stub, issue(stub).ticket).result == authority_pb2.REDEEM_RESULT_OK
    finally:
        harness.stop()

    swtpm_dir = state / "tpm" / "swtpm"
    stopped = diagnose(config)
    down = _one(stopped, "device.tpm")
    assert down.status == Status.SKIP and "is not running" in down.detail
    assert "while serve runs" in down.hint
    assert _one(stopped, "device.key_attributes").status == Status.OK
    assert not (swtpm_dir / "tpm.sock").exists() and not (swtpm_dir / "swtpm.pid").exists()


def test_without_tpm2_pytss_the_device_check_says_so(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "authority.doctor.tpm", None)
    result = check_device(make_config(tmp_path, "tpm"))
    (check,) = result.checks
    assert check.name == "device.tpm" and check.status == Status.FAILURE
    assert "ike-ticket-authority[tpm]" in check.hint and result.keys is None


def test_a_stopped_swtpm_fails_naming_its_tcti(site: Site, tmp_path: Path) -> None:
    config = site.config_file(tmp_path)
    tcti = site.swtpm.tcti
    site.swtpm.stop()
    try:
        run = _doctor(config)
    finally:
        site.swtpm = SwtpmProcess.start(site.directory / "swtpm")
    assert run.returncode == 2, run.stdout + run.stderr
    line = next(x for x in run.stdout.splitlines() if " device.tpm: " in x)
    assert line.startswith("[failure] device.tpm: tpm.tcti: cannot use the TPM at "
                           f"'{tcti}'"), line
    assert "cannot be reached" in line
    assert "check tpm.tcti" in run.stdout
    assert "[ skip  ] device.keys:" in run.stdout
    assert "[  ok   ] device.key_attributes:" in run.stdout
    assert "Traceback" not in run.stderr and OWNER_AUTH not in run.stdout + run.stderr


def test_doctor_takes_serves_backend_flag(tmp_path: Path) -> None:
    """`serve --backend tpm --state-dir D` (README) has no config file: doctor takes the same
    --backend, and a TPM state dir checked without it says to give it."""
    state = tmp_path / "state"
    harness = Harness(state, "tpm")
    harness.start(make_config(state, "tpm"))
    harness.stop()

    def doctor(*flags: str) -> tuple[int, dict[str, Any]]:
        run = _doctor_run("--state-dir", str(state), "--json", *flags)
        assert run.stdout, run.stderr
        return run.returncode, {c["name"]: c for c in json.loads(run.stdout)["checks"]}

    code, checks = doctor("--backend", "tpm")
    assert "device.backend" not in checks, checks
    assert checks["config"]["status"] == "ok"
    assert checks["device.tpm"]["status"] == "skip" and "is not running" in \
        checks["device.tpm"]["detail"]
    assert checks["device.key_attributes"]["status"] == "ok"
    assert code < 2, checks

    code, checks = doctor()
    assert code == 2
    assert checks["device.backend"]["status"] == "failure"
    assert "--backend tpm" in checks["device.backend"]["hint"]
    assert "device.tpm" not in checks
