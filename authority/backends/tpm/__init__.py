"""TPM 2.0 key backend (ticket format 2): the only package of the authority that imports tpm2-pytss.

Modules:

* ``backend``      -- :class:`TpmBackend` (the KeyBackend) and :func:`open_tpm_backend`;
* ``worker``       -- the one thread that owns the TPM connection, fed by a bounded queue;
* ``device``       -- :class:`Device`, the worker thread's facade over the TPM, built from
  ``connection`` (ESAPI calls, busy retries), ``probe`` (start-up properties), ``templates``
  (object templates, creation, attributes), ``parent`` (storage primary or persistent parent),
  ``keycache`` (LRU of loaded keys, saved contexts), ``sealing`` (encrypt-then-MAC) and
  ``recovery`` (rerunning after a TPM restart or lost connection);
* ``capabilities`` -- what the backend needs from a TPM and the start-up check;
* ``blobs``        -- the TPM-wrapped key blobs on disk;
* ``swtpm``        -- the embedded software TPM process;
* ``_errors``      -- the one translation of tpm2-pytss exceptions.

``open_tpm_backend(settings, tpm_dir)`` with ``settings.tcti`` None starts an embedded swtpm whose
state lives in ``tpm_dir/swtpm``; ``tcti="device:/dev/tpmrm0"`` uses the machine's TPM through the
kernel resource manager.
"""

from authority.backends.tpm.backend import TpmBackend, open_tpm_backend
from authority.backends.tpm.capabilities import (
    TpmCapabilities,
    check_capabilities,
    missing_capabilities,
)
from authority.backends.tpm.swtpm import SwtpmProcess

__all__ = [
    "SwtpmProcess",
    "TpmBackend",
    "TpmCapabilities",
    "check_capabilities",
    "missing_capabilities",
    "open_tpm_backend",
]
