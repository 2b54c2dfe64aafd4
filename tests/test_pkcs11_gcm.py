"""The ctypes AES-GCM path against python-pkcs11's own, on real SoftHSM2.

Tickets sealed before the hot path bypassed python-pkcs11 must still open, and the other way
round: both must produce the same bytes for the same key, nonce, AAD and plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pkcs11
import pytest
from pkcs11.mechanisms import GCMParams

from authority.backends.pkcs11 import Pkcs11Backend, key_label
from authority.config import Pkcs11Settings
from authority.errors import UnsealFailed
from tests.pkcs11_fixtures import KID, hsm_fixture, requires_softhsm  # noqa: F401

pytestmark = requires_softhsm


@pytest.fixture(params=[True, False], ids=["release-gil", "hold-gil"])
def keyed(hsm: Pkcs11Settings, request: pytest.FixtureRequest) -> Iterator[Pkcs11Backend]:
    """A backend whose device calls drop the GIL (the default) or keep it (aio inline)."""
    b = Pkcs11Backend.open(replace(hsm, release_gil=request.param))
    b.create_key(KID)
    yield b
    b.close()


@pytest.fixture
def raw_key(hsm: Pkcs11Settings, keyed: Pkcs11Backend) -> Iterator[Any]:
    """The same key through python-pkcs11 itself (same module instance, token-wide login)."""
    lib = pkcs11.lib(os.path.realpath(hsm.module))
    session = lib.get_token(token_label=hsm.token_label).open()
    yield session.get_key(label=key_label(KID), object_class=pkcs11.ObjectClass.SECRET_KEY)
    session.close()


CASES = [(b"", b""), (b"hdr", b""), (b"", b"x"), (b"\x01" * 12, os.urandom(300)),
         (os.urandom(64), os.urandom(5000)), (b"a", os.urandom(70_000))]


@pytest.mark.parametrize(("aad", "plaintext"), CASES)
def test_sealed_by_python_pkcs11_opens_here(
    keyed: Pkcs11Backend, raw_key: Any, aad: bytes, plaintext: bytes
) -> None:
    nonce = os.urandom(12)
    body = raw_key.encrypt(plaintext, mechanism=pkcs11.Mechanism.AES_GCM,
                           mechanism_param=GCMParams(nonce, aad, 128))
    assert keyed.unseal(KID, aad, nonce + bytes(body)) == plaintext
    assert keyed.unseal_many([(KID, aad, nonce + bytes(body))]) == [plaintext]


@pytest.mark.parametrize(("aad", "plaintext"), CASES)
def test_sealed_here_opens_with_python_pkcs11(
    keyed: Pkcs11Backend, raw_key: Any, aad: bytes, plaintext: bytes
) -> None:
    sealed = keyed.seal(KID, aad, plaintext)
    opened = raw_key.decrypt(sealed[12:], mechanism=pkcs11.Mechanism.AES_GCM,
                             mechanism_param=GCMParams(sealed[:12], aad, 128))
    assert bytes(opened) == plaintext


def test_same_bytes_for_the_same_inputs(keyed: Pkcs11Backend, raw_key: Any) -> None:
    pooled = keyed._pool.take()
    try:
        handle = int(raw_key.handle)
        for aad, plaintext in CASES:
            nonce = os.urandom(12)
            ours = pooled.gcm.encrypt(handle, nonce, aad, plaintext)
            theirs = raw_key.encrypt(plaintext, mechanism=pkcs11.Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(nonce, aad, 128))
            assert ours == bytes(theirs)
            assert len(ours) == len(plaintext) + 16
    finally:
        keyed._pool.give_back(pooled, broken=False)


def test_growing_and_shrinking_sizes_in_one_session(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(replace(hsm, sessions=1))
    try:
        b.create_key(KID)
        sizes = [0, 10, 4064, 4065, 4096, 100_000, 3, 250_000, 1]
        plain = [os.urandom(n) for n in sizes]
        sealed = b.seal_many([(KID, b"", p) for p in plain])
        assert b.unseal_many([(KID, b"", s) for s in sealed]) == plain
        tampered = [s[:-1] + bytes([s[-1] ^ 0x80]) for s in sealed]
        assert all(type(r) is UnsealFailed
                   for r in b.unseal_many([(KID, b"", s) for s in tampered]))
        assert b.unseal_many([(KID, b"", s) for s in sealed]) == plain
    finally:
        b.close()


@pytest.mark.parametrize("release_gil", [True, False])
def test_crypt_functions_hold_the_gil_only_when_asked(hsm: Pkcs11Settings,
                                                      release_gil: bool) -> None:
    import ctypes

    from authority.backends.pkcs11._cryptoki import Cryptoki

    functions = Cryptoki(os.path.realpath(hsm.module)).crypt_functions(release_gil)
    python_api = [bool(type(f)._flags_ & ctypes._FUNCFLAG_PYTHONAPI)  # type: ignore[attr-defined]
                  for f in functions]
    assert python_api == [not release_gil] * 4
