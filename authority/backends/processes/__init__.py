"""Device processes: batches sealed and unsealed in child processes with their own sessions.

``pool.DeviceProcesses`` is the backend the server uses; ``child`` is what each process runs
(it imports nothing of the server side, so that it starts quickly).
"""
