"""run_officer (issue 15): SecurityOfficer calls in a spawned child process, on real SoftHSM2
tokens, beside a user login in this process."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.pkcs11._wrap import (
    CHECK_NONCE,
    KEK_LABEL,
    TransportKey,
    WrappedKek,
    check_aad,
)
from authority.backends.pkcs11.officer import SecurityOfficer
from authority.backends.pkcs11.officer_process import run_officer
from authority.config import Pkcs11Settings, Secret
from authority.errors import DeviceUnavailable, FailedPrecondition, InvalidArgument, StartupError
from tests.pkcs11_fixtures import (
    KID,
    hsm_fixture,  # noqa: F401
    requires_softhsm,
)
from tests.wrap_nodes import Node

pytestmark = [requires_softhsm,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")]


@pytest.fixture(name="joiner_key", scope="module")
def joiner_key_fixture() -> rsa.RSAPrivateKey:
    """An RSA-3072 key pair held by the test: whatever is wrapped to it can be checked."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _so(settings: Pkcs11Settings) -> Secret:
    assert settings.so_pin is not None
    return settings.so_pin


def _children() -> dict[int, str]:
    """This process's child processes (zombies included: they keep their parent), by pid, with
    their command lines; multiprocessing's resource tracker left out (it lives on)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and "resource_tracker" not in cmdline:
            found[int(entry.name)] = cmdline
    return found


def _new_child(before: dict[int, str], seconds: float = 30.0) -> int:
    """The pid of a child started after ``before`` was taken, as soon as it runs Python."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for pid, cmdline in _children().items():
            if pid not in before and "spawn_main" in cmdline:
                return pid
        time.sleep(0.002)
    raise AssertionError("no officer child process appeared")


@pytest.fixture(name="in_thread")
def in_thread_fixture() -> Iterator[Callable[..., dict[str, Any]]]:
    """Run run_officer on a thread; the dict gets its "result" or "error" once it ends."""
    threads: list[threading.Thread] = []

    def start(*args: Any, **kwargs: Any) -> dict[str, Any]:
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["result"] = run_officer(*args, **kwargs)
            except Exception as exc:
                outcome["error"] = exc
        thread = threading.Thread(target=call)
        thread.start()
        threads.append(thread)
        outcome["thread"] = thread
        return outcome

    yield start
    for thread in threads:
        thread.join(timeout=90)
        assert not thread.is_alive()


def test_wrap_kek_for_runs_in_a_child_while_the_user_is_logged_in_here(
        hsm: Pkcs11Settings, joiner_key: rsa.RSAPrivateKey) -> None:
    """In this process the user login refuses the SO login; in a child the SO wraps the KEK
    (the very KEK this process's backend wraps ticket keys under: the test opens the blob with
    its own private key, unwraps a ticket key with it and gets the key's check value)."""
    assert run_officer(hsm, _so(hsm), "make_kek") is None
    backend = Pkcs11Backend.open(replace(hsm, per_node_keys=True))   # per-node tokens, as serve
    try:
        with pytest.raises(FailedPrecondition, match="the user is logged in in this process"):
            SecurityOfficer.open(hsm.module, hsm.softhsm2_conf, hsm.token_label, _so(hsm))
        wrapped = run_officer(hsm, _so(hsm), "wrap_kek_for", _der(joiner_key))
        assert isinstance(wrapped, WrappedKek) and len(wrapped.blob) == 384
        assert run_officer(hsm, _so(hsm), "kek_labels") == [KEK_LABEL]
        assert run_officer(hsm, _so(hsm), "kek_attributes")["trusted"] is True

        # SoftHSM2 does OAEP only with SHA-1 (see _wrap.OAEP_PARAMS)
        algorithm = (hashes.SHA256() if wrapped.oaep_hash == "sha256"
                     else hashes.SHA1())  # noqa: S303
        kek = joiner_key.decrypt(wrapped.blob, padding.OAEP(padding.MGF1(algorithm), algorithm,
                                                            None))
        backend.create_wrappable_key(KID)      # the user login still works beside the child
        key = aes_key_unwrap(kek, backend.wrap_key(KID))
        assert len(key) == 32
        assert AESGCM(key).encrypt(CHECK_NONCE, b"", check_aad(KID)) == backend.key_check(KID)
    finally:
        backend.close()


def test_a_kek_travels_child_to_child_to_a_persistent_transport_key(
        hsm: Pkcs11Settings, tmp_path: Path) -> None:
    """The KEK-replacement path with a server on each side: the member's child wraps a KEK to
    the transport key a joiner kept in its token; the joiner's child unwraps it by fingerprint."""
    joiner = Node(tmp_path / "joiner")
    try:
        joiner.officer("open")
        transport: TransportKey = joiner.officer("new_transport_key", True)
        joiner.officer("close")
    finally:
        joiner.stop()
    their = joiner.settings
    label = f"{KEK_LABEL}-00c0ffee"
    run_officer(hsm, _so(hsm), "make_kek", label)
    backend = Pkcs11Backend.open(hsm)       # the member's server, user logged in
    try:
        wrapped = run_officer(hsm, _so(hsm), "wrap_kek_for", transport.der, label)
    finally:
        backend.close()
    run_officer(their, _so(their), "unwrap_kek", wrapped, label, transport.fingerprint)
    assert run_officer(their, _so(their), "kek_labels") == [label]
    assert run_officer(their, _so(their), "has_transport_key", transport.fingerprint) is True
    assert run_officer(their, _so(their), "drop_transport_key", transport.fingerprint) is True
    assert run_officer(their, _so(their), "has_transport_key", transport.fingerprint) is False
    assert run_officer(their, _so(their), "destroy_kek", label) is True
    assert run_officer(their, _so(their), "has_kek", label) is False


def test_errors_in_the_child_arrive_as_their_class_with_their_message(
        hsm: Pkcs11Settings, joiner_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(FailedPrecondition) as no_kek:
        run_officer(hsm, _so(hsm), "wrap_kek_for", _der(joiner_key))
    assert type(no_kek.value) is FailedPrecondition
    assert str(no_kek.value) == f"no cluster KEK labelled {KEK_LABEL!r} in the token"
    with pytest.raises(InvalidArgument) as bad_key:
        run_officer(hsm, _so(hsm), "wrap_kek_for", b"\x30\x03\x02\x01\x01")
    assert bad_key.value.field == "public_key"
    assert str(bad_key.value) == "public_key: not a DER SubjectPublicKeyInfo"
    with pytest.raises(FailedPrecondition, match="no persistent transport key"):
        run_officer(hsm, _so(hsm), "unwrap_kek", WrappedKek(bytes(384), "sha1"), KEK_LABEL,
                    "ab" * 32)
    wrong = Secret("wrong-so-pin-0123")
    with pytest.raises(StartupError) as refused:
        run_officer(hsm, wrong, "kek_labels")
    assert str(refused.value).startswith("pkcs11.so_pin: SO login to token")
    assert wrong.reveal() not in str(refused.value)


def test_methods_outside_the_list_are_value_errors_and_start_no_child(
        hsm: Pkcs11Settings) -> None:
    before = _children()
    for method in ("new_transport_key", "close", "transport_attributes", "__init__"):
        with pytest.raises(ValueError, match="cannot run in a child process"):
            run_officer(hsm, _so(hsm), method)
    with pytest.raises(ValueError, match="needs the fingerprint"):
        run_officer(hsm, _so(hsm), "unwrap_kek", WrappedKek(bytes(384), "sha1"))
    with pytest.raises(TypeError):
        run_officer(hsm, _so(hsm), "has_kek", KEK_LABEL, "extra")
    assert _children() == before


def test_a_timeout_is_device_unavailable_and_leaves_no_child(hsm: Pkcs11Settings) -> None:
    before = _children()
    started = time.monotonic()
    with pytest.raises(DeviceUnavailable) as late:
        run_officer(hsm, _so(hsm), "kek_labels", timeout=0.05)   # a spawn alone takes longer
    assert "security officer kek_labels: no answer in 0.05 s" in str(late.value)
    assert time.monotonic() - started < 15
    assert _children() == before            # killed and reaped: not even a zombie
    assert run_officer(hsm, _so(hsm), "kek_labels") == []    # the token is none the worse


def test_a_child_that_dies_is_device_unavailable_naming_the_method(
        hsm: Pkcs11Settings, in_thread: Callable[..., dict[str, Any]]) -> None:
    before = _children()
    outcome = in_thread(hsm, _so(hsm), "has_kek", timeout=60)
    os.kill(_new_child(before), signal.SIGKILL)
    outcome["thread"].join(timeout=60)
    error = outcome.get("error")
    assert isinstance(error, DeviceUnavailable), outcome
    assert "security officer has_kek: its process died" in str(error)
    assert _children() == before


def test_the_so_pin_is_in_neither_argv_nor_the_environment_of_the_child(
        hsm: Pkcs11Settings, in_thread: Callable[..., dict[str, Any]]) -> None:
    pin = _so(hsm).reveal().encode()
    before = _children()
    outcome = in_thread(hsm, _so(hsm), "kek_labels", timeout=60)
    pid = _new_child(before)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"spawn_main" in cmdline and environ     # the child was read, not a stranger
    assert pin not in cmdline and pin not in environ
    outcome["thread"].join(timeout=60)
    assert outcome.get("result") == [], outcome
