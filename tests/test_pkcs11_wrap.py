"""Cluster KEK primitives (issue 15) on real SoftHSM2 tokens: three nodes, each a process with its
own embedded token in its own directory (tests/wrap_nodes.py)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from authority.backends.pkcs11._wrap import (
    BLOB_BYTES,
    KEK_LABEL,
    TRANSPORT_LABEL,
    TransportKey,
    WrappedKek,
    fingerprint,
)
from tests.pkcs11_fixtures import KID, OTHER, requires_softhsm
from tests.wrap_nodes import Node, NodeError

pytestmark = requires_softhsm

NEW = bytes.fromhex("2122232425262728")
#: a well-formed check value no key makes (for calls refused before the check)
ANY_CHECK = bytes(16)


def _flip(blob: bytes, at: int = -1) -> bytes:
    changed = bytearray(blob)
    changed[at] ^= 1
    return bytes(changed)


def _copy(source: Node, target: Node, key_id: bytes) -> None:
    """Unwrap into ``target`` a copy of ``source``'s key, with its check value."""
    target.backend("unwrap_key", key_id, source.backend("wrap_key", key_id),
                   source.backend("key_check", key_id))


def _join(member: Node, joiner: Node) -> tuple[TransportKey, WrappedKek]:
    """The join exchange: the joiner's officer makes a transport key, the member's officer
    wraps the KEK to it, the joiner unwraps it. Both officers are closed afterwards."""
    joiner.officer("open")
    transport: TransportKey = joiner.officer("new_transport_key")
    member.officer("open")
    wrapped: WrappedKek = member.officer("wrap_kek_for", transport.der)
    member.officer("close")
    joiner.officer("unwrap_kek", wrapped)
    joiner.officer("close")
    return transport, wrapped


@pytest.fixture(name="trio", scope="module")
def trio_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    """Nodes A, B, C: A makes the KEK, B and C join; each then opens its backend."""
    root = tmp_path_factory.mktemp("kek")
    nodes = [Node(root / name) for name in ("a", "b", "c")]
    try:
        a, b, c = nodes
        a.officer("open")
        a.officer("make_kek")
        a.officer("close")
        _join(a, b)
        _join(b, c)  # any member can approve
        for node in nodes:
            node.backend("open")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_the_three_tokens_are_separate_directories(trio: list[Node]) -> None:
    confs = {node.settings.softhsm2_conf for node in trio}
    assert len(confs) == 3
    assert len({Path(str(c)).parent for c in confs}) == 3


def test_every_kek_is_trusted_sensitive_wrap_unwrap_only(trio: list[Node]) -> None:
    for node in trio:
        attrs = node.backend("kek_attributes")
        assert attrs["trusted"] is True and attrs["sensitive"] is True
        assert attrs["wrap"] is True and attrs["unwrap"] is True
        assert not any(attrs[k] for k in ("encrypt", "decrypt", "sign", "verify", "derive"))
        assert attrs["modifiable"] is False
        # extractable only under a trusted key (a new member must receive it)
        assert attrs["extractable"] is True and attrs["wrap_with_trusted"] is True
        # an SO session makes only public objects (PKCS#11): see _wrap.py
        assert attrs["private"] is False and attrs["token"] is True


def test_ticket_sealed_with_the_original_opens_with_each_copy_and_back(
        trio: list[Node]) -> None:
    a, b, c = trio
    a.backend("create_wrappable_key", KID)
    blob = a.backend("wrap_key", KID)
    assert len(blob) == BLOB_BYTES == 40
    check = a.backend("key_check", KID)
    b.backend("unwrap_key", KID, blob, check)
    c.backend("unwrap_key", KID, blob, check)
    sealed = a.backend("seal", KID, b"aad", b"ticket from A")
    assert b.backend("unseal", KID, b"aad", sealed) == b"ticket from A"
    assert c.backend("unseal", KID, b"aad", sealed) == b"ticket from A"
    back = b.backend("seal", KID, b"aad", b"ticket from B")
    assert a.backend("unseal", KID, b"aad", back) == b"ticket from B"
    assert c.backend("unseal", KID, b"aad", back) == b"ticket from B"
    with pytest.raises(NodeError) as wrong_aad:
        a.backend("unseal", KID, b"other", back)
    assert wrong_aad.value.kind == "UnsealFailed"


def test_copies_are_sensitive_never_extractable_not_modifiable(trio: list[Node]) -> None:
    a, b, _ = trio
    a.backend("create_wrappable_key", OTHER)
    original = a.backend("key_attributes", OTHER)
    assert original["sensitive"] and original["always_sensitive"] and original["extractable"]
    _copy(a, b, OTHER)
    copy = b.backend("key_attributes", OTHER)
    assert copy == {**copy, "sensitive": True, "extractable": False, "modifiable": False,
                    "private": True, "token": True, "encrypt": True, "decrypt": True,
                    "wrap": False, "unwrap": False, "sign": False, "derive": False}
    assert OTHER in b.backend("list_keys")


def test_values_unreadable_and_no_untrusted_key_wraps_a_ticket_key(trio: list[Node]) -> None:
    a, b, _ = trio
    if KID not in b.backend("list_keys"):
        _copy(a, b, KID)
    original = a.probe("key", KID)
    assert original == {"value": "AttributeSensitive", "untrusted_wrap": "KeyNotWrappable",
                        "user_trusted": "AttributeReadOnly", "kek_value": "AttributeSensitive"}
    copy = b.probe("key", KID)
    assert copy["value"] == "AttributeSensitive" and copy["kek_value"] == "AttributeSensitive"
    assert copy["untrusted_wrap"] == "KeyUnextractable"


def test_a_copy_cannot_be_wrapped_again(trio: list[Node]) -> None:
    a, b, _ = trio
    if KID not in b.backend("list_keys"):
        _copy(a, b, KID)
    with pytest.raises(NodeError) as refused:
        b.backend("wrap_key", KID)
    assert refused.value.kind == "FailedPrecondition"
    assert "KeyUnextractable" in str(refused.value)   # CKR_KEY_UNEXTRACTABLE


def test_a_key_made_never_extractable_cannot_be_wrapped(trio: list[Node]) -> None:
    a = trio[0]
    a.backend("create_key", NEW)
    try:
        with pytest.raises(NodeError) as refused:
            a.backend("wrap_key", NEW)
        assert "KeyUnextractable" in str(refused.value)
    finally:
        a.backend("destroy_key", NEW)


def test_blobs_are_deterministic_and_differ_per_key_and_never_hold_the_length_of_a_clear_key(
        trio: list[Node]) -> None:
    a = trio[0]
    first = a.backend("wrap_key", KID)
    assert a.backend("wrap_key", KID) == first      # RFC 3394 is deterministic
    other = a.backend("wrap_key", OTHER)
    assert other != first and len(other) == len(first) == 40   # 32 + 8, never a bare 32


def test_a_tampered_blob_is_refused_and_leaves_no_key(trio: list[Node]) -> None:
    a, _, c = trio
    blob = a.backend("wrap_key", KID)
    for bad in (_flip(blob), _flip(blob, 0), _flip(blob, 20)):
        with pytest.raises(NodeError) as refused:
            c.backend("unwrap_key", NEW, bad, ANY_CHECK)
        assert refused.value.kind == "InvalidArgument"
        assert NEW not in c.backend("list_keys")
    with pytest.raises(NodeError) as short:
        c.backend("unwrap_key", NEW, blob[:32], ANY_CHECK)
    assert short.value.kind == "InvalidArgument"


def test_the_check_value_of_the_original_is_that_of_each_copy(trio: list[Node]) -> None:
    a, b, c = trio
    for node in (b, c):
        if KID not in node.backend("list_keys"):
            _copy(a, node, KID)
    check = a.backend("key_check", KID)
    assert len(check) == 16
    assert b.backend("key_check", KID) == c.backend("key_check", KID) == check
    assert a.backend("key_check", OTHER) != check     # another key
    assert a.backend("key_check", KID) == check       # deterministic (fixed nonce, AAD)


def test_a_blob_of_one_key_unwrapped_under_another_id_is_refused_and_leaves_nothing(
        trio: list[Node]) -> None:
    """The blob says nothing of its id; the check value, made over the id by the key itself,
    does: a (blob, check) of KID moved onto NEW unwraps, then fails the check and is destroyed.
    (Before the check value, the copy sealed and opened tickets as NEW.)"""
    a, _, c = trio
    blob, check = a.backend("wrap_key", KID), a.backend("key_check", KID)
    with pytest.raises(NodeError) as moved:
        c.backend("unwrap_key", NEW, blob, check)
    assert moved.value.kind == "KeyProtectionError"
    assert "check value" in str(moved.value) and "destroyed" in str(moved.value)
    assert NEW not in c.backend("list_keys")
    with pytest.raises(NodeError) as wrong:
        c.backend("unwrap_key", NEW, blob, ANY_CHECK)   # its own id, another check value
    assert wrong.value.kind == "KeyProtectionError"
    with pytest.raises(NodeError) as short:
        c.backend("unwrap_key", NEW, blob, check[:8])
    assert short.value.kind == "InvalidArgument"
    assert NEW not in c.backend("list_keys")


def test_unwrapping_over_an_existing_id_is_refused(trio: list[Node]) -> None:
    a, b, _ = trio
    with pytest.raises(NodeError) as taken:
        _copy(a, b, KID)
    assert taken.value.kind == "FailedPrecondition"


def test_kek_blob_is_randomized_and_opens_only_with_its_transport_key(
        trio: list[Node], tmp_path: Path) -> None:
    a = trio[0]
    d1, d2 = Node(tmp_path / "d1"), Node(tmp_path / "d2")
    a.backend("close")   # the SO login needs the user logged out in A's process
    try:
        d1.officer("open")
        d2.officer("open")
        t1: TransportKey = d1.officer("new_transport_key")
        t2: TransportKey = d2.officer("new_transport_key")
        assert t1.fingerprint == fingerprint(t1.der) and t1.fingerprint != t2.fingerprint
        a.officer("open")
        w1 = a.officer("wrap_kek_for", t1.der)
        again = a.officer("wrap_kek_for", t1.der)
        with pytest.raises(NodeError) as not_rsa:
            a.officer("wrap_kek_for", b"\x30\x03\x02\x01\x01")
        a.officer("close")
        assert not_rsa.value.kind == "InvalidArgument"
        assert len(w1.blob) == 384 and w1.blob != again.blob      # OAEP is randomized
        assert w1.oaep_hash in ("sha256", "sha1")
        for bad in (WrappedKek(w1.blob, w1.oaep_hash),              # wrapped to d1, not d2
                    WrappedKek(_flip(w1.blob), w1.oaep_hash)):
            with pytest.raises(NodeError) as refused:
                d2.officer("unwrap_kek", bad)
            assert refused.value.kind == "InvalidArgument"
            assert d2.officer("has_kek") is False
        with pytest.raises(NodeError) as tampered:
            d1.officer("unwrap_kek", WrappedKek(_flip(w1.blob, 5), w1.oaep_hash))
        assert tampered.value.kind == "InvalidArgument"
        d1.officer("unwrap_kek", w1)
        assert d1.officer("has_kek") is True
    finally:
        d1.stop()
        d2.stop()
        a.backend("open")


def test_transport_private_key_is_sensitive_never_extractable_unwrap_only(
        tmp_path: Path) -> None:
    node = Node(tmp_path / "j")
    try:
        node.officer("open")
        transport: TransportKey = node.officer("new_transport_key")
        attrs = node.officer("transport_attributes")
        assert attrs["sensitive"] and attrs["always_sensitive"] and attrs["never_extractable"]
        assert attrs["extractable"] is False and attrs["modifiable"] is False
        assert attrs["unwrap"] is True
        assert not any(attrs[k] for k in ("decrypt", "sign", "derive"))
        assert attrs["token"] is False   # a session object: gone with the SO session
        assert len(transport.fingerprint) == 64
        with pytest.raises(NodeError) as no_kek:
            node.officer("wrap_kek_for", transport.der)
        assert no_kek.value.kind == "FailedPrecondition"
    finally:
        node.stop()


def test_user_and_so_logins_exclude_each_other_in_one_process(trio: list[Node]) -> None:
    with pytest.raises(NodeError) as busy:
        trio[1].officer("open")
    assert busy.value.kind == "FailedPrecondition"


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="opensc not installed")
def test_pkcs11_tool_sees_every_kek_and_copy_sensitive_and_reads_no_value(
        trio: list[Node]) -> None:
    if KID not in trio[0].backend("list_keys"):     # run alone: no earlier test made it
        trio[0].backend("create_wrappable_key", KID)
    for node, copy in zip(trio, (False, True, True), strict=True):
        if copy and KID not in node.backend("list_keys"):
            _copy(trio[0], node, KID)
        out = node.pkcs11_tool("--list-objects", "--type", "secrkey")
        kek = out.split("label:      ticket-authority-kek", 1)[1].split("Secret Key Object")[0]
        assert "Usage:      wrap, unwrap" in kek and "sensitive" in kek
        key = out.split(f"label:      ita-{KID.hex()}", 1)[1].split("Secret Key Object")[0]
        access = next(line for line in key.splitlines() if "Access:" in line)
        assert "sensitive" in access and "Usage:      encrypt, decrypt" in key
        assert ("extractable" not in access) if copy else ("extractable" in access)
        assert "Value" not in out
        with pytest.raises(subprocess.CalledProcessError):
            node.pkcs11_tool("--read-object", "--type", "secrkey", "--label",
                             f"ita-{KID.hex()}")


#: a replacement KEK's label, as cluster remove makes one
REPLACEMENT = f"{KEK_LABEL}-0a1b2c3d"


def _objects(node: Node, kind: str) -> list[str]:
    """pkcs11-tool's listing of ``kind`` objects (privkey, pubkey), one text per object."""
    out = node.pkcs11_tool("--list-objects", "--type", kind)
    return [part for part in out.split(" Key Object")[1:]]


def test_a_persistent_transport_key_outlives_its_process_and_receives_a_replacement_kek(
        tmp_path: Path) -> None:
    """The KEK-replacement path: the joiner keeps its transport pair in its token; a fresh
    process on that token later unwraps a new KEK that another token's officer wrapped to it,
    and tickets cross under the new KEK (so both tokens hold the same new KEK)."""
    member, joiner = Node(tmp_path / "m"), Node(tmp_path / "j")
    again: Node | None = None
    try:
        member.officer("open")
        member.officer("make_kek")
        joiner.officer("open")
        transport: TransportKey = joiner.officer("new_transport_key", True)
        assert transport.fingerprint == fingerprint(transport.der)
        # at join: unwrap_kek without a fingerprint uses the persistent pair, and keeps it
        joiner.officer("unwrap_kek", member.officer("wrap_kek_for", transport.der))
        assert joiner.officer("has_transport_key", transport.fingerprint) is True
        joiner.stop()

        member.officer("make_kek", REPLACEMENT)     # as today's KEK, another label
        assert member.officer("kek_labels") == [KEK_LABEL, REPLACEMENT]
        assert member.officer("kek_attributes", REPLACEMENT) == member.officer("kek_attributes")
        wrapped = member.officer("wrap_kek_for", transport.der, REPLACEMENT)
        member.officer("close")

        again = Node(tmp_path / "j")                # a fresh process on the joiner's token
        again.officer("open")
        assert again.officer("has_transport_key", transport.fingerprint) is True
        again.officer("unwrap_kek", wrapped, REPLACEMENT, transport.fingerprint)
        assert again.officer("kek_labels") == [KEK_LABEL, REPLACEMENT]
        assert again.officer("has_transport_key", transport.fingerprint) is True   # kept
        again.officer("close")

        for node in (member, again):
            node.backend("open")
            attrs = node.backend("kek_attributes", REPLACEMENT)
            assert attrs["trusted"] and attrs["sensitive"] and not attrs["modifiable"]
        member.backend("create_wrappable_key", KID)
        again.backend("unwrap_key", KID, member.backend("wrap_key", KID, REPLACEMENT),
                      member.backend("key_check", KID), REPLACEMENT)
        sealed = member.backend("seal", KID, b"aad", b"under the new KEK")
        assert again.backend("unseal", KID, b"aad", sealed) == b"under the new KEK"
    finally:
        for node in (member, joiner, again):
            if node is not None:
                node.stop()


def test_a_persistent_transport_private_key_is_token_sensitive_never_extractable_unwrap_only(
        tmp_path: Path) -> None:
    node = Node(tmp_path / "p")
    try:
        node.officer("open")
        transport: TransportKey = node.officer("new_transport_key", True)
        node.officer("close")
        node.officer("open")                         # read back by another session
        attrs = node.officer("transport_attributes", transport.fingerprint)
        assert attrs == {**attrs, "token": True, "private": False, "sensitive": True,
                         "always_sensitive": True, "extractable": False,
                         "never_extractable": True, "modifiable": False, "unwrap": True,
                         "decrypt": False, "sign": False, "derive": False}
        # a session pair is still made beside it (both carry TRANSPORT_LABEL)
        session_key: TransportKey = node.officer("new_transport_key")
        assert session_key.fingerprint != transport.fingerprint
        assert node.officer("has_transport_key", session_key.fingerprint) is False
        with pytest.raises(NodeError) as malformed:
            node.officer("has_transport_key", "not-hex")
        assert malformed.value.kind == "InvalidArgument"
    finally:
        node.stop()


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="opensc not installed")
def test_pkcs11_tool_lists_the_persistent_pair_and_drop_transport_key_removes_both(
        tmp_path: Path) -> None:
    member, node = Node(tmp_path / "m"), Node(tmp_path / "d")
    try:
        node.officer("open")
        transport: TransportKey = node.officer("new_transport_key", True)
        (private,) = _objects(node, "privkey")
        assert f"label:      {TRANSPORT_LABEL}" in private
        assert f"ID:         {transport.fingerprint}" in private
        access = next(line for line in private.splitlines() if "Access:" in line)
        assert "sensitive" in access and "never extractable" in access
        assert "Usage:      unwrap" in private and "decrypt" not in private
        (public,) = _objects(node, "pubkey")
        assert f"ID:         {transport.fingerprint}" in public

        assert node.officer("drop_transport_key", transport.fingerprint) is True
        assert node.officer("has_transport_key", transport.fingerprint) is False
        assert _objects(node, "privkey") == [] and _objects(node, "pubkey") == []
        assert node.officer("drop_transport_key", transport.fingerprint) is False
        member.officer("open")
        member.officer("make_kek")
        wrapped = member.officer("wrap_kek_for", transport.der)
        with pytest.raises(NodeError) as gone:
            node.officer("unwrap_kek", wrapped, KEK_LABEL, transport.fingerprint)
        assert gone.value.kind == "FailedPrecondition"
        assert "no persistent transport key" in str(gone.value)
        assert node.officer("kek_labels") == []
    finally:
        member.stop()
        node.stop()


def test_destroy_kek_removes_one_kek_label_and_refuses_other_labels(tmp_path: Path) -> None:
    node = Node(tmp_path / "k")
    try:
        node.officer("open")
        node.officer("make_kek")
        node.officer("make_kek", REPLACEMENT)
        assert node.officer("kek_labels") == [KEK_LABEL, REPLACEMENT]
        assert node.officer("destroy_kek", KEK_LABEL) is True
        assert node.officer("kek_labels") == [REPLACEMENT]
        assert node.officer("has_kek") is False and node.officer("has_kek", REPLACEMENT)
        assert node.officer("destroy_kek", KEK_LABEL) is False
        with pytest.raises(NodeError) as other:
            node.officer("destroy_kek", f"ita-{KID.hex()}")
        assert other.value.kind == "InvalidArgument"
        assert node.officer("kek_labels") == [REPLACEMENT]
    finally:
        node.stop()
