"""How the service uses the device: keys stay inside it, redeems cost one device call, unknown
keys cost none, start-up failures are clear. Real SoftHSM2 token throughout."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2, authority_pb2_grpc
from authority.app import Authority, open_backend, pkcs11_settings
from authority.backends.base import KeyBackend
from authority.clock import ManualClock
from authority.config import Secret
from authority.errors import StartupError
from authority.service.server import build_server
from authority.store.sqlite import SqliteStore
from tests.conftest import Harness, issue, make_config, redeem


class CallCounter:
    """Passes every call to the real backend and counts tickets sent to the device for
    opening (a spy, not a mock)."""

    def __init__(self, inner: KeyBackend) -> None:
        self._inner = inner
        self.unseals = 0
        self.name = inner.name
        self.format_version = inner.format_version

    def unseal(self, key_id: bytes, aad: bytes, sealed: bytes) -> bytes:
        self.unseals += 1
        return self._inner.unseal(key_id, aad, sealed)

    def unseal_many(self, items: list[tuple[bytes, bytes, bytes]]) -> list[Any]:
        self.unseals += len(items)
        return self._inner.unseal_many(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_keys_are_sensitive_and_never_extractable(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    backend = harness.authority.backend
    for key_id in backend.list_keys():
        attrs = backend.key_attributes(key_id)
        assert attrs["sensitive"] is True
        assert attrs["extractable"] is False
        assert attrs["always_sensitive"] is True
        assert attrs["never_extractable"] is True
        assert attrs["token"] is True
        assert attrs["encrypt"] is True and attrs["decrypt"] is True
        assert attrs["wrap"] is False and attrs["sign"] is False and attrs["derive"] is False


def test_pkcs11_tool_sees_a_sensitive_never_extractable_key(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    settings = pkcs11_settings(harness.config)
    env = {"SOFTHSM2_CONF": str(settings.softhsm2_conf), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        ["pkcs11-tool", "--module", str(settings.module), "--token-label", settings.token_label,
         "--login", "--pin", settings.pin.reveal(), "--list-objects", "--type", "secrkey"],
        capture_output=True, text=True, env=env, timeout=30, check=True).stdout
    primary = harness.authority.ring.primary_id.hex()
    assert f"ID:         {primary}" in out or primary in out
    assert "sensitive" in out and "never extractable" in out
    assert "Value" not in out


def test_redeem_makes_exactly_one_device_call_and_none_for_unknown_keys(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state")
    counter = CallCounter(open_backend(config))
    store = SqliteStore(config.state_dir / "authority.db")
    authority = Authority(config, counter, store, ManualClock())
    authority.ring.load()
    running = build_server(config, authority=authority)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = authority_pb2_grpc.TicketAuthorityStub(channel)
            ticket = issue(stub).ticket
            assert redeem(stub, ticket).result == authority_pb2.REDEEM_RESULT_OK
            assert counter.unseals == 1
            assert redeem(stub, ticket[:-1] + bytes([ticket[-1] ^ 1])).result == \
                authority_pb2.REDEEM_RESULT_INVALID
            assert counter.unseals == 2
            foreign = ticket[:4] + bytes(8) + ticket[12:]     # unknown key id
            garbage = b"\x07" + ticket[1:]                   # unknown version
            for bad in (foreign, garbage, ticket[:50]):
                assert redeem(stub, bad).result == authority_pb2.REDEEM_RESULT_INVALID
            assert counter.unseals == 2
            authority.ring.rotate()
            authority.ring.retire(bytes.fromhex(ticket[4:12].hex()))
            assert redeem(stub, ticket).result == authority_pb2.REDEEM_RESULT_INVALID
            assert counter.unseals == 2  # a destroyed key is refused before the device
    finally:
        running.stop(grace=1.0)


def test_wrong_pin_is_a_clear_startup_error(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    settings = pkcs11_settings(harness.config)
    harness.stop()
    secret = "not-the-pin-4711"
    config = replace(harness.config, pkcs11=replace(settings, pin=Secret(secret)))
    with pytest.raises(StartupError) as err:
        build_server(config)
    assert "pkcs11.pin" in str(err.value)
    assert secret not in str(err.value) and settings.pin.reveal() not in str(err.value)
    harness.start()  # the right PIN still works: nothing was locked or changed
    assert redeem(harness.tickets, issue(harness.tickets).ticket).result == 1


def test_missing_token_is_a_clear_startup_error(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    settings = pkcs11_settings(harness.config)
    harness.stop()
    config = replace(harness.config, pkcs11=replace(settings, token_label="no-such-token"))
    with pytest.raises(StartupError) as err:
        build_server(config)
    assert "pkcs11.token_label" in str(err.value) and "no-such-token" in str(err.value)


def test_missing_module_is_a_clear_startup_error(pkcs11_harness: Harness) -> None:
    harness = pkcs11_harness
    settings = pkcs11_settings(harness.config)
    harness.stop()
    config = replace(harness.config,
                     pkcs11=replace(settings, module=Path("/nonexistent/libpkcs11.so")))
    with pytest.raises(StartupError) as err:
        build_server(config)
    assert "pkcs11.module" in str(err.value)
