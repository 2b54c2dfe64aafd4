"""Device processes: batches sealed and unsealed in child processes with their own sessions."""

from authority.backends.processes.pool import DeviceProcesses

__all__ = ["DeviceProcesses"]
