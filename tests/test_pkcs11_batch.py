"""seal_many / unseal_many of Pkcs11Backend against real SoftHSM2 (no mocks).

Every test provisions its own token in tmp_path (see test_pkcs11_backend.py for why the backend
must be closed at the end of each test).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from authority.backends.pkcs11 import Pkcs11Backend
from authority.config import Pkcs11Settings
from authority.errors import (
    DeviceUnavailable,
    InvalidTicket,
    KeyNotFound,
    UnsealFailed,
)
from tests.pkcs11_fixtures import (  # noqa: F401
    KID,
    OTHER,
    churn_key,
    hsm_fixture,
    requires_softhsm,
)

ABSENT = bytes.fromhex("2122232425262728")

pytestmark = requires_softhsm


@pytest.fixture
def keyed(hsm: Pkcs11Settings) -> Iterator[Pkcs11Backend]:
    """An open backend (3 sessions) with keys KID and OTHER."""
    b = Pkcs11Backend.open(replace(hsm, sessions=3, session_timeout=5.0))
    b.create_key(KID)
    b.create_key(OTHER)
    yield b
    b.close()


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _count_takes(backend: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the session borrows of ``backend`` (a spy on its pool)."""
    pool: Any = backend._pool
    take = pool.take
    calls: list[int] = []

    def counting_take(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return take(*args, **kwargs)

    monkeypatch.setattr(pool, "take", counting_take)
    return calls


# ------------------------------------------------------------------------------ round trips


def test_seal_many_then_unseal_many_in_order(
    keyed: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = [b"", b"x", os.urandom(300), b"ticket " * 50, os.urandom(20_000), os.urandom(17)]
    items = [(KID if i % 2 else OTHER, f"hdr{i}".encode(), p) for i, p in enumerate(plain)]
    takes = _count_takes(keyed, monkeypatch)
    sealed = keyed.seal_many(items)
    assert len(takes) == 1  # one session for the whole batch
    assert [len(s) for s in sealed] == [12 + len(p) + 16 for p in plain]
    assert len({s[:12] for s in sealed}) == len(sealed)  # fresh nonces
    opened = keyed.unseal_many([(k, a, s) for (k, a, _), s in zip(items, sealed, strict=True)])
    assert len(takes) == 2
    assert opened == plain
    for (key_id, aad, p), s in zip(items, sealed, strict=True):  # the single calls agree
        assert keyed.unseal(key_id, aad, s) == p


def test_empty_batches(keyed: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    takes = _count_takes(keyed, monkeypatch)
    assert keyed.seal_many([]) == []
    assert keyed.unseal_many([]) == []
    assert takes == []  # no device session for nothing


def test_batch_accepts_any_sequence(keyed: Pkcs11Backend) -> None:
    sealed = keyed.seal_many(((KID, b"a", b"one"), (KID, b"b", b"two")))
    assert keyed.unseal_many(((KID, b"a", sealed[0]), (KID, b"b", sealed[1]))) == [
        b"one", b"two",
    ]


# ----------------------------------------------------------------------- per-item failures


def test_mixed_good_and_bad_items(keyed: Pkcs11Backend) -> None:
    good = keyed.seal(KID, b"aad", b"good")
    other = keyed.seal(OTHER, b"aad", b"other")
    items = [
        (KID, b"aad", good),                    # 0 ok
        (KID, b"aad", _flip(good, 100)),        # 1 tampered ciphertext
        (KID, b"aad", _flip(good, 3)),          # 2 tampered nonce
        (KID, b"aad", good[:-1]),               # 3 truncated tag
        (KID, b"aad", good[:27]),               # 4 shorter than nonce + tag
        (KID, b"", good),                       # 5 wrong aad
        (OTHER, b"aad", good),                  # 6 wrong key
        (ABSENT, b"aad", good),                 # 7 no such key
        (b"short", b"aad", good),               # 8 malformed key id
        (OTHER, b"aad", other),                 # 9 ok, other key
        (KID, b"aad", b""),                     # 10 empty
        (KID, b"aad", good),                    # 11 ok again: the session survived it all
    ]
    results = keyed.unseal_many(items)
    assert len(results) == len(items)
    assert results[0] == b"good" and results[9] == b"other" and results[11] == b"good"
    for i in (1, 2, 3, 4, 5, 6, 10):
        assert type(results[i]) is UnsealFailed, (i, results[i])
    for i, key_id in ((7, ABSENT), (8, b"short")):
        result = results[i]
        assert isinstance(result, KeyNotFound) and result.key_id == key_id
    assert all(isinstance(r, InvalidTicket) for i, r in enumerate(results) if i not in (0, 9, 11))


def test_every_item_wrong_key(keyed: Pkcs11Backend) -> None:
    sealed = keyed.seal_many([(KID, b"", b"p%d" % i) for i in range(50)])
    results = keyed.unseal_many([(OTHER, b"", s) for s in sealed])
    assert all(type(r) is UnsealFailed for r in results)
    assert keyed.unseal_many([(KID, b"", s) for s in sealed]) == [b"p%d" % i for i in range(50)]


def test_seal_many_with_a_missing_key_fails_the_batch(keyed: Pkcs11Backend) -> None:
    with pytest.raises(KeyNotFound) as info:
        keyed.seal_many([(KID, b"", b"a"), (ABSENT, b"", b"b"), (KID, b"", b"c")])
    assert info.value.key_id == ABSENT
    assert keyed.unseal(KID, b"", keyed.seal(KID, b"", b"fine")) == b"fine"


def test_destroyed_key_in_a_later_batch(keyed: Pkcs11Backend) -> None:
    sealed = keyed.seal_many([(KID, b"", b"k"), (OTHER, b"", b"o")])
    keyed.unseal_many([(KID, b"", sealed[0])] * 10)  # warm the handle cache
    keyed.destroy_key(KID)
    results = keyed.unseal_many([(KID, b"", sealed[0]), (OTHER, b"", sealed[1])])
    assert isinstance(results[0], KeyNotFound) and results[1] == b"o"
    keyed.create_key(KID)  # same id, new key: the old blob must not open
    results = keyed.unseal_many([(KID, b"", sealed[0]), (OTHER, b"", sealed[1])])
    assert type(results[0]) is UnsealFailed and results[1] == b"o"


# ---------------------------------------------------------------------- sessions and sizes


def test_batch_larger_than_the_pool_needs_one_free_session(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(replace(hsm, sessions=2, session_timeout=0.2))
    try:
        b.create_key(KID)
        # Sizes around and beyond the session's initial output buffer (4 KiB), mixed.
        plain = [os.urandom(n) for n in (0, 1, 4000, 4070, 4096, 9000, 65_536, 300)] * 125
        items = [(KID, i.to_bytes(4, "big"), p) for i, p in enumerate(plain)]
        with b._pool.session():  # another borrower holds one of the two sessions throughout
            sealed = b.seal_many(items)
            opened = b.unseal_many(
                [(k, a, s) for (k, a, _), s in zip(items, sealed, strict=True)]
            )
            assert opened == plain
            with b._pool.session(), pytest.raises(DeviceUnavailable, match="no device session"):
                b.unseal_many(items[:1])
    finally:
        b.close()


def test_broken_session_fails_the_batch_and_is_replaced(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(replace(hsm, sessions=1))
    try:
        b.create_key(KID)
        sealed = b.seal_many([(KID, b"", b"x")] * 5)
        (only,) = b._pool.live()
        b._module.ck.close_session(only.handle)  # pulled from under the pool
        with pytest.raises(DeviceUnavailable):
            b.unseal_many([(KID, b"", s) for s in sealed])
        assert b.unseal_many([(KID, b"", s) for s in sealed]) == [b"x"] * 5
        assert b._pool.live() != [only]
    finally:
        b.close()


# python-pkcs11's finalisers complain about operations on the module pulled away on purpose.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_device_gone_fails_whole_batches(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(hsm)
    b.create_key(KID)
    sealed = b.seal(KID, b"", b"x")
    b.unseal_many([(KID, b"", sealed)] * 4)  # cached handles: the failure comes at decrypt
    assert ctypes.CDLL(str(hsm.module)).C_Finalize(None) == 0  # every session is gone
    with pytest.raises(DeviceUnavailable):
        b.unseal_many([(KID, b"", sealed), (KID, b"", _flip(sealed, 200))])
    # A bad tag on a dead device is the device's failure, not the ticket's (liveness probe).
    with pytest.raises(DeviceUnavailable):
        b.unseal_many([(KID, b"", _flip(sealed, 200))])
    with pytest.raises(DeviceUnavailable):
        b.seal_many([(KID, b"", b"y")])
    b.close()
    b = Pkcs11Backend.open(hsm)  # re-initialises the module
    try:
        assert b.unseal_many([(KID, b"", sealed)]) == [b"x"]
    finally:
        b.close()


# --------------------------------------------------------------------------------- threads


def test_threads_call_unseal_many_concurrently(keyed: Pkcs11Backend) -> None:
    errors: list[BaseException] = []
    done = [0] * 8

    def worker(n: int) -> None:
        key_id = KID if n % 2 else OTHER
        try:
            for round_ in range(15):
                aad = bytes([n, round_])
                plain = [os.urandom((n * 31 + i) % 400) for i in range(40)]
                sealed = keyed.seal_many([(key_id, aad, p) for p in plain])
                items = [(key_id, aad, s) for s in sealed]
                items[7] = (key_id, aad, _flip(sealed[7], 99))
                items[13] = (ABSENT, aad, sealed[13])
                results = keyed.unseal_many(items)
                for i, (p, r) in enumerate(zip(plain, results, strict=True)):
                    if i == 7:
                        assert type(r) is UnsealFailed
                    elif i == 13:
                        assert isinstance(r, KeyNotFound)
                    else:
                        assert r == p
                done[n] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert done == [15] * 8


def test_destroy_and_create_while_threads_run_batches(keyed: Pkcs11Backend) -> None:
    outcomes: set[str] = set()

    def worker(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sealed = keyed.seal_many([(KID, b"", b"x")] * 20)
            except KeyNotFound:
                outcomes.add("gone")
                continue
            except BaseException as exc:
                outcomes.add(repr(exc))
                continue
            for result in keyed.unseal_many([(KID, b"", s) for s in sealed]):
                if result == b"x":
                    outcomes.add("ok")
                elif isinstance(result, KeyNotFound):
                    outcomes.add("gone")
                elif type(result) is UnsealFailed:
                    outcomes.add("rekeyed")  # sealed under the old key, opened under the new
                else:
                    outcomes.add(repr(result))

    churn_key(keyed, worker, threads=5)
    assert outcomes <= {"ok", "gone", "rekeyed"}, sorted(outcomes)
    assert "ok" in outcomes
    assert keyed.unseal_many([(KID, b"", keyed.seal(KID, b"", b"y"))]) == [b"y"]
