"""(d) The raw device rate: unseal_many in a direct backend loop, no gRPC, no sealer.

Runs in this process before the server starts, on the same state directory, with the device
the server will have: without device processes, from as many threads as the backend has
sessions; with them (``server.device_processes``), through the same number of device
processes, two threads per process so that each always has its next batch waiting.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pkcs11
from pkcs11.mechanisms import GCMParams

from authority.app import device_processes, open_backend, pkcs11_settings, prepare_state_dir
from authority.backends.base import BackendInfo, KeyBackend
from authority.backends.pkcs11 import Pkcs11Backend
from authority.bench.loops import Tally, describe_error
from authority.bench.procstat import cpu_seconds
from authority.bench.progress import Bar
from authority.bench.workload import ticket_plaintext
from authority.config import Config
from authority.ticket_format import encode_header

Items = Sequence[tuple[bytes, bytes, bytes]]
NONCE = 12   # AES-GCM nonce octets (as the backends' sealed items)


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



class OneSession:
    """The one-session device figure the unary ceiling uses: a direct python-pkcs11 AES-GCM
    decrypt loop (``key.decrypt`` of one sealed ticket plaintext, its header as AAD) on one
    session from one thread, in this process: no batching, no device processes, no sealer.

    Opened before the server starts and kept open while it runs, so that the loop runs in
    slices interleaved with the echo and unary rounds (authority/bench/phases.py): a noisy
    neighbour then hurts the ceiling and the calls alike. The key is an AES-256 token object
    like the server's (SoftHSM2 spends about twice the CPU on a token object's decrypt as on a
    session object's: ~22 against ~11 µs here), made before the server starts and destroyed by
    ``close``; its label is outside the ticket keys' (``ita-``), so the server never sees it
    as one of its keys. The backend, opened in process with one session, loads the module and
    logs in (token-wide) and is closed by ``close``.
    """

    def __init__(self, config: Config) -> None:
        """Raises: StartupError, DeviceUnavailable (the token); ValueError (not the PKCS#11
        backend); PKCS11Error (the session or key); RuntimeError (the first decrypt did not
        give the plaintext back)."""
        if config.backend != "pkcs11":
            raise ValueError("the one-session loop is python-pkcs11's (PKCS#11 backend only)")
        settings = replace(pkcs11_settings(config), sessions=1)
        prepare_state_dir(config.state_dir)
        self._backend = Pkcs11Backend.open(settings)
        self._session: Any = None
        self._key: Any = None
        try:
            lib = pkcs11.lib(os.path.realpath(settings.module))   # cached by path
            self._session = lib.get_token(token_label=settings.token_label).open(rw=True)
            self._key = self._session.generate_key(
                pkcs11.KeyType.AES, 256, store=True,
                label=f"bench-one-session-{secrets.token_hex(4)}",
                template={pkcs11.Attribute.SENSITIVE: True,
                          pkcs11.Attribute.EXTRACTABLE: False})
            self._decrypt = _decrypter(self._key)
        except BaseException:
            self.close()
            raise

    def run(self, seconds: float) -> Tally:
        """Decrypt in a loop for ``seconds``; ``client_cpu`` is this process's CPU.
        Raises: PKCS11Error."""
        tally = Tally()
        start, cpu = time.perf_counter(), time.process_time()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(50):
                self._decrypt()
            tally.record(50, 0)
        tally.seconds = time.perf_counter() - start
        tally.client_cpu = time.process_time() - cpu
        return tally

    def close(self) -> None:
        """Destroy the key, close the session and the backend. Never raises."""
        with contextlib.suppress(Exception):
            if self._key is not None:
                self._key.destroy()
        with contextlib.suppress(Exception):
            if self._session is not None:
                self._session.close()
        with contextlib.suppress(Exception):
            self._backend.close()


def _decrypter(key: Any) -> Callable[[], bytes]:
    """The loop's one operation, checked once. Raises: RuntimeError, PKCS11Error."""
    plaintext = ticket_plaintext(0)
    header = encode_header(secrets.token_bytes(8), 1)
    nonce = os.urandom(NONCE)
    body = key.encrypt(plaintext, mechanism=pkcs11.Mechanism.AES_GCM,
                       mechanism_param=GCMParams(nonce, header, 128))

    def decrypt() -> bytes:
        out: bytes = key.decrypt(body, mechanism=pkcs11.Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(nonce, header, 128))
        return out

    if decrypt() != plaintext:
        raise RuntimeError("the one-session decrypt did not give the sealed plaintext")
    return decrypt
