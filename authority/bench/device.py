"""(d) The raw device rate: unseal_many in a direct backend loop, no gRPC, no sealer.

Runs in this process before the server starts, on the same state directory, with the device
the server will have: without device processes, from as many threads as the backend has
sessions; with them (``server.device_processes``), through the same number of device
processes, two threads per process so that each always has its next batch waiting.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from authority.app import device_processes, open_backend, prepare_state_dir
from authority.backends.base import BackendInfo, KeyBackend
from authority.bench.loops import Tally, describe_error
from authority.bench.procstat import cpu_seconds
from authority.bench.progress import Bar
from authority.bench.workload import ticket_plaintext
from authority.config import Config
from authority.ticket_format import encode_header

Items = Sequence[tuple[bytes, bytes, bytes]]


@dataclass
class DeviceRun:
    """The raw rate and the backend it was measured on."""

    tally: Tally
    info: BackendInfo
    threads: int
    processes: int = 0


def raw_device_rate(config: Config, batch_size: int, seconds: float, bar: Bar) -> DeviceRun:
    """Open the backend, make a throw-away key, seal ``batch_size`` ticket plaintexts, then
    loop ``unseal_many`` over them from one thread per device session for ``seconds``.
    The key is destroyed and the backend closed afterwards.

    Raises: StartupError, DeviceUnavailable (opening the device or making the key).
    """
    prepare_state_dir(config.state_dir)
    # Many threads: each device call releases the GIL (as offloaded calls do), so the
    # threads' device work overlaps; this is the device's best rate from Python. Device
    # processes are driven synchronously here (the thread-pool server's way).
    processes = device_processes(config)
    direct = replace(config.server, mode="threads", device_calls="offload",
                     device_processes=processes)
    backend = open_backend(replace(config, server=direct))
    try:
        info = backend.describe()
        key_id = secrets.token_bytes(8)
        backend.create_key(key_id)
        try:
            header = encode_header(key_id, backend.format_version)
            items = [(key_id, header, backend.seal(key_id, header, ticket_plaintext(n)))
                     for n in range(batch_size)]
            threads = 2 * processes if processes else max(1, info.sessions)
            tally = _loop(backend, items, threads, seconds, bar)
        finally:
            backend.destroy_key(key_id)
    finally:
        backend.close()
    return DeviceRun(tally, info, threads, processes)


def _loop(backend: KeyBackend, items: Items, threads: int, seconds: float, bar: Bar) -> Tally:
    """``threads`` threads calling ``unseal_many(items)`` until the deadline (after one warm-up
    call each, which opens sessions and caches key handles)."""
    tally = Tally()
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    deadline = [0.0]

    def work() -> None:
        try:
            backend.unseal_many(items)
        except Exception as exc:
            with lock:
                tally.error(exc, len(items))
        ready.wait()
        go.wait()
        while time.perf_counter() < deadline[0]:
            try:
                results = backend.unseal_many(items)
            except Exception as exc:
                with lock:
                    tally.error(exc, len(items))
                return
            good = sum(1 for r in results if isinstance(r, bytes))
            with lock:
                tally.record(good, len(results) - good)
                if good < len(results) and not tally.first_error:
                    tally.first_error = describe_error(next(
                        r for r in results if not isinstance(r, bytes)))

    workers = [threading.Thread(target=work, name=f"raw-{n}") for n in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    start, cpu = time.perf_counter(), cpu_seconds(os.getpid()) or 0.0
    deadline[0] = start + seconds
    go.set()
    while any(w.is_alive() for w in workers):
        bar.update(time.perf_counter() - start, f"{tally.ok:,} tickets")
        time.sleep(0.05)
    tally.seconds = time.perf_counter() - start
    # this process (and its device processes, if any) is the device's user here
    tally.client_cpu = (cpu_seconds(os.getpid()) or 0.0) - cpu
    return tally
