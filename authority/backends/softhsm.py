"""The embedded default token: a SoftHSM2 token in a private state directory.

``provision_embedded_token`` creates (once) the directory, its ``softhsm2.conf``, random user and
SO PINs in 0600 files, and the token itself; every later call reuses them. PINs never appear on a
command line: the token is initialised in-process (C_InitToken / C_InitPIN through
authority.backends.pkcs11). softhsm2-util cannot be used for that without a terminal: it reads
PINs from the tty only and fails with "Could not get SO PIN" when they come on stdin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Final

from authority.backends.pkcs11 import initialize_token_if_missing
from authority.config import Pkcs11Settings, Secret
from authority.errors import StartupError

__all__ = ["DEFAULT_LABEL", "find_softhsm_module", "provision_embedded_token"]

log = logging.getLogger(__name__)

DEFAULT_LABEL: Final = "ticket-authority"
CONF_NAME: Final = "softhsm2.conf"
USER_PIN_NAME: Final = "user.pin"
SO_PIN_NAME: Final = "so.pin"
_TEMPLATE: Final = "softhsm2.conf.template"
_MODULE_NAME: Final = "libsofthsm2.so"


def find_softhsm_module() -> Path:
    """Return the path of the installed SoftHSM2 PKCS#11 module.

    Raises: StartupError naming pkcs11.module (with an install hint) if none is found.
    """
    candidates = _module_candidates()
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p.parent) for p in candidates)
    raise StartupError(
        f"pkcs11.module: SoftHSM2 module {_MODULE_NAME} not found (looked in {looked}); "
        "install it with: apt-get install softhsm2"
    )


def _module_candidates() -> list[Path]:
    """Usual locations of libsofthsm2.so, Debian's first."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = ["/usr/lib/softhsm"]
    if multiarch:
        dirs.append(f"/usr/lib/{multiarch}/softhsm")
    dirs += [
        "/usr/lib/x86_64-linux-gnu/softhsm",
        "/usr/lib/aarch64-linux-gnu/softhsm",
        "/usr/lib64/softhsm",
        "/usr/lib64/pkcs11",
        "/usr/lib/pkcs11",
        "/usr/local/lib/softhsm",
        "/opt/homebrew/lib/softhsm",
    ]
    unique = list(dict.fromkeys(dirs))
    return [Path(d) / _MODULE_NAME for d in unique]


def provision_embedded_token(hsm_dir: Path, label: str = DEFAULT_LABEL) -> Pkcs11Settings:
    """Create or reuse the embedded SoftHSM2 token under ``hsm_dir``; return settings to open it.

    Layout: ``hsm_dir`` (0700) holding ``softhsm2.conf``, ``tokens/`` (0700), ``user.pin`` and
    ``so.pin`` (0600, random). The token labelled ``label`` is initialised only if missing.
    Raises: StartupError (module missing, directory or PIN files unusable, token refused).
    """
    module = find_softhsm_module()
    hsm_dir = hsm_dir.absolute()
    tokens = hsm_dir / "tokens"
    try:
        _private_dir(hsm_dir)
        _private_dir(tokens)
        conf = _write_conf(hsm_dir / CONF_NAME, tokens)
        so_pin = _pin_file(hsm_dir / SO_PIN_NAME)
        user_pin = _pin_file(hsm_dir / USER_PIN_NAME)
    except OSError as exc:
        raise StartupError(
            f"state_dir: cannot prepare the embedded token directory {hsm_dir}: {exc}"
        ) from exc
    if initialize_token_if_missing(module, conf, label, so_pin, user_pin):
        log.info("provisioned embedded SoftHSM2 token %r in %s", label, hsm_dir)
    return Pkcs11Settings(module=module, token_label=label, pin=user_pin, softhsm2_conf=conf,
                          so_pin=so_pin)


def _private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing and make it 0700. Raises: OSError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


def _conf_template() -> str:
    """The softhsm2.conf template: the installed package resource, else the repo's hsm-config/.

    Raises: StartupError if neither can be read.
    """
    try:
        return resources.files("authority._hsm_config").joinpath(_TEMPLATE).read_text("utf-8")
    except (ModuleNotFoundError, OSError, TypeError):
        pass  # not installed: read it from the source tree
    fallback = Path(__file__).resolve().parents[2] / "hsm-config" / _TEMPLATE
    try:
        return fallback.read_text("utf-8")
    except OSError as exc:
        raise StartupError(f"state_dir: SoftHSM2 config template {_TEMPLATE} not found") from exc


def _write_conf(path: Path, tokendir: Path) -> Path:
    """Render the template into ``path`` unless it already has that content. Raises: OSError."""
    text = _conf_template().format(tokendir=tokendir)
    if path.is_file() and path.read_text("utf-8") == text:
        return path
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _write_private(tmp, text)
    os.replace(tmp, path)
    return path


def _pin_file(path: Path) -> Secret:
    """Read the PIN in ``path``, creating it (0600, random) if missing.

    Raises: OSError; StartupError if the file is empty.
    """
    try:
        _write_private(path, secrets.token_urlsafe(24) + "\n")
    except FileExistsError:
        _tighten(path)
    pin = path.read_text("utf-8").strip()
    if not pin:
        raise StartupError(f"pkcs11.pin: PIN file {path} is empty")
    return Secret(pin)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` exclusively with mode 0600 and write ``text``.

    Raises: FileExistsError if it exists; OSError.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _tighten(path: Path) -> None:
    """Make an existing PIN file 0600 if it is readable by others. Raises: OSError."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("PIN file %s had mode %o; setting 0600", path, mode)
        os.chmod(path, 0o600)
