"""The key template on PKCS#11 tokens other than SoftHSM2 (issue 12.11).

Other tokens refuse attributes SoftHSM2 accepts (the v2.40 CKA_COPYABLE and CKA_DESTROYABLE on
token objects, whatever their value), or make a key other than the one asked for. Such a token
is simulated at the PKCS#11 boundary only: :class:`OtherToken` wraps the real python-pkcs11
session of a real SoftHSM2 token, works out the template python-pkcs11 sends to
C_GenerateKey (its defaults merged with ours, ``DEFAULT`` removing one) and refuses it as that
token would, or passes the call on to SoftHSM2 with some attributes forced. Every key is a
real SoftHSM2 object; every attribute checked is read back from SoftHSM2.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pkcs11
import pytest
from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism
from pkcs11 import exceptions as p11x
from pkcs11.attributes import AttributeMapper
from pkcs11.defaults import DEFAULT_KEY_CAPABILITIES

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.pkcs11._login import TokenLogin
from authority.cli import main
from authority.config import Pkcs11Settings
from authority.errors import DeviceUnavailable, FailedPrecondition, StartupError
from authority.service.server import build_server
from tests.conftest import Harness, issue, make_config, redeem
from tests.pkcs11_fixtures import KID, hsm_fixture, requires_softhsm  # noqa: F401

pytestmark = requires_softhsm

REPO = Path(__file__).resolve().parent.parent

#: what the token of issue 12.11 refuses on a token object, whatever the value
V240_ONLY = frozenset({Attribute.COPYABLE, Attribute.DESTROYABLE})


def sent_template(key_type: KeyType, key_length: int | None, *, id: bytes | None = None,
                  label: str | None = None, store: bool = False,
                  capabilities: Any = None, template: dict[Attribute, Any] | None = None,
                  ) -> dict[Attribute, Any]:
    """The attributes python-pkcs11's Session.generate_key passes to C_GenerateKey (its
    default secret-key template, our template over it, ``DEFAULT`` values removed)."""
    caps = DEFAULT_KEY_CAPABILITIES[key_type] if capabilities is None else capabilities
    base = AttributeMapper().secret_key_template(capabilities=caps, id_=id, label=label,
                                                 store=store)
    if key_length is not None:
        base[Attribute.VALUE_LEN] = key_length // 8
    merged = {**base, **(template or {})}
    return {attr: value for attr, value in merged.items() if value is not DEFAULT}


@dataclass
class OtherToken:
    """How the simulated token treats C_GenerateKey: ``refuses`` any template holding one of
    these attributes with ``error``; ``forces`` these values onto the key it makes (a token
    that ignores what it is asked). ``sent`` records every template it was given."""

    refuses: frozenset[Attribute] = frozenset()
    error: type[p11x.PKCS11Error] = p11x.GeneralError
    forces: dict[Attribute, Any] = field(default_factory=dict)
    sent: list[dict[Attribute, Any]] = field(default_factory=list)

    def accepted(self) -> list[dict[Attribute, Any]]:
        return [t for t in self.sent if not self.refuses & t.keys()]


class OtherTokenSession:
    """A real python-pkcs11 session (of the SoftHSM2 token) whose generate_key answers as
    :class:`OtherToken` says; everything else goes to the real session."""

    def __init__(self, inner: Any, token: OtherToken) -> None:
        self._inner = inner
        self._token = token

    def generate_key(self, key_type: KeyType, key_length: int | None = None,
                     **kwargs: Any) -> Any:
        sent = sent_template(key_type, key_length, **kwargs)
        self._token.sent.append(sent)
        if self._token.refuses & sent.keys():
            raise self._token.error()
        if self._token.forces:
            kwargs["template"] = {**(kwargs.get("template") or {}), **self._token.forces}
        return self._inner.generate_key(key_type, key_length, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def simulate(token: OtherToken) -> Callable[[], None]:
    """Every session opened from now on talks to ``token``; returns the undo."""
    real_open = TokenLogin.open_session

    def open_session(login: TokenLogin) -> Any:
        pooled = real_open(login)
        pooled.session = OtherTokenSession(pooled.session, token)
        return pooled

    TokenLogin.open_session = open_session  # type: ignore[method-assign]

    def undo() -> None:
        TokenLogin.open_session = real_open  # type: ignore[method-assign]

    return undo


@pytest.fixture
def other_token() -> Iterator[Callable[..., OtherToken]]:
    """``other_token(**how)``: every session opened from then on talks to that token."""
    undo: list[Callable[[], None]] = []

    def install(**how: Any) -> OtherToken:
        token = OtherToken(**how)
        undo.append(simulate(token))
        return token

    yield install
    for step in reversed(undo):
        step()


def serve_on_a_token_refusing_sensitive(argv: list[str]) -> int:
    """``ticket-authority`` (authority.cli.main) on a token that refuses CKA_SENSITIVE with
    CKR_ATTRIBUTE_TYPE_INVALID (run in a child process by a test)."""
    simulate(OtherToken(refuses=frozenset({Attribute.SENSITIVE}),
                        error=p11x.AttributeTypeInvalid))
    return main(argv)


@pytest.fixture
def token_objects(hsm: Pkcs11Settings) -> Callable[[], list[dict[Attribute, Any]]]:
    """Read every secret key of the token through a session of our own: CKA_ID, CKA_LABEL,
    CKA_COPYABLE and CKA_DESTROYABLE (to see what the key was made with)."""

    def read() -> list[dict[Attribute, Any]]:
        lib = pkcs11.lib(os.path.realpath(hsm.module))
        token = lib.get_token(token_label=hsm.token_label)
        with token.open() as session:  # the backend's login is token-wide
            keys = session.get_objects({Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
            return [k.get_attributes([Attribute.ID, Attribute.LABEL, Attribute.COPYABLE,
                                      Attribute.DESTROYABLE]) for k in keys]

    return read


def _open(hsm: Pkcs11Settings) -> Pkcs11Backend:
    return Pkcs11Backend.open(replace(hsm, sessions=2, session_timeout=5.0))


@pytest.fixture
def closing() -> Iterator[list[Pkcs11Backend]]:
    opened: list[Pkcs11Backend] = []
    yield opened
    for backend in opened:
        backend.close()


# ------------------------------------------------------------- optional attributes refused


@pytest.mark.parametrize("error", [p11x.GeneralError, p11x.AttributeTypeInvalid,
                                   p11x.TemplateInconsistent, p11x.AttributeValueInvalid])
def test_token_refusing_copyable_and_destroyable_gets_a_protected_key(
        hsm: Pkcs11Settings, other_token: Callable[..., OtherToken],
        closing: list[Pkcs11Backend], caplog: pytest.LogCaptureFixture,
        error: type[p11x.PKCS11Error]) -> None:
    token = other_token(refuses=V240_ONLY, error=error)
    backend = _open(hsm)
    closing.append(backend)
    caplog.set_level(logging.WARNING, logger="authority.backends.pkcs11")
    backend.create_key(KID)
    assert backend.list_keys() == {KID}
    # the key that was made was asked for without the refused attributes, nothing else dropped
    [made] = token.accepted()
    assert not V240_ONLY & made.keys()
    assert made[Attribute.ALLOWED_MECHANISMS] == [Mechanism.AES_GCM]
    for attr, value in {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                        Attribute.MODIFIABLE: False, Attribute.TOKEN: True,
                        Attribute.PRIVATE: True, Attribute.DERIVE: False}.items():
        assert made[attr] == value
    # what SoftHSM2 reports for the key it made proves the protection
    attrs = backend.key_attributes(KID)
    assert attrs["sensitive"] and attrs["always_sensitive"]
    assert not attrs["extractable"] and attrs["never_extractable"]
    assert not attrs["modifiable"]
    # and the refused attributes are named in the log
    dropped = [r.getMessage() for r in caplog.records if "CKA_COPYABLE" in r.getMessage()]
    assert dropped and "CKA_DESTROYABLE" in dropped[0]
    sealed = backend.seal(KID, b"aad", b"state")
    assert backend.unseal(KID, b"aad", sealed) == b"state"


def test_authority_starts_on_a_token_refusing_copyable_and_destroyable(
        tmp_path: Path, other_token: Callable[..., OtherToken]) -> None:
    token = other_token(refuses=V240_ONLY)
    harness = Harness(tmp_path / "state")
    harness.start()
    try:
        stub = harness.tickets
        assert redeem(stub, issue(stub).ticket).result == authority_pb2.REDEEM_RESULT_OK
        backend = harness.authority.backend
        [key_id] = backend.list_keys()
        attrs = backend.key_attributes(key_id)
        assert attrs["sensitive"] and attrs["never_extractable"] and not attrs["modifiable"]
        assert token.accepted() and not V240_ONLY & token.accepted()[0].keys()
    finally:
        harness.stop()


def test_softhsm2_default_values_show_the_refused_attributes_were_not_sent(
        hsm: Pkcs11Settings, other_token: Callable[..., OtherToken],
        closing: list[Pkcs11Backend],
        token_objects: Callable[[], list[dict[Attribute, Any]]]) -> None:
    other_token(refuses=V240_ONLY)
    backend = _open(hsm)
    closing.append(backend)
    backend.create_key(KID)
    [key] = token_objects()
    # SoftHSM2's defaults (CKA_COPYABLE true): the key was made without our CKA_COPYABLE=false
    assert key[Attribute.ID] == KID
    assert key[Attribute.COPYABLE] is True and key[Attribute.DESTROYABLE] is True


# ----------------------------------------------------------- a key without the protection


@pytest.mark.parametrize(("forced", "named"), [
    ({Attribute.EXTRACTABLE: True}, ["CKA_EXTRACTABLE", "CKA_NEVER_EXTRACTABLE"]),
    ({Attribute.SENSITIVE: False}, ["CKA_SENSITIVE", "CKA_ALWAYS_SENSITIVE"]),
    ({Attribute.MODIFIABLE: True}, ["CKA_MODIFIABLE"]),
    ({Attribute.DERIVE: True}, ["CKA_DERIVE"]),
])
def test_a_key_made_without_the_protection_is_refused_and_destroyed(
        hsm: Pkcs11Settings, other_token: Callable[..., OtherToken],
        closing: list[Pkcs11Backend],
        token_objects: Callable[[], list[dict[Attribute, Any]]],
        forced: dict[Attribute, Any], named: list[str]) -> None:
    other_token(forces=forced)
    backend = _open(hsm)
    closing.append(backend)
    with pytest.raises(StartupError) as info:
        backend.create_key(KID)
    message = str(info.value)
    assert message.startswith("pkcs11.module: token 'ticket-authority'")
    for name in named:
        assert name in message
    assert "destroyed" in message
    assert isinstance(info.value, FailedPrecondition)  # FAILED_PRECONDITION while serving
    assert token_objects() == []
    assert backend.list_keys() == set()


def test_authority_refuses_to_start_on_a_token_making_extractable_keys(
        tmp_path: Path, other_token: Callable[..., OtherToken]) -> None:
    other_token(forces={Attribute.EXTRACTABLE: True})
    try:
        running = build_server(make_config(tmp_path / "state"))
    except StartupError as exc:
        assert re.match(r"pkcs11\.module: token 'ticket-authority' created a key without .*"
                        r"CKA_NEVER_EXTRACTABLE", str(exc)), str(exc)
    else:
        running.stop(0)
        pytest.fail("the authority started on a token that makes extractable keys")


# ---------------------------------------------------------- a required attribute refused


@pytest.mark.parametrize(("refused", "error", "named"), [
    (Attribute.SENSITIVE, p11x.AttributeTypeInvalid, "CKA_SENSITIVE (CKR_ATTRIBUTE_TYPE_INVALID)"),
    # a token saying only CKR_GENERAL_ERROR still gets the attribute named
    (Attribute.PRIVATE, p11x.GeneralError, "CKA_PRIVATE (CKR_GENERAL_ERROR)"),
])
def test_refused_required_attribute_names_the_setting_and_the_attribute(
        hsm: Pkcs11Settings, other_token: Callable[..., OtherToken],
        closing: list[Pkcs11Backend],
        token_objects: Callable[[], list[dict[Attribute, Any]]],
        refused: Attribute, error: type[p11x.PKCS11Error], named: str) -> None:
    other_token(refuses=frozenset({refused}), error=error)
    backend = _open(hsm)
    closing.append(backend)
    with pytest.raises(StartupError) as info:
        backend.create_key(KID)
    assert str(info.value) == ("pkcs11.module: token 'ticket-authority' refused the key "
                               f"template: {named}")
    assert token_objects() == []  # no key, and no probe made while finding the attribute


def test_rotation_on_a_token_that_starts_refusing_is_failed_precondition(
        tmp_path: Path, other_token: Callable[..., OtherToken]) -> None:
    token = other_token()
    harness = Harness(tmp_path / "state")
    harness.start()
    try:
        stub = harness.tickets
        ticket = issue(stub).ticket
        keys = harness.authority.backend.list_keys()
        token.refuses = frozenset({Attribute.SENSITIVE})
        with pytest.raises(grpc.RpcError) as info:
            harness.admin.RotateKey(admin_pb2.RotateKeyRequest())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith(
            "pkcs11.module: token 'ticket-authority' refused the key template: CKA_SENSITIVE")
        # nothing changed: the same key seals and opens
        assert harness.authority.backend.list_keys() == keys
        assert redeem(stub, ticket).result == authority_pb2.REDEEM_RESULT_OK
        assert redeem(stub, issue(stub).ticket).result == authority_pb2.REDEEM_RESULT_OK
    finally:
        harness.stop()


def test_a_token_refusing_every_key_is_unavailable_not_a_template_error(
        hsm: Pkcs11Settings, other_token: Callable[..., OtherToken],
        closing: list[Pkcs11Backend]) -> None:
    # even the minimal template fails: the device is failing, nothing is blamed on a setting
    other_token(refuses=frozenset({Attribute.VALUE_LEN}), error=p11x.GeneralError)
    backend = _open(hsm)
    closing.append(backend)
    with pytest.raises(DeviceUnavailable) as info:
        backend.create_key(KID)
    assert not isinstance(info.value, StartupError)
    assert "GeneralError" in str(info.value)


def test_serve_names_the_setting_and_the_refused_attribute(tmp_path: Path) -> None:
    code = ("import sys; from tests.test_pkcs11_templates import "
            "serve_on_a_token_refusing_sensitive as serve; sys.exit(serve(sys.argv[1:]))")
    done = subprocess.run(
        [sys.executable, "-c", code, "serve", "--state-dir", str(tmp_path / "state"),
         "--listen", "127.0.0.1:0", "--metrics-listen", ""],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert ("ticket-authority: pkcs11.module: token 'ticket-authority' refused the key "
            "template: CKA_SENSITIVE (CKR_ATTRIBUTE_TYPE_INVALID)\n") in done.stderr
    assert "device unavailable" not in done.stderr
