"""Pkcs11Backend and the embedded SoftHSM2 token, against real SoftHSM2 (no mocks).

Every test provisions its own token in tmp_path. SoftHSM2 reads SOFTHSM2_CONF at C_Initialize, so
a backend must be closed before the next test's token directory can be used; the fixture does it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pkcs11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkcs11.attributes import AttributeMapper

from authority.backends.base import KeyBackend
from authority.backends.pkcs11 import Pkcs11Backend, _errors
from authority.backends.softhsm import find_softhsm_module, provision_embedded_token
from authority.config import Pkcs11Settings, Secret
from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    KeyNotFound,
    StartupError,
    UnsealFailed,
)
from tests.pkcs11_fixtures import (  # noqa: F401
    KID,
    OTHER,
    churn_key,
    hsm_fixture,
    requires_softhsm,
)

pytestmark = requires_softhsm


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def backend(hsm: Pkcs11Settings) -> Iterator[Pkcs11Backend]:
    """An open backend (4 sessions) on a fresh token, closed after the test."""
    b = Pkcs11Backend.open(replace(hsm, sessions=4, session_timeout=5.0))
    yield b
    b.close()


@pytest.fixture
def keyed(backend: Pkcs11Backend) -> Pkcs11Backend:
    """The backend with key KID created."""
    backend.create_key(KID)
    return backend


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ----------------------------------------------------------------------------- provisioning


def test_provision_layout_and_permissions(tmp_path: Path) -> None:
    hsm_dir = tmp_path / "hsm"
    s = provision_embedded_token(hsm_dir)
    assert stat.S_IMODE(hsm_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((hsm_dir / "tokens").stat().st_mode) == 0o700
    for name in ("user.pin", "so.pin"):
        assert stat.S_IMODE((hsm_dir / name).stat().st_mode) == 0o600
    conf = (hsm_dir / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {hsm_dir / 'tokens'}" in conf
    assert "objectstore.backend = file" in conf
    assert "slots.removable = false" in conf
    assert s.softhsm2_conf == hsm_dir / "softhsm2.conf"
    assert s.token_label == "ticket-authority"
    assert s.pin.reveal() == (hsm_dir / "user.pin").read_text().strip()
    assert (hsm_dir / "user.pin").read_text() != (hsm_dir / "so.pin").read_text()
    assert s.pin.reveal() not in repr(s)


def test_provision_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        provision_embedded_token(tmp_path / "hsm")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hsm").stat().st_mode) == 0o700
    for name in ("user.pin", "so.pin", "softhsm2.conf"):
        assert stat.S_IMODE((tmp_path / "hsm" / name).stat().st_mode) == 0o600


def test_provision_tightens_a_readable_pin_file(tmp_path: Path) -> None:
    provision_embedded_token(tmp_path / "hsm")
    pin_file = tmp_path / "hsm" / "user.pin"
    pin_file.chmod(0o644)
    provision_embedded_token(tmp_path / "hsm")
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600


def test_provision_is_idempotent_and_keeps_keys(tmp_path: Path) -> None:
    first = provision_embedded_token(tmp_path / "hsm")
    b = Pkcs11Backend.open(first)
    b.create_key(KID)
    b.close()
    second = provision_embedded_token(tmp_path / "hsm")
    assert second.pin.reveal() == first.pin.reveal()
    assert len([p for p in (tmp_path / "hsm" / "tokens").iterdir() if p.is_dir()]) == 1
    b = Pkcs11Backend.open(second)
    try:
        assert b.list_keys() == {KID}
    finally:
        b.close()


def test_find_softhsm_module() -> None:
    assert find_softhsm_module().is_file()


# ---------------------------------------------------------------------------- seal / unseal


def test_backend_satisfies_protocol(backend: Pkcs11Backend) -> None:
    b: KeyBackend = backend
    assert b.name == "pkcs11" and b.format_version == 1


def test_round_trip(keyed: Pkcs11Backend) -> None:
    for plaintext in (b"", b"x", b"ticket state " * 100, os.urandom(20_000)):
        sealed = keyed.seal(KID, b"header", plaintext)
        assert len(sealed) == 12 + len(plaintext) + 16
        assert keyed.unseal(KID, b"header", sealed) == plaintext


def test_nonces_are_fresh(keyed: Pkcs11Backend) -> None:
    nonces = {keyed.seal(KID, b"", b"same")[:12] for _ in range(200)}
    assert len(nonces) == 200


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(aad=st.binary(max_size=64), plaintext=st.binary(max_size=600))
def test_round_trip_property(keyed: Pkcs11Backend, aad: bytes, plaintext: bytes) -> None:
    assert keyed.unseal(KID, aad, keyed.seal(KID, aad, plaintext)) == plaintext


def test_every_bit_flip_fails(keyed: Pkcs11Backend) -> None:
    aad, plaintext = b"hdr!", b"tick"
    sealed = keyed.seal(KID, aad, plaintext)
    for bit in range(len(sealed) * 8):  # nonce, ciphertext and tag
        with pytest.raises(UnsealFailed):
            keyed.unseal(KID, aad, _flip(sealed, bit))
    for bit in range(len(aad) * 8):
        with pytest.raises(UnsealFailed):
            keyed.unseal(KID, _flip(aad, bit), sealed)
    assert keyed.unseal(KID, aad, sealed) == plaintext  # sessions still fine


def test_truncations_and_extensions_fail(keyed: Pkcs11Backend) -> None:
    sealed = keyed.seal(KID, b"a", b"payload")
    for n in range(len(sealed)):
        with pytest.raises(UnsealFailed):
            keyed.unseal(KID, b"a", sealed[:n])
    with pytest.raises(UnsealFailed):
        keyed.unseal(KID, b"a", sealed + b"\x00")
    with pytest.raises(UnsealFailed):
        keyed.unseal(KID, b"a", sealed[:12] + sealed[13:])
    with pytest.raises(UnsealFailed):
        keyed.unseal(KID, b"a", b"")


def test_wrong_key_fails(keyed: Pkcs11Backend) -> None:
    keyed.create_key(OTHER)
    sealed = keyed.seal(KID, b"a", b"payload")
    with pytest.raises(UnsealFailed):
        keyed.unseal(OTHER, b"a", sealed)


def test_unknown_key(keyed: Pkcs11Backend) -> None:
    sealed = keyed.seal(KID, b"a", b"payload")
    with pytest.raises(KeyNotFound):
        keyed.unseal(OTHER, b"a", sealed)
    with pytest.raises(KeyNotFound):
        keyed.seal(OTHER, b"a", b"payload")
    with pytest.raises(KeyNotFound):
        keyed.key_attributes(OTHER)
    with pytest.raises(KeyNotFound):
        keyed.unseal(b"short", b"a", sealed)


# ------------------------------------------------------------------------------------- keys


def test_create_destroy_list(backend: Pkcs11Backend) -> None:
    assert backend.list_keys() == set()
    backend.create_key(KID)
    backend.create_key(OTHER)
    assert backend.list_keys() == {KID, OTHER}
    sealed = backend.seal(KID, b"a", b"secret")
    # Warm every session's handle cache for KID, so destroy must clear them all.
    threads = [
        threading.Thread(target=backend.unseal, args=(KID, b"a", sealed)) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.destroy_key(KID)
    assert backend.list_keys() == {OTHER}
    for _ in range(8):
        with pytest.raises(KeyNotFound):
            backend.unseal(KID, b"a", sealed)
    with pytest.raises(KeyNotFound):
        backend.destroy_key(KID)
    # A new key under the same id does not open the old key's blobs.
    backend.create_key(KID)
    for _ in range(8):
        with pytest.raises(UnsealFailed):
            backend.unseal(KID, b"a", sealed)


def test_duplicate_and_bad_ids_refused(keyed: Pkcs11Backend) -> None:
    with pytest.raises(FailedPrecondition):
        keyed.create_key(KID)
    with pytest.raises(InvalidArgument):
        keyed.create_key(b"1234567")
    assert keyed.list_keys() == {KID}


def test_key_attributes(keyed: Pkcs11Backend) -> None:
    attrs = keyed.key_attributes(KID)
    assert attrs == {
        "sensitive": True,
        "extractable": False,
        "always_sensitive": True,
        "never_extractable": True,
        "token": True,
        "private": True,
        "encrypt": True,
        "decrypt": True,
        "wrap": False,
        "unwrap": False,
        "sign": False,
        "derive": False,
        "modifiable": False,
    }


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="opensc not installed")
def test_pkcs11_tool_sees_sensitive_never_extractable(
    hsm: Pkcs11Settings, keyed: Pkcs11Backend
) -> None:
    env = dict(os.environ, SOFTHSM2_CONF=str(hsm.softhsm2_conf), ITA_PIN=hsm.pin.reveal())
    out = subprocess.run(
        [
            "pkcs11-tool", "--module", str(hsm.module), "--token-label", hsm.token_label,
            "--list-objects", "--login", "--pin", "env:ITA_PIN",
        ],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )
    block = out.stdout.split("label:      ita-0102030405060708", 1)[1]
    access = next(line for line in block.splitlines() if "Access:" in line)
    assert "sensitive" in access and "never extractable" in access
    assert "always sensitive" in access


def test_raw_session_cannot_read_key_value(hsm: Pkcs11Settings, keyed: Pkcs11Backend) -> None:
    # Same module instance as the backend (python-pkcs11 caches it by path; use the real path).
    lib = pkcs11.lib(os.path.realpath(hsm.module))
    token = lib.get_token(token_label=hsm.token_label)
    with token.open() as session:  # the backend's login is token-wide
        key = session.get_key(id=KID, object_class=pkcs11.ObjectClass.SECRET_KEY)
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[pkcs11.Attribute.VALUE]
        with pytest.raises(pkcs11.PKCS11Error):
            key.copy({pkcs11.Attribute.EXTRACTABLE: True})


def _allowed_mechanisms_mapper() -> AttributeMapper:
    """python-pkcs11 has no handler for CKA_ALLOWED_MECHANISMS (a CK_MECHANISM_TYPE array):
    read it as one here, independently of the backend's own."""
    mapper = AttributeMapper()
    mapper.register_handler(
        pkcs11.Attribute.ALLOWED_MECHANISMS,
        lambda mechs: b"".join(struct.pack("L", int(m)) for m in mechs),
        lambda raw: [pkcs11.Mechanism(v) for (v,) in struct.iter_unpack("L", raw)],
    )
    return mapper


def test_softhsm2_accepts_the_full_template_and_allowed_mechanisms(
    hsm: Pkcs11Settings, backend: Pkcs11Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="authority.backends.pkcs11")
    backend.create_key(KID)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    lib = pkcs11.lib(os.path.realpath(hsm.module))
    token = lib.get_token(token_label=hsm.token_label)
    with token.open(attribute_mapper=_allowed_mechanisms_mapper()) as session:
        key = session.get_key(id=KID, object_class=pkcs11.ObjectClass.SECRET_KEY)
        attrs = key.get_attributes([pkcs11.Attribute.ALLOWED_MECHANISMS,
                                    pkcs11.Attribute.COPYABLE, pkcs11.Attribute.DESTROYABLE])
        assert attrs == {pkcs11.Attribute.ALLOWED_MECHANISMS: [pkcs11.Mechanism.AES_GCM],
                         pkcs11.Attribute.COPYABLE: False, pkcs11.Attribute.DESTROYABLE: True}
        # SoftHSM2 enforces it: the key does AES-GCM (the backend's seal) and nothing else
        with pytest.raises(pkcs11.exceptions.MechanismInvalid):
            key.encrypt(bytes(16), mechanism=pkcs11.Mechanism.AES_ECB)
        with pytest.raises(pkcs11.exceptions.MechanismInvalid):
            key.encrypt(bytes(16), mechanism=pkcs11.Mechanism.AES_CBC_PAD,
                        mechanism_param=bytes(16))
    sealed = backend.seal(KID, b"aad", b"state")
    assert backend.unseal(KID, b"aad", sealed) == b"state"


# ---------------------------------------------------------------------------- start-up errors


def test_bad_pin(hsm: Pkcs11Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-pin-0123456789"
    with pytest.raises(StartupError) as info:
        Pkcs11Backend.open(replace(hsm, pin=Secret(wrong)))
    message = str(info.value)
    assert message.startswith("pkcs11.pin:")
    assert "PIN incorrect" in message and "ticket-authority" in message
    chain = f"{message} {info.value.__cause__!r} {info.value.__context__!r} {caplog.text}"
    assert wrong not in chain and hsm.pin.reveal() not in chain
    # the module is usable again afterwards
    Pkcs11Backend.open(hsm).close()


def test_missing_token(hsm: Pkcs11Settings) -> None:
    with pytest.raises(StartupError) as info:
        Pkcs11Backend.open(replace(hsm, token_label="no-such-token"))
    message = str(info.value)
    assert message.startswith("pkcs11.token_label:")
    assert "'no-such-token'" in message and "'ticket-authority'" in message
    assert hsm.pin.reveal() not in message


def test_missing_and_unloadable_module(hsm: Pkcs11Settings, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"^pkcs11\.module:"):
        Pkcs11Backend.open(replace(hsm, module=tmp_path / "nope.so"))
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a shared library")
    with pytest.raises(StartupError, match=r"^pkcs11\.module:"):
        Pkcs11Backend.open(replace(hsm, module=junk))
    Pkcs11Backend.open(hsm).close()  # the real module still works


def test_error_translation_for_cases_softhsm_cannot_produce() -> None:
    ctx = _errors.Ctx
    phase = _errors.Phase
    translate = _errors.translate
    locked = translate(pkcs11.exceptions.PinLocked(), ctx(phase.LOGIN, "login", subject="t"))
    assert isinstance(locked, StartupError)
    assert str(locked) == "pkcs11.pin: login to token 't' refused: PIN locked"
    dead = ctx(phase.DECRYPT, "unseal", key_id=KID, probe=lambda: False)
    assert isinstance(translate(pkcs11.exceptions.GeneralError(), dead), DeviceUnavailable)
    alive = ctx(phase.DECRYPT, "unseal", key_id=KID, probe=lambda: True)
    assert isinstance(translate(pkcs11.exceptions.GeneralError(), alive), UnsealFailed)
    assert isinstance(translate(pkcs11.exceptions.DeviceRemoved(), alive), DeviceUnavailable)
    assert isinstance(translate(pkcs11.exceptions.KeyHandleInvalid(), alive), KeyNotFound)


def test_bad_pool_settings(hsm: Pkcs11Settings) -> None:
    with pytest.raises(StartupError, match=r"^pkcs11\.sessions:"):
        Pkcs11Backend.open(replace(hsm, sessions=0))
    with pytest.raises(StartupError, match=r"^pkcs11\.session_timeout:"):
        Pkcs11Backend.open(replace(hsm, session_timeout=0))


def test_describe_and_repr(hsm: Pkcs11Settings, backend: Pkcs11Backend) -> None:
    info = backend.describe()
    assert info.backend == "pkcs11" and info.sessions == 4
    assert info.library.startswith(f"{hsm.module} (SoftHSM")
    assert info.token.startswith("ticket-authority (serial ")
    assert hsm.pin.reveal() not in repr(backend) + repr(info)


# ------------------------------------------------------------------------ state directories


def test_second_state_dir_after_closing_first(tmp_path: Path) -> None:
    first = provision_embedded_token(tmp_path / "a")
    second = provision_embedded_token(tmp_path / "b")
    a = Pkcs11Backend.open(first)
    a.create_key(KID)
    sealed = a.seal(KID, b"", b"from a")
    with pytest.raises(StartupError, match=r"^pkcs11\.softhsm2_conf:"):
        Pkcs11Backend.open(second)
    a.close()
    b = Pkcs11Backend.open(second)
    assert b.list_keys() == set()
    b.create_key(OTHER)
    b.close()
    a = Pkcs11Backend.open(first)
    try:
        assert a.list_keys() == {KID}
        assert a.unseal(KID, b"", sealed) == b"from a"
    finally:
        a.close()


def test_two_backends_on_one_token(hsm: Pkcs11Settings) -> None:
    a = Pkcs11Backend.open(hsm)
    b = Pkcs11Backend.open(hsm)
    a.create_key(KID)
    a.close()  # must not log b out
    assert b.unseal(KID, b"", b.seal(KID, b"", b"still logged in")) == b"still logged in"
    b.close()


# --------------------------------------------------------------------------------- the pool


def test_session_timeout(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(replace(hsm, sessions=1, session_timeout=0.05))
    try:
        b.create_key(KID)
        with (
            b._pool.session(),  # hold the only session
            pytest.raises(DeviceUnavailable, match="no device session free"),
        ):
            b.seal(KID, b"", b"x")
        assert b.unseal(KID, b"", b.seal(KID, b"", b"x")) == b"x"
    finally:
        b.close()


def test_broken_session_is_replaced(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(replace(hsm, sessions=1))
    try:
        b.create_key(KID)
        sealed = b.seal(KID, b"", b"x")
        # Close the pooled session's handle underneath the backend (this also logs the token
        # out: it was the token's only session).
        (only,) = b._pool.live()
        b._module.ck.close_session(only.handle)
        with pytest.raises(DeviceUnavailable):
            b.unseal(KID, b"", sealed)
        assert b.unseal(KID, b"", sealed) == b"x"
        assert b.unseal(KID, b"", b.seal(KID, b"", b"y")) == b"y"
    finally:
        b.close()


# python-pkcs11's finalisers complain about operations on the module pulled away on purpose.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_device_gone_then_reopened(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(hsm)
    b.create_key(KID)
    sealed = b.seal(KID, b"", b"x")
    assert ctypes.CDLL(str(hsm.module)).C_Finalize(None) == 0  # every session is gone
    with pytest.raises(DeviceUnavailable):
        b.unseal(KID, b"", sealed)
    with pytest.raises(DeviceUnavailable):
        b.seal(KID, b"", b"x")
    b.close()
    b = Pkcs11Backend.open(hsm)  # re-initialises the module
    try:
        assert b.unseal(KID, b"", sealed) == b"x"
    finally:
        b.close()


def test_closed_backend_refuses(hsm: Pkcs11Settings) -> None:
    b = Pkcs11Backend.open(hsm)
    b.close()
    b.close()
    with pytest.raises(DeviceUnavailable):
        b.list_keys()


@pytest.mark.slow
def test_threads_seal_and_unseal(keyed: Pkcs11Backend) -> None:
    keyed.create_key(OTHER)
    errors: list[BaseException] = []
    counts: list[int] = []

    def worker(n: int) -> None:
        kid = KID if n % 2 else OTHER
        done = 0
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                aad = n.to_bytes(2, "big") + done.to_bytes(4, "big")
                plaintext = os.urandom(n * 37 % 300)
                sealed = keyed.seal(kid, aad, plaintext)
                assert keyed.unseal(kid, aad, sealed) == plaintext
                with pytest.raises(UnsealFailed):
                    keyed.unseal(kid, aad, _flip(sealed, done % (len(sealed) * 8)))
                done += 1
        except BaseException as exc:
            errors.append(exc)
        counts.append(done)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(counts) == 8 and all(c > 0 for c in counts)


def test_destroy_while_threads_use_the_key(keyed: Pkcs11Backend) -> None:
    outcomes: list[str] = []

    def worker(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sealed = keyed.seal(KID, b"", b"x")
                keyed.unseal(KID, b"", sealed)
                outcomes.append("ok")
            except KeyNotFound:
                outcomes.append("gone")
            except UnsealFailed:
                outcomes.append("rekeyed")  # sealed under the old key, opened under the new
            except BaseException as exc:
                outcomes.append(repr(exc))

    churn_key(keyed, worker, threads=6)
    assert set(outcomes) <= {"ok", "gone", "rekeyed"}, sorted(set(outcomes))
    assert keyed.unseal(KID, b"", keyed.seal(KID, b"", b"y")) == b"y"


# ---------------------------------------------------------------------------- refresh


def test_refresh_under_load_reopens_every_session_and_loses_no_call(
        keyed: Pkcs11Backend) -> None:
    """``refresh`` (the module re-initialised, every session closed and opened again) while
    four threads seal and unseal: every call succeeds, and the sessions are new ones."""
    before = keyed._pool.live()
    failures: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                sealed = keyed.seal(KID, b"aad", b"plaintext")
                assert keyed.unseal(KID, b"aad", sealed) == b"plaintext"
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            keyed.refresh()
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures
    after = keyed._pool.live()
    assert after and not any(pooled in before for pooled in after)   # all opened anew
    assert keyed.list_keys() == {KID}


def test_refresh_leaves_a_module_other_backends_use_alone(hsm: Pkcs11Settings) -> None:
    """With two backends of this process on the module, ``refresh`` does nothing (it would cut
    the other's sessions): both keep working."""
    one = Pkcs11Backend.open(replace(hsm, sessions=2))
    two = Pkcs11Backend.open(replace(hsm, sessions=2))
    try:
        one.create_key(KID)
        sessions = list(two._pool.live())
        one.refresh()
        assert list(two._pool.live()) == sessions
        sealed = two.seal(KID, b"aad", b"x")
        assert one.unseal(KID, b"aad", sealed) == b"x"
    finally:
        two.close()
        one.close()
