"""The environment the authority gives the processes it starts (device processes, the TPM
process, the embedded swtpm): a minimal one, never a copy of its own.

A copy would hand every child whatever the service was started with: a PIN or owner auth given
by ``pkcs11.pin_env`` / ``tpm.owner_auth_env`` (the loader also removes those from
``os.environ`` once read), tokens of the shell that launched it, and so on, all readable in
``/proc/<pid>/environ``. A child gets only what it needs to run and find its libraries and
configuration: ``PATH``, ``HOME``, the locale (``LANG``, ``LANGUAGE``, ``LC_*``), ``TZ``,
``TMPDIR``, ``LD_LIBRARY_PATH``, ``SOFTHSM2_CONF`` (SoftHSM2's token directory when the settings
do not name one) and ``TSS2_LOG`` (tpm2-tss logging); a Python child also gets the interpreter's
``PYTHON*`` variables and a ``PYTHONPATH`` that puts this ``authority`` package first, so it
imports the same code as the service.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import authority

__all__ = ["child_environment"]

_KEEP: Final = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
                          "SOFTHSM2_CONF", "TSS2_LOG"})
_PACKAGE_ROOT: Final = str(Path(authority.__file__).resolve().parent.parent)


def child_environment(*, python: bool = False) -> dict[str, str]:
    """The environment of a child process, from the current ``os.environ``; with ``python``,
    for a Python child that imports this ``authority`` package. Never raises."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP or k.startswith("LC_")}
    if python:
        env.update((k, v) for k, v in os.environ.items() if k.startswith("PYTHON"))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return env
