"""What the bench ran on: cores, CPU model, Python and library versions, device versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

_DISTRIBUTIONS = ("grpcio", "protobuf", "cryptography", "python-pkcs11", "tpm2-pytss", "psycopg",
                  "psycopg-pool")
_DEBIAN_PACKAGES = ("softhsm2", "swtpm", "postgresql")


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo ("model name"), else the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def distribution_version(name: str) -> str:
    """The installed version of a Python distribution, or "-" when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def debian_version(package: str) -> str:
    """The installed Debian package version (dpkg-query), or "-"."""
    if shutil.which("dpkg-query") is None:
        return "-"
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "-"


def describe_machine() -> dict[str, object]:
    """Cores, CPU model, kernel, Python and the versions of everything measured."""
    versions = {name: distribution_version(name) for name in _DISTRIBUTIONS}
    versions.update({name: debian_version(name) for name in _DEBIAN_PACKAGES})
    return {"cores": os.cpu_count() or 0, "cpu_model": cpu_model(),
            "kernel": platform.release(), "python": platform.python_version(),
            "versions": versions, "load_before": load_average(), "load_after": None}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on a shared machine skews results)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_lines(machine: dict[str, object], backend: dict[str, object]) -> list[str]:
    """Human-readable lines: the machine, then the backend under test."""
    versions = machine.get("versions")
    pairs = versions.items() if isinstance(versions, dict) else []
    listed = ", ".join(f"{k} {v}" for k, v in pairs)
    load = machine.get("load_before")
    after = machine.get("load_after")
    loads = f"; load {load}" + (f" -> {after}" if after else "") if load else ""
    return [f"machine  {machine['cores']} cores, {machine['cpu_model']}, "
            f"Linux {machine['kernel']}, Python {machine['python']}{loads}",
            f"versions {listed}",
            f"backend  {backend.get('backend', '?')}: {backend.get('library', '?')}; "
            f"token {backend.get('token', '?')}; {backend.get('sessions', '?')} sessions; "
            f"{backend.get('device_processes', 0)} device processes"]
