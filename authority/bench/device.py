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
from typing import Any

import pkcs11
from pkcs11.mechanisms import GCMParams

from authority.app import device_processes, open_backend, pkcs11_settings, prepare_state_dir
from authority.backends.base import BackendInfo, KeyBackend
from authority.backends.pkcs11 import Pkcs11Backend, key_label
from authority.bench.loops import Tally, describe_error
from authority.bench.procstat import cpu_seconds
from authority.bench.progress import Bar
from authority.bench.workload import ticket_plaintext
from authority.config import Config, Pkcs11Settings
from authority.ticket_format import encode_header

Items = Sequence[tuple[bytes, bytes, bytes]]
NONCE = 12   # a sealed item is nonce | ciphertext | tag


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


def one_session_rate(config: Config, seconds: float, bar: Bar) -> Tally:
    """(d) The one-session figure the unary ceiling uses: a direct python-pkcs11 AES-GCM
    decrypt loop (``key.decrypt`` of one sealed ticket, its header as AAD) on one session from
    one thread, in this process, no batching, no device processes, for ``seconds``. A
    throw-away key (the backend opened in process with one session makes and destroys it);
    the first decrypt must give the plaintext back. ``client_cpu``: this process's CPU.

    Raises: StartupError, DeviceUnavailable (opening the token, making the key); ValueError
    (not the PKCS#11 backend); python-pkcs11 errors from the loop (the first decrypt's
    mismatch as RuntimeError)."""
    if config.backend != "pkcs11":
        raise ValueError("the one-session loop is python-pkcs11's (PKCS#11 backend only)")
    settings = replace(pkcs11_settings(config), sessions=1)
    prepare_state_dir(config.state_dir)
    backend = Pkcs11Backend.open(settings)
    try:
        key_id = secrets.token_bytes(8)
        backend.create_key(key_id)
        try:
            header = encode_header(key_id, backend.format_version)
            plaintext = ticket_plaintext(0)
            sealed = backend.seal(key_id, header, plaintext)
            return _decrypt_loop(settings, key_id, (header, sealed, plaintext), seconds, bar)
        finally:
            backend.destroy_key(key_id)
    finally:
        backend.close()


def _decrypt_loop(settings: Pkcs11Settings, key_id: bytes, item: tuple[bytes, bytes, bytes],
                  seconds: float, bar: Bar) -> Tally:
    """``key.decrypt`` of one sealed item in a loop on a session of its own (logged in: the
    backend's login is token-wide). Raises: RuntimeError (wrong plaintext), PKCS11Error."""
    header, sealed, plaintext = item
    lib = pkcs11.lib(os.path.realpath(settings.module))   # python-pkcs11 caches it by path
    session = lib.get_token(token_label=settings.token_label).open()
    try:
        key: Any = session.get_key(label=key_label(key_id),
                                   object_class=pkcs11.ObjectClass.SECRET_KEY)
        nonce, body = sealed[:NONCE], sealed[NONCE:]

        def decrypt() -> bytes:
            out: bytes = key.decrypt(body, mechanism=pkcs11.Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(nonce, header, 128))
            return out

        if decrypt() != plaintext:
            raise RuntimeError("the one-session decrypt did not give the sealed plaintext")
        tally = Tally()
        start, cpu = time.perf_counter(), time.process_time()
        deadline = start + seconds
        while (now := time.perf_counter()) < deadline:
            for _ in range(50):
                decrypt()
            tally.record(50, 0)
            bar.update(now - start, f"{tally.ok:,} decrypts")
        tally.seconds = time.perf_counter() - start
        tally.client_cpu = time.process_time() - cpu
        return tally
    finally:
        session.close()
