"""Throughput of the PKCS#11 backend against raw python-pkcs11, on a throw-away SoftHSM2 token.

    python tools/bench_pkcs11.py [--seconds N] [--threads T] [--sessions S[,S...]] [--batch B]
                                 [--size P] [--repeat R] [--only NAME,...]

Prints the machine (cores, CPU model, load), the versions, then for each row: ops/s (a
seal+unseal pair counts as one op; a batch of B counts as B), the median of R runs with the
lowest and highest, and the process CPU time per op (all threads, the device library's work
included: less sensitive to other load than ops/s). Rows: raw python-pkcs11 decrypt (1 and T
threads, a session each), raw encrypt+decrypt pairs, our unseal, unseal_many, seal, seal_many
and seal+unseal pairs, each in 1 and T threads. Several pool sizes (``--sessions 1,2,4,8,16``)
run the rows once for each. The machine is shared and noisy: believe no difference of less
than ~10% without repeating it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pkcs11
from pkcs11.mechanisms import GCMParams

from authority.backends.pkcs11 import Pkcs11Backend, key_label
from authority.backends.softhsm import provision_embedded_token
from authority.bench.machine import cpu_model
from authority.bench.machine import distribution_version as version
from authority.config import Pkcs11Settings

KID = bytes.fromhex("0102030405060708")
HEADER = b"\x01\x00\x00\x00" + KID  # a ticket header is the AAD
POOL = 512                         # distinct sealed items cycled through

#: one unit of work: returns how many ops it did
Work = Callable[[], int]


def rate(make_work: Callable[[int], Work], threads: int, seconds: float) -> tuple[float, float]:
    """Run ``threads`` threads, each its own ``make_work(index)``, for ``seconds``; return ops/s
    and the process CPU time per op in µs (all threads, the device library's work included)."""
    counts = [0] * threads
    errors: list[BaseException] = []
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    deadline = [0.0]

    def loop(index: int) -> None:
        try:
            work = make_work(index)
            work()  # warm up: sessions, key handles
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            raise
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return  # another worker failed to start
        go.wait()
        done = 0
        try:
            while time.perf_counter() < deadline[0]:
                done += work()
        except BaseException as exc:
            errors.append(exc)
        counts[index] = done

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()  # broken: a worker failed to start, reported below
    cpu = time.process_time()
    began = time.perf_counter()
    deadline[0] = began + seconds
    go.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    if errors:
        raise RuntimeError(f"benchmark worker failed: {errors[0]!r}") from errors[0]
    ops = sum(counts)
    return ops / elapsed, cpu / ops * 1e6 if ops else float("nan")


def cycle(items: list[Any]) -> Callable[[], Any]:
    """An endless round-robin over ``items`` (each thread gets its own position)."""
    position = [0]

    def next_item() -> Any:
        i = position[0]
        position[0] = (i + 1) % len(items)
        return items[i]

    return next_item


def batches(items: list[Any], size: int) -> list[list[Any]]:
    """Consecutive batches of ``size`` drawn cyclically from ``items``."""
    count = max(1, len(items) // size) if size <= len(items) else 1
    return [[items[(b * size + i) % len(items)] for i in range(size)] for b in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=8, help="for the threaded rows")
    parser.add_argument("--sessions", default="4", help="backend pool size(s), comma-separated")
    parser.add_argument("--batch", type=int, default=100, help="items per *_many call")
    parser.add_argument("--size", type=int, default=300, help="plaintext bytes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (median shown)")
    parser.add_argument("--only", default="", help="comma-separated row names to run")
    args = parser.parse_args(argv)

    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}, "
          f"load {os.getloadavg()[0]:.2f}")
    pools = [int(n) for n in args.sessions.split(",")]
    print(f"settings: {args.seconds:g} s x {args.repeat} per row, threads {args.threads}, "
          f"sessions {args.sessions}, batch {args.batch}, plaintext {args.size} B")
    with tempfile.TemporaryDirectory(prefix="bench-pkcs11-") as tmp:
        settings = provision_embedded_token(Path(tmp) / "hsm")
        for n, sessions in enumerate(pools):
            backend = Pkcs11Backend.open(replace(settings, sessions=sessions))
            try:
                if not n:
                    print(f"versions: Python {platform.python_version()}, python-pkcs11 "
                          f"{version('python-pkcs11')}, module {backend.describe().library}")
                    backend.create_key(KID)
                if len(pools) > 1:
                    print(f"sessions {sessions}:")
                run_rows(backend, settings, args)
            finally:
                backend.close()
    return 0


def run_rows(backend: Pkcs11Backend, settings: Pkcs11Settings, args: argparse.Namespace) -> None:
    plain = [os.urandom(args.size) for _ in range(POOL)]
    sealed = [backend.seal(KID, HEADER, p) for p in plain]
    unseal_items = [(KID, HEADER, s) for s in sealed]
    seal_items = [(KID, HEADER, p) for p in plain]
    lib = pkcs11.lib(os.path.realpath(settings.module))  # python-pkcs11 caches it by path
    token = lib.get_token(token_label=settings.token_label)
    raw_sessions: list[Any] = []
    lock = threading.Lock()

    def raw_decrypt(_: int) -> Work:
        session = token.open()  # logged in: the backend's login is token-wide
        with lock:
            raw_sessions.append(session)
        key = session.get_key(label=key_label(KID), object_class=pkcs11.ObjectClass.SECRET_KEY)
        take = cycle(sealed)

        def work() -> int:
            blob = take()
            key.decrypt(blob[12:], mechanism=pkcs11.Mechanism.AES_GCM,
                        mechanism_param=GCMParams(blob[:12], HEADER, 128))
            return 1

        return work

    def raw_pair(index: int) -> Work:
        session = token.open()
        with lock:
            raw_sessions.append(session)
        key = session.get_key(label=key_label(KID), object_class=pkcs11.ObjectClass.SECRET_KEY)
        take = cycle(plain)

        def work() -> int:
            nonce = os.urandom(12)
            body = key.encrypt(take(), mechanism=pkcs11.Mechanism.AES_GCM,
                               mechanism_param=GCMParams(nonce, HEADER, 128))
            key.decrypt(body, mechanism=pkcs11.Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, HEADER, 128))
            return 1

        return work

    def unseal(_: int) -> Work:
        take = cycle(unseal_items)

        def work() -> int:
            backend.unseal(*take())
            return 1

        return work

    def unseal_many(_: int) -> Work:
        take = cycle(batches(unseal_items, args.batch))

        def work() -> int:
            return len(backend.unseal_many(take()))

        return work

    def seal_many(_: int) -> Work:
        take = cycle(batches(seal_items, args.batch))

        def work() -> int:
            return len(backend.seal_many(take()))

        return work

    def seal(_: int) -> Work:
        take = cycle(plain)

        def work() -> int:
            backend.seal(KID, HEADER, take())
            return 1

        return work

    def pair(_: int) -> Work:
        take = cycle(plain)

        def work() -> int:
            backend.unseal(KID, HEADER, backend.seal(KID, HEADER, take()))
            return 1

        return work

    t = args.threads
    rows: list[tuple[str, str, Callable[[int], Work], int]] = [
        ("raw1", "raw python-pkcs11 decrypt, 1 thread", raw_decrypt, 1),
        ("rawT", f"raw python-pkcs11 decrypt, {t} threads (a session each)", raw_decrypt, t),
        ("rawpair", "raw python-pkcs11 encrypt+decrypt pairs, 1 thread", raw_pair, 1),
        ("unseal1", "unseal, 1 thread", unseal, 1),
        ("unsealT", f"unseal, {t} threads", unseal, t),
        ("many1", f"unseal_many (batch {args.batch}), 1 thread", unseal_many, 1),
        ("manyT", f"unseal_many (batch {args.batch}), {t} threads", unseal_many, t),
        ("seal1", "seal, 1 thread", seal, 1),
        ("sealT", f"seal, {t} threads", seal, t),
        ("sealmany1", f"seal_many (batch {args.batch}), 1 thread", seal_many, 1),
        ("sealmanyT", f"seal_many (batch {args.batch}), {t} threads", seal_many, t),
        ("pair1", "seal+unseal pairs, 1 thread", pair, 1),
        ("pairT", f"seal+unseal pairs, {t} threads", pair, t),
    ]
    only = {name for name in args.only.split(",") if name}
    unknown = only - {row[0] for row in rows}
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}")
    width = max(len(row[1]) for row in rows)
    for name, title, make, threads in rows:
        if only and name not in only:
            continue
        runs = [rate(make, threads, args.seconds) for _ in range(max(1, args.repeat))]
        ops = sorted(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        spread = f" ({ops[0]:,.0f}-{ops[-1]:,.0f})" if len(ops) > 1 else ""
        print(f"  {title:<{width}}  {statistics.median(ops):>7,.0f} ops/s{spread:<18} "
              f"{cpu:6.1f} µs CPU/op  [{name}]", flush=True)
    for session in raw_sessions:
        session.close()


if __name__ == "__main__":
    raise SystemExit(main())
