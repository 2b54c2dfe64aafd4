"""The file permission checks: secrets (PIN files, the DSN file, the TLS key, a config file
holding an inline PIN or DSN) readable by their owner only, the state directory and the
embedded token's directory closed to others."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from authority.config import Config
from authority.doctor.report import Check, failure, ok, warning
from authority.statedir import LOCK_NAME

#: ``[table] key`` of the settings that name a file holding a secret
_SECRET_FILES = (("pkcs11", "pin_file"), ("pkcs11", "so_pin_file"),
                 ("postgresql", "dsn_file"), ("tpm", "owner_auth_file"))


def secret_files(config: Config, config_file: Path | None) -> list[tuple[str, Path]]:
    """(what, path) of every file holding a secret this configuration reads. Relative PIN
    and DSN file paths are relative to the working directory, as the settings loader reads
    them. Never raises."""
    data = _toml(config_file)
    found: list[tuple[str, Path]] = []
    for table, key in _SECRET_FILES:
        value = data.get(table, {}).get(key) if isinstance(data.get(table), dict) else None
        if isinstance(value, str) and value:
            found.append((f"{table}.{key}", Path(value).expanduser()))
    if config.embedded_token:
        hsm = config.state_dir / "hsm"
        found += [("the embedded token's user PIN", hsm / "user.pin"),
                  ("the embedded token's SO PIN", hsm / "so.pin")]
    if config.tls is not None:
        found.append(("tls.key_file", config.tls.key_file))
    if config_file is not None and _inline_secret(data):
        found.append(("the config file (it holds an inline PIN or DSN)", config_file))
    return found


def _toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _inline_secret(data: dict[str, Any]) -> bool:
    pkcs11, postgresql = data.get("pkcs11"), data.get("postgresql")
    return ((isinstance(pkcs11, dict) and "pin" in pkcs11)
            or (isinstance(postgresql, dict) and "dsn" in postgresql))


def check_secrets(config: Config, config_file: Path | None) -> Check:
    """Each secret file: none readable or writable by others (a failure), nor by the group
    (a warning)."""
    name = "permissions.secrets"
    fail, warn, seen = [], [], 0
    for what, path in secret_files(config, config_file):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue   # not there: the device or store check says so
        seen += 1
        if mode & 0o007:
            fail.append(f"{path} ({what}) has mode {mode:04o}: others may read it")
        elif mode & 0o070:
            warn.append(f"{path} ({what}) has mode {mode:04o}: its group may read it")
    hint = "chmod 0600 each of them (owned by the user serve runs as)"
    if fail:
        return failure(name, "; ".join(fail + warn), hint)
    if warn:
        return warning(name, "; ".join(warn), hint)
    return ok(name, f"{seen} secret file(s), none readable by group or others")


def check_state_dir(config: Config) -> Check:
    """The state directory: a writable directory; it and the embedded token's directories
    closed to group and others (serve makes them 0700). Reports the process that holds its
    lock, without taking it."""
    name, state = "permissions.state_dir", config.state_dir
    if not state.exists():
        return warning(name, f"{state} does not exist yet",
                       "serve creates it (mode 0700) at its first start")
    if not state.is_dir() or not os.access(state, os.W_OK | os.X_OK):
        return failure(name, f"{state} is not a directory this user can write",
                       "chown it to the user serve runs as, mode 0700")
    problems = []
    for path in (state, state / "hsm", state / "hsm" / "tokens"):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & 0o077:
            problems.append(f"{path} has mode {mode:04o}")
    holder = _lock_holder(state)
    if problems:
        return failure(name, "; ".join(problems) + " (open to group or others)",
                       "chmod 0700 each of them")
    return ok(name, f"{state}: mode 0700{holder}")


def lock_holder(state_dir: Path) -> int | None:
    """The process holding the state directory's lock (a running serve, or its supervisor),
    read from /proc/locks: the lock itself is not tried (taking it, even for a moment, could
    refuse a server starting then), and the pid serve writes in the lock file is not trusted
    (it stays there after the lock is released). Matched by inode only (an overlay file system
    reports another device), so a match may be another file's lock: then doctor only does
    less. 0 if the holder's pid is not shown; None if the lock is not held. Never raises."""
    try:
        inode = (state_dir / LOCK_NAME).stat().st_ino
        lines = Path("/proc/locks").read_text("ascii", "replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()   # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2204017 0 EOF"
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == \
                str(inode):
            return int(fields[4]) if fields[4].isdigit() else 0
    return None


def _lock_holder(state: Path) -> str:
    """``, in use by process N`` while the state directory's lock is held (:func:`lock_holder`),
    else nothing."""
    pid = lock_holder(state)
    if pid is None:
        return ""
    return f", in use by process {pid}" if pid else ", in use (its lock is held)"
