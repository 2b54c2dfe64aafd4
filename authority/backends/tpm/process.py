"""The TPM backend in a device process of its own (``server.device_processes = 1``).

The process opens :class:`TpmBackend` on the TPM this process reaches and answers every backend
call (authority/backends/processes/remote.py says why: the TPM worker no longer waits for the
server's GIL after each TPM command). An embedded swtpm stays this process's: it outlives a
device process that dies, so the successor reconnects to the same TPM state (start-up flushes
the objects the dead one left loaded), and it is shut down (TPM2_Shutdown) and stopped after the
device process has closed its connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from authority.backends.processes.child import tpm_hello_for
from authority.backends.processes.remote import RemoteBackend
from authority.backends.tpm.backend import START_TIMEOUT, TpmBackend, prepare_tpm_dir
from authority.backends.tpm.swtpm import SwtpmProcess
from authority.config import TpmSettings

__all__ = ["PIPELINE", "open_tpm_process"]

PIPELINE: Final = 32  # requests in flight to the TPM process; it runs as many at once, so its
                      # worker can group the queued jobs by key (worker.py)


def open_tpm_process(settings: TpmSettings, tpm_dir: Path, log_level: str,
                     log_format: str = "text") -> RemoteBackend:
    """The TPM backend of ``open_tpm_backend``, run in a device process (logging at
    ``log_level`` in ``log_format``).

    Raises: StartupError naming the setting at fault (as ``open_tpm_backend``), or
    server.device_processes when the process cannot be started.
    """
    tpm_dir = prepare_tpm_dir(settings, tpm_dir)
    swtpm: SwtpmProcess | None = None
    tcti = settings.tcti
    if tcti is None:
        swtpm = SwtpmProcess.start(tpm_dir / "swtpm", supervised=True)
        tcti = swtpm.tcti
    note = "" if swtpm is None else f"; embedded swtpm, state {swtpm.state_dir}"
    backend = RemoteBackend(
        tpm_hello_for(settings, tcti, tpm_dir, log_level, PIPELINE, log_format),
        name="tpm", format_version=TpmBackend.format_version, pipeline=PIPELINE,
        max_waiting=settings.queue_size, call_timeout=settings.call_timeout + 5.0,
        start_timeout=START_TIMEOUT, note=note, on_close=None if swtpm is None else swtpm.stop)
    return backend.start()  # on failure it has closed itself, and so stopped the swtpm
