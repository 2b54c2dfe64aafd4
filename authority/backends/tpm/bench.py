"""Raw rates of the TPM backend: ``python -m authority.backends.tpm.bench [--tcti T] [-n N]``.

Without ``--tcti`` it starts an embedded swtpm in a temporary directory. Prints operations per
second for seal, unseal, unseal_many/seal_many of 100, unseal alternating between two keys (a key
switch per call), and 8 threads through the worker, with the device counters (key switches).
No assertions; the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from authority.backends.tpm.backend import TpmBackend, open_tpm_backend
from authority.config import TpmSettings

K1, K2 = b"\x01" * 8, b"\x02" * 8
AAD = bytes(12)


def _rate(count: int, fn: Callable[[], object], per_call: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count * per_call / (time.perf_counter() - start)


def _threads(backend: TpmBackend, n: int, seconds: float,
             tickets: list[tuple[bytes, bytes]]) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * n

    def run(i: int) -> None:
        key_id, sealed = tickets[i % len(tickets)]
        while time.monotonic() < stop:
            backend.unseal(key_id, AAD, sealed)
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tcti", help="TPM to measure (default: an embedded swtpm)")
    parser.add_argument("-n", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--size", type=int, default=300, help="plaintext octets")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each threaded run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = TpmSettings(tcti=args.tcti, key_dir=Path(tmp) / "keys")
        backend = open_tpm_backend(settings, Path(tmp) / "tpm")
        try:
            _measure(backend, args.n, os.urandom(args.size), args.seconds)
        finally:
            backend.close()


def _measure(backend: TpmBackend, n: int, plaintext: bytes, seconds: float) -> None:
    print(backend.describe())
    for key_id in (K1, K2):
        if key_id in backend.list_keys():
            backend.destroy_key(key_id)
        backend.create_key(key_id)
    s1, s2 = backend.seal(K1, AAD, plaintext), backend.seal(K2, AAD, plaintext)
    batch = max(1, n // 100)
    rows = [
        ("seal", _rate(n, lambda: backend.seal(K1, AAD, plaintext))),
        ("unseal", _rate(n, lambda: backend.unseal(K1, AAD, s1))),
        ("seal_many(100), items", _rate(batch, lambda: backend.seal_many(
            [(K1, AAD, plaintext)] * 100), 100)),
        ("unseal_many(100), items", _rate(batch, lambda: backend.unseal_many(
            [(K1, AAD, s1)] * 100), 100)),
        ("unseal_many(100) two keys interleaved, items", _rate(batch, lambda: backend.unseal_many(
            [(K1, AAD, s1), (K2, AAD, s2)] * 50), 100)),
        ("unseal alternating two keys (a switch per call)", _rate(n // 2, lambda: (
            backend.unseal(K1, AAD, s1), backend.unseal(K2, AAD, s2)), 2)),
    ]
    for name, value in rows:
        print(f"{name:52s} {value:8.0f} /s")
    before = backend.counters()
    one = _threads(backend, 8, seconds, [(K1, s1)])
    two = _threads(backend, 8, seconds, [(K1, s1), (K2, s2)])
    after = backend.counters()
    print(f"{'8 threads unseal, one key':52s} {one:8.0f} /s")
    print(f"{'8 threads unseal, two keys (4 + 4 threads)':52s} {two:8.0f} /s")
    print("counters during the threaded runs:",
          {k: after[k] - before[k] for k in after})


if __name__ == "__main__":
    main()
