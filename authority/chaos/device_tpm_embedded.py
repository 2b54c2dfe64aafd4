"""Scenario 2b of ``ticket-authority chaos``, ``device-tpm-embedded``: the server's own embedded
swtpm killed -9 under load; the server starts it again on its state. The code is
:func:`authority.chaos.device_tpm.run_embedded`, next to scenario 2."""

from authority.chaos.device_tpm import run_embedded as run

__all__ = ["run"]
