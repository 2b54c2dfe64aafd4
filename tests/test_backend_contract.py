"""One contract, every key backend: the same tests against real SoftHSM2 (PKCS#11, format 1) and a
real swtpm (TPM 2.0, format 2). Nothing is mocked; each test gets its own token / TPM state in
tmp_path, and "restart" closes the backend and opens a new one on the same state (for the TPM the
embedded swtpm process itself is stopped and started again).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from authority.backends.base import KeyBackend
from authority.errors import FailedPrecondition, InvalidArgument, KeyNotFound, UnsealFailed
from authority.ticket_format import SEAL_OVERHEAD, encode_header
from tests.tpm_fixtures import requires_tpm

K1 = bytes.fromhex("0102030405060708")
K2 = bytes.fromhex("1112131415161718")
K3 = bytes.fromhex("2122232425262728")
ABSENT = bytes.fromhex("f0f1f2f3f4f5f6f7")


def _softhsm_available() -> bool:
    try:
        from authority.backends.softhsm import find_softhsm_module

        find_softhsm_module()
    except Exception:
        return False
    return True


class Opener:
    """Opens one kind of backend on state kept in ``root``; reopening keeps the device state."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.current: KeyBackend | None = None

    def open(self) -> KeyBackend:
        assert self.current is None, "close the open backend first"
        if self.kind == "pkcs11":
            from authority.backends.pkcs11 import Pkcs11Backend
            from authority.backends.softhsm import provision_embedded_token

            settings = provision_embedded_token(self.root / "hsm")
            self.current = Pkcs11Backend.open(replace(settings, sessions=2))
        else:
            from authority.backends.tpm import open_tpm_backend
            from authority.config import TpmSettings

            self.current = open_tpm_backend(TpmSettings(), self.root / "tpm")
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def reopen(self) -> KeyBackend:
        self.close()
        return self.open()


@pytest.fixture(params=[
    pytest.param("pkcs11", marks=pytest.mark.skipif(not _softhsm_available(),
                                                   reason="SoftHSM2 not installed")),
    pytest.param("tpm", marks=requires_tpm),
])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    made = Opener(str(request.param), tmp_path)
    yield made
    made.close()


@pytest.fixture
def backend(opener: Opener) -> KeyBackend:
    """An open backend holding key K1."""
    b = opener.open()
    b.create_key(K1)
    return b


def _aad(backend: KeyBackend, key_id: bytes) -> bytes:
    return encode_header(key_id, backend.format_version)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ------------------------------------------------------------------------------------ sealing


@pytest.mark.parametrize("size", [1, 16, 17, 300, 900])
def test_round_trip(backend: KeyBackend, size: int) -> None:
    aad = _aad(backend, K1)
    plaintext = os.urandom(size)
    sealed = backend.seal(K1, aad, plaintext)
    assert len(sealed) == size + SEAL_OVERHEAD[backend.format_version]
    if size >= 16:
        assert plaintext not in sealed
    assert backend.unseal(K1, aad, sealed) == plaintext


def test_each_seal_is_fresh(backend: KeyBackend) -> None:
    aad = _aad(backend, K1)
    sealed = {backend.seal(K1, aad, b"same plaintext") for _ in range(8)}
    assert len(sealed) == 8


def test_every_bit_flip_fails(backend: KeyBackend) -> None:
    aad = _aad(backend, K1)
    sealed = backend.seal(K1, aad, os.urandom(32))
    for bit in range(len(sealed) * 8):
        with pytest.raises(UnsealFailed):
            backend.unseal(K1, aad, _flip(sealed, bit))
    for bit in range(len(aad) * 8):
        with pytest.raises(UnsealFailed):
            backend.unseal(K1, _flip(aad, bit), sealed)


def test_every_truncation_and_extension_fails(backend: KeyBackend) -> None:
    aad = _aad(backend, K1)
    sealed = backend.seal(K1, aad, os.urandom(40))
    for length in range(len(sealed)):
        with pytest.raises(UnsealFailed):
            backend.unseal(K1, aad, sealed[:length])
    for cut in range(1, len(sealed)):
        with pytest.raises(UnsealFailed):
            backend.unseal(K1, aad, sealed[cut:])
    with pytest.raises(UnsealFailed):
        backend.unseal(K1, aad, sealed + b"\0")
    with pytest.raises(UnsealFailed):
        backend.unseal(K1, aad + b"\0", sealed)
    assert backend.unseal(K1, aad, sealed)  # the original still opens


def test_wrong_key_rejected(backend: KeyBackend) -> None:
    backend.create_key(K2)
    aad = _aad(backend, K1)
    sealed = backend.seal(K1, aad, b"for K1 only")
    with pytest.raises(UnsealFailed):
        backend.unseal(K2, aad, sealed)
    assert backend.unseal(K1, aad, sealed) == b"for K1 only"


def test_unknown_key(backend: KeyBackend) -> None:
    aad = _aad(backend, ABSENT)
    sealed = backend.seal(K1, aad, b"x" * 20)
    with pytest.raises(KeyNotFound):
        backend.seal(ABSENT, aad, b"x")
    with pytest.raises(KeyNotFound):
        backend.unseal(ABSENT, aad, sealed)
    with pytest.raises(KeyNotFound):
        backend.destroy_key(ABSENT)
    with pytest.raises(KeyNotFound):
        backend.key_attributes(ABSENT)
    with pytest.raises(KeyNotFound):
        backend.unseal(b"short", aad, sealed)


# ------------------------------------------------------------------------------------ keys


def test_create_destroy_list(backend: KeyBackend) -> None:
    assert backend.list_keys() == {K1}
    backend.create_key(K2)
    assert backend.list_keys() == {K1, K2}
    aad = _aad(backend, K2)
    sealed = backend.seal(K2, aad, b"under K2")
    backend.destroy_key(K2)
    assert backend.list_keys() == {K1}
    with pytest.raises(KeyNotFound):
        backend.unseal(K2, aad, sealed)
    with pytest.raises(KeyNotFound):
        backend.destroy_key(K2)
    backend.create_key(K2)  # the same id again is a new key: the old blob never opens
    with pytest.raises(UnsealFailed):
        backend.unseal(K2, aad, sealed)


def test_duplicate_and_bad_ids_refused(backend: KeyBackend) -> None:
    with pytest.raises(FailedPrecondition):
        backend.create_key(K1)
    with pytest.raises(InvalidArgument):
        backend.create_key(b"1234567")
    assert backend.list_keys() == {K1}


def test_key_attributes_are_booleans(backend: KeyBackend) -> None:
    attributes = backend.key_attributes(K1)
    assert attributes
    assert all(isinstance(v, bool) for v in attributes.values())


def test_describe(backend: KeyBackend, opener: Opener) -> None:
    info = backend.describe()
    assert info.backend == backend.name == opener.kind
    assert info.library and info.token and info.sessions >= 1
    assert backend.format_version == {"pkcs11": 1, "tpm": 2}[opener.kind]


# ------------------------------------------------------------------------------------ batches


def test_seal_many_unseal_many_order_and_mixed_items(backend: KeyBackend) -> None:
    backend.create_key(K2)
    items = [(k, _aad(backend, k), f"item {i}".encode()) for i, k in
             enumerate([K1, K2, K1, K1, K2, K2, K1, K2])]
    sealed = backend.seal_many(items)
    assert len(sealed) == len(items)
    for (key_id, aad, plaintext), body in zip(items, sealed, strict=True):
        assert backend.unseal(key_id, aad, body) == plaintext
    mixed = [(k, a, s) for (k, a, _), s in zip(items, sealed, strict=True)]
    mixed[1] = (K2, mixed[1][1], _flip(mixed[1][2], 5))        # tampered
    mixed[2] = (ABSENT, mixed[2][1], mixed[2][2])             # unknown key
    mixed[4] = (K1, mixed[4][1], mixed[4][2])                 # wrong key
    mixed[6] = (K1, mixed[6][1], mixed[6][2][:10])            # truncated
    out = backend.unseal_many(mixed)
    assert len(out) == len(items)
    for index, result in enumerate(out):
        if index in (1, 4, 6):
            assert isinstance(result, UnsealFailed), index
        elif index == 2:
            assert isinstance(result, KeyNotFound)
        else:
            assert result == items[index][2]
    assert backend.seal_many([]) == []
    assert backend.unseal_many([]) == []


def test_seal_many_unknown_key_fails_the_batch(backend: KeyBackend) -> None:
    with pytest.raises(KeyNotFound):
        backend.seal_many([(K1, _aad(backend, K1), b"a"), (ABSENT, _aad(backend, ABSENT), b"b")])


# ------------------------------------------------------------------------------------ restarts


def test_restart_persistence(opener: Opener) -> None:
    backend = opener.open()
    backend.create_key(K1)
    backend.create_key(K2)
    aad1, aad2 = _aad(backend, K1), _aad(backend, K2)
    sealed1 = backend.seal(K1, aad1, b"one")
    sealed2 = backend.seal(K2, aad2, b"two")
    backend = opener.reopen()
    assert backend.list_keys() == {K1, K2}
    assert backend.unseal(K1, aad1, sealed1) == b"one"
    assert backend.unseal(K2, aad2, sealed2) == b"two"
    assert backend.unseal_many([(K2, aad2, sealed2), (K1, aad1, sealed1)]) == [b"two", b"one"]


def test_rotation_table(opener: Opener) -> None:
    """create k1, seal; create k2, seal; destroy k1: k1's blobs fail, k2's open; reopen: same."""
    backend = opener.open()
    backend.create_key(K1)
    aad1 = _aad(backend, K1)
    old = [backend.seal(K1, aad1, f"old {i}".encode()) for i in range(3)]
    backend.create_key(K2)
    aad2 = _aad(backend, K2)
    new = [backend.seal(K2, aad2, f"new {i}".encode()) for i in range(3)]
    assert [backend.unseal(K1, aad1, s) for s in old] == [b"old 0", b"old 1", b"old 2"]
    backend.destroy_key(K1)
    backend.create_key(K3)

    def check(b: KeyBackend) -> None:
        assert b.list_keys() == {K2, K3}
        for sealed in old:
            with pytest.raises(KeyNotFound):
                b.unseal(K1, aad1, sealed)
        assert [b.unseal(K2, aad2, s) for s in new] == [b"new 0", b"new 1", b"new 2"]
        results = b.unseal_many([(K1, aad1, old[0]), (K2, aad2, new[0])])
        assert isinstance(results[0], KeyNotFound)
        assert results[1] == b"new 0"

    check(backend)
    check(opener.reopen())
