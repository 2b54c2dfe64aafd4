"""A ticket key the PKCS#11 backend did not make is never used (threat model, "operator
mistakes and a device that changes under the authority").

A PIN holder can put a secret key of a value it chose into the token under a ticket key's
label and id (C_CreateObject: sensitive and not extractable, but neither always sensitive
nor never extractable: its value was known outside the token). Before this check the
backend found it by label and id and sealed under it: a ticket issued after the sealing key
was swapped opened offline with the planted value. Now a key is used only if the token
reports the protection the backend requires when it makes one (with per-node tokens, whose
copies are unwrapped and so never "always sensitive": sensitive, and extractable only under
a trusted wrapping key); any other is left out of list_keys (the key ring replaces a sealing
key and marks any other MISSING), never seals or opens, and is logged once at ERROR.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.backends.softhsm import CONF_NAME, DEFAULT_LABEL, USER_PIN_NAME
from authority.errors import KeyNotFound
from authority.ticket_format import NONCE_LEN, encode_header, parse_ticket
from tests.conftest import Harness, issue, redeem
from tests.pkcs11_fixtures import MODULE_PATH, requires_softhsm

pytestmark = requires_softhsm

KNOWN = bytes(range(32))    # the planted key's value: known outside the token
LOG = "authority.backends.pkcs11"

#: run in a process of its own (the server's process has the module initialised): destroy
#: the token's keys with argv[1]'s id and create one of value argv[5] under its label and id
PLANT = r"""
import sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
lib = pkcs11.lib(sys.argv[3])
token = lib.get_token(token_label=sys.argv[4])
key_id = bytes.fromhex(sys.argv[1])
with token.open(rw=True, user_pin=sys.argv[2]) as session:
    for old in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                    Attribute.ID: key_id}):
        old.destroy()
    session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE: bytes.fromhex(sys.argv[5]), Attribute.LABEL: "ita-" + key_id.hex(),
        Attribute.ID: key_id, Attribute.TOKEN: True, Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True, Attribute.DECRYPT: True})
"""


def _plant(state: Path, key_id: bytes) -> None:
    hsm = state / "hsm"
    env = {**os.environ, "SOFTHSM2_CONF": str(hsm / CONF_NAME)}
    done = subprocess.run([sys.executable, "-c", PLANT, key_id.hex(),
                           (hsm / USER_PIN_NAME).read_text().strip(), str(MODULE_PATH),
                           DEFAULT_LABEL, KNOWN.hex()],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def _forged(key_id: bytes, plaintext: bytes) -> bytes:
    """A ticket sealed with KNOWN under ``key_id``'s header: what the planted key's holder
    can make."""
    header = encode_header(key_id)
    nonce = os.urandom(NONCE_LEN)
    return header + nonce + AESGCM(KNOWN).encrypt(nonce, plaintext, header)


def _opens_with_known(ticket: bytes) -> bool:
    parsed = parse_ticket(ticket)
    try:
        AESGCM(KNOWN).decrypt(parsed.sealed[:NONCE_LEN], parsed.sealed[NONCE_LEN:],
                              parsed.header)
    except InvalidTag:   # not sealed with the planted value
        return False
    return True


@pytest.mark.parametrize("mode", ["aio", "threads"])
def test_a_planted_sealing_key_is_never_used_and_is_replaced(
        mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    harness = Harness(state, "pkcs11", mode)
    harness.start()
    try:
        first = issue(harness.tickets, 1).ticket
    finally:
        harness.stop()
    planted = parse_ticket(first).key_id
    _plant(state, planted)
    caplog.set_level(logging.INFO, LOG)
    harness.start()
    try:
        fresh = issue(harness.tickets, 2).ticket
        assert not _opens_with_known(fresh)          # sealed with the planted value before
        assert parse_ticket(fresh).key_id != planted
        assert redeem(harness.tickets, fresh).result == authority_pb2.REDEEM_RESULT_OK
        invalid = authority_pb2.REDEEM_RESULT_INVALID
        assert redeem(harness.tickets, _forged(planted, b"\x00" * 120)).result == invalid
        assert redeem(harness.tickets, first).result == invalid
        backend = harness.running.authority.backend   # type: ignore[union-attr]
        assert planted not in backend.list_keys()
        with pytest.raises(KeyNotFound):
            backend.seal(planted, encode_header(planted), b"x" * 64)
        with pytest.raises(KeyNotFound):   # aio: a batch runs in a device process
            backend.seal_many([(planted, encode_header(planted), b"x" * 64)] * 2)
        refusals = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.ERROR and planted.hex() in r.getMessage()]
        assert len(refusals) == 1, refusals
        assert "CKA_ALWAYS_SENSITIVE is false" in refusals[0]
        assert "CKA_NEVER_EXTRACTABLE is false" in refusals[0]
    finally:
        harness.stop()


def test_with_per_node_tokens_a_key_must_still_be_sensitive(tmp_path: Path) -> None:
    """per_node_keys (cluster.per_node_tokens): an unwrapped copy is never "always sensitive",
    so that is not asked; sensitive, and not extractable unless under a trusted wrapping key,
    still are."""
    from authority.backends.pkcs11 import _keys

    copy = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ALWAYS_SENSITIVE: False, Attribute.NEVER_EXTRACTABLE: False}
    assert _keys.use_problems(copy, per_node=True) == []
    assert _keys.use_problems(copy, per_node=False) == [
        "CKA_ALWAYS_SENSITIVE is false", "CKA_NEVER_EXTRACTABLE is false"]
    wrappable = {**copy, Attribute.EXTRACTABLE: True,
                 Attribute.WRAP_WITH_TRUSTED: True}
    assert _keys.use_problems(wrappable, per_node=True) == []
    bare = {**copy, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}
    assert _keys.use_problems(bare, per_node=True) == [
        "CKA_SENSITIVE is false", "CKA_EXTRACTABLE is true without CKA_WRAP_WITH_TRUSTED"]
