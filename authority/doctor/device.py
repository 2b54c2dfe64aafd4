"""The device checks: the PKCS#11 module loads, the token is there with the mechanisms the
service needs, the PIN logs in, and every ticket key in it has the protection the service
requires. Each step is the service's own (authority/backends/pkcs11), run read-only: doctor
never provisions the embedded token, creates a key or changes one. The TPM backend's checks
are in authority/doctor/tpm.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.pkcs11._filelock import token_files_locked
from authority.backends.pkcs11._keys import ATTRIBUTES
from authority.backends.pkcs11._module import REGISTRY
from authority.backends.pkcs11._template import _IMPLIED, required
from authority.backends.pkcs11._token import check_mechanisms, check_pin_flags, find_token
from authority.config import Config, Pkcs11Settings, Secret
from authority.doctor.report import Check, failure, ok
from authority.errors import AuthorityError, StartupError

#: attributes a wrappable ticket key (cluster.per_node_tokens) may have otherwise: it is made
#: extractable under a trusted key, and its copies are unwrapped (not always sensitive)
_WRAPPABLE_MAY_DIFFER = frozenset({"extractable", "never_extractable", "always_sensitive"})
_LOGIN_HINT = ("put the token's user PIN in pkcs11.pin_file (or pin_env); each refused login "
               "counts towards the token's PIN lockout, so fix it before starting serve")


@dataclass
class DeviceResult:
    """The device checks and what they found: the ids of the ticket keys the token holds
    (None when it could not be read)."""

    checks: list[Check] = field(default_factory=list)
    keys: set[bytes] | None = None
    identity: str | None = None


def check_device(config: Config) -> DeviceResult:
    """Run the device checks for ``config``'s backend. Never raises for a device problem:
    each is a failed check."""
    if config.backend == "tpm":
        return _check_tpm(config)
    result = DeviceResult()
    settings = _settings(config, result.checks)
    if settings is not None:
        _check_token(config, replace(settings, sessions=1,
                                     per_node_keys=config.cluster.per_node_tokens), result)
    return result


def _check_tpm(config: Config) -> DeviceResult:
    """The TPM half (authority/doctor/tpm.py), which needs tpm2-pytss: its absence is one
    failed check."""
    try:
        from authority.doctor.tpm import check_tpm
    except ImportError as exc:
        return DeviceResult([failure(
            "device.tpm", f"backend tpm, but its library cannot be loaded: {exc}",
            "pip install 'ike-ticket-authority[tpm]' (tpm2-pytss, over the tpm2-tss "
            "libraries: apt-get install libtss2-dev), as serve needs it too")])
    return check_tpm(config)


def _settings(config: Config, checks: list[Check]) -> Pkcs11Settings | None:
    """The configured token, or the embedded one as ``serve`` provisioned it (None, with a
    failed check, when it was not: doctor does not provision it)."""
    if config.pkcs11 is not None:
        return config.pkcs11
    from authority.backends.softhsm import (
        CONF_NAME,
        DEFAULT_LABEL,
        USER_PIN_NAME,
        find_softhsm_module,
    )

    hsm = config.state_dir / "hsm"
    conf, pin_file = hsm / CONF_NAME, hsm / USER_PIN_NAME
    try:
        module = find_softhsm_module()
    except StartupError as exc:
        checks.append(failure("device.module", str(exc), "apt-get install softhsm2, or "
                                                         "configure [pkcs11] for your HSM"))
        return None
    if not conf.is_file() or not pin_file.is_file():
        checks.append(failure(
            "device.token", f"the embedded SoftHSM2 token is not provisioned in {hsm}",
            "start 'ticket-authority serve' once with this state_dir: it provisions the token "
            "(doctor only reads, it never creates one); or configure [pkcs11]"))
        return None
    try:
        pin = pin_file.read_text("utf-8").strip()
    except OSError as exc:
        checks.append(failure("device.login", f"cannot read {pin_file}: {exc.strerror}",
                              "run doctor as the user serve runs as"))
        return None
    return Pkcs11Settings(module=module, token_label=DEFAULT_LABEL, pin=Secret(pin),
                          softhsm2_conf=conf)


@contextmanager
def _module(settings: Pkcs11Settings) -> Iterator[Any]:
    """The module loaded and initialised as ``serve`` does it (under the token files' lock),
    released afterwards. Raises: StartupError; DeviceUnavailable (the lock)."""
    conf = settings.softhsm2_conf
    with token_files_locked(str(conf) if conf else os.environ.get("SOFTHSM2_CONF")):
        module = REGISTRY.acquire(settings.module, settings.softhsm2_conf)
    try:
        yield module
    finally:
        REGISTRY.release()


def _check_token(config: Config, settings: Pkcs11Settings, result: DeviceResult) -> None:
    """Module, token, mechanisms and PIN flags, then a login and the keys."""
    checks, label = result.checks, settings.token_label
    step = "device.module"
    hints = {
        "device.module": "set pkcs11.module to the vendor's PKCS#11 library (SoftHSM2: "
                         "apt-get install softhsm2)",
        "device.token": "check pkcs11.token_label (and pkcs11.softhsm2_conf); list the tokens "
                        "with 'pkcs11-tool --module MODULE -L'",
        "device.mechanisms": "the token must offer CKM_AES_KEY_GEN and CKM_AES_GCM: use a "
                             "token (or firmware) that does",
        "device.login": "set or unlock the user PIN with the token's tools (the security "
                        "officer's C_InitPIN)"}
    try:
        with _module(settings) as module:
            lib = module.lib
            major, minor = lib.library_version
            checks.append(ok(step, f"{settings.module} ({lib.manufacturer_id} "
                                   f"{lib.library_description} {major}.{minor})"))
            step = "device.token"
            token = find_token(module, label)
            checks.append(ok(step, f"token {label!r} present"))
            step = "device.mechanisms"
            check_mechanisms(token, label)
            checks.append(ok(step, "CKM_AES_KEY_GEN and CKM_AES_GCM offered"))
            step = "device.login"
            check_pin_flags(token, label)
    except (StartupError, AuthorityError) as exc:
        checks.append(failure(step, str(exc), hints[step]))
        return
    _login_and_keys(config, settings, result)


def _login_and_keys(config: Config, settings: Pkcs11Settings, result: DeviceResult) -> None:
    """Log in as ``serve`` does (one session: another process may keep the token open) and
    read every ticket key's protection attributes back."""
    try:
        backend = Pkcs11Backend.open(settings)
    except (StartupError, AuthorityError) as exc:
        result.checks.append(failure("device.login", str(exc), _LOGIN_HINT))
        return
    try:
        result.identity = backend.identity()
        result.checks.append(ok("device.login", f"logged in to {backend.identity()}"))
        result.keys = backend.list_keys()          # those serve uses
        result.checks.append(_key_attributes(config, backend, backend.labelled_keys()))
    except AuthorityError as exc:
        result.checks.append(failure("device.keys", str(exc), "see the device's own logs"))
    finally:
        backend.close()


def expected_attributes(key_id: bytes, wrappable: bool) -> dict[str, bool]:
    """What the service requires each protection attribute of a ticket key to be, by the
    names ``key_attributes`` reports (from the key template itself, _template.py)."""
    wanted = {**required(key_id), **_IMPLIED}
    found = {name: bool(wanted[attr]) for name, attr in ATTRIBUTES.items() if attr in wanted}
    if wrappable:
        for name in _WRAPPABLE_MAY_DIFFER:
            found.pop(name, None)
    return found


def _key_attributes(config: Config, backend: Pkcs11Backend, keys: set[bytes]) -> Check:
    """Each ticket key's attributes read back against the template. Raises: AuthorityError."""
    if not keys:
        return ok("device.key_attributes", "no ticket key in the token yet (serve makes the "
                                           "first at its start)")
    wrappable = config.cluster.per_node_tokens
    weak: list[str] = []
    for key_id in sorted(keys):
        reported = backend.key_attributes(key_id)
        wrong = [f"{name} is {str(reported.get(name)).lower()}"
                 for name, want in expected_attributes(key_id, wrappable).items()
                 if reported.get(name) != want]
        if wrong:
            weak.append(f"{key_id.hex()} ({', '.join(wrong)})")
    if weak:
        return failure("device.key_attributes",
                       f"{len(weak)} of {len(keys)} ticket keys lack the required protection: "
                       + "; ".join(weak),
                       "a key the authority did not make (or a token that ignores the "
                       "template): serve does not use it (its tickets are INVALID); retire it "
                       "('ticket-authority keys retire ID') or destroy it with the token's "
                       "tools, and rotate ('keys rotate')")
    return ok("device.key_attributes", f"{len(keys)} ticket key(s): sensitive, never "
                                       "extractable, not modifiable, encrypt/decrypt only")


def token_path(config: Config) -> Path:
    """The embedded token's directory (for the permission checks)."""
    return config.state_dir / "hsm"
