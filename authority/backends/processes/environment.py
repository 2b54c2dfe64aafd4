"""The environment the authority gives the processes it starts (device processes, the TPM
process, the embedded swtpm): a minimal one, never a copy of its own.

A copy would hand every child whatever the service was started with: a PIN or owner auth given
by ``pkcs11.pin_env`` / ``tpm.owner_auth_env`` (the loader also removes those from
``os.environ`` once read), tokens of the shell that launched it, and so on, all readable in
``/proc/<pid>/environ``. Every child gets only what a program needs to run and find its
libraries: ``PATH``, ``HOME``, the locale (``LANG``, ``LANGUAGE``, ``LC_*``), ``TZ``, ``TMPDIR``,
``LD_LIBRARY_PATH``. A device process (Python, opening a PKCS#11 module or a TPM TCTI) also gets
the interpreter's ``PYTHON*`` variables, a ``PYTHONPATH`` that puts this ``authority`` package
first (so it imports the same code as the service), and the variables that point device
libraries at their configuration -- none of them a secret: ``SOFTHSM2_CONF`` (SoftHSM2's token
directory when the settings name none), ``OPENSC_CONF``, ``P11_KIT_SERVER_ADDRESS`` (p11-kit's
remote client), ``ChrystokiConfigurationPath`` (Thales Luna), ``NFAST_HOME`` (Entrust nShield),
``YUBIHSM_PKCS11_CONF``, ``CS_PKCS11_R3_CFG`` (Utimaco), ``TSS2_LOG`` (tpm2-tss logging) and the
D-Bus addresses a ``tabrmd`` TCTI uses (``DBUS_SESSION_BUS_ADDRESS``, ``DBUS_SYSTEM_BUS_ADDRESS``,
``XDG_RUNTIME_DIR``). A module that needs another variable does not find it in a device process
(``server.device_processes = 0`` keeps the calls in the service's process).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import authority

__all__ = ["DEVICE_VARIABLES", "PROGRAM_VARIABLES", "child_environment"]

#: what any program needs (plus ``LC_*``)
PROGRAM_VARIABLES: Final = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
                                      "LD_LIBRARY_PATH"})
#: where device libraries find their configuration (plus ``PYTHON*``), for device processes
DEVICE_VARIABLES: Final = frozenset({
    "SOFTHSM2_CONF", "OPENSC_CONF", "P11_KIT_SERVER_ADDRESS", "ChrystokiConfigurationPath",
    "NFAST_HOME", "YUBIHSM_PKCS11_CONF", "CS_PKCS11_R3_CFG", "TSS2_LOG",
    "DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS", "XDG_RUNTIME_DIR"})
_PACKAGE_ROOT: Final = str(Path(authority.__file__).resolve().parent.parent)


def child_environment(*, device_process: bool = False) -> dict[str, str]:
    """The environment of a child process, taken from the current ``os.environ``; with
    ``device_process``, for a Python device process that imports this ``authority`` package
    and opens a device library. Never raises."""
    keep = PROGRAM_VARIABLES | DEVICE_VARIABLES if device_process else PROGRAM_VARIABLES
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("LC_")}
    if device_process:
        env.update((k, v) for k, v in os.environ.items() if k.startswith("PYTHON"))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return env
