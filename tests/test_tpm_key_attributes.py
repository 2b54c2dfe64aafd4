"""The TPM backend refuses a ticket key that is not its templates' before it runs any crypto
with it, on a real swtpm: a key planted in the key dir with tpm2-pytss -- one whose value is
known outside the TPM (not sensitiveDataOrigin), or one that may be duplicated (neither
fixedTPM nor fixedParent) -- is left out of the key list, never seals, opens no ticket (a
ticket forged with its known value is INVALID), is logged once at ERROR naming its id and
attributes, and is counted. End to end over gRPC, a sealing key swapped for such a key while
the server was stopped is replaced at the next start: issue uses a new key, a forged ticket
under the swapped id is INVALID.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:   # recent cryptography keeps CFB here (its old place warns that it goes)
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:   # older releases (pyproject allows >= 42)
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment, no-redef, unused-ignore]

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.errors import KeyNotFound, UnsealFailed
from authority.state import ResumptionState
from authority.ticket_format import (
    FORMAT_V2_TPM,
    TicketContents,
    assemble_ticket,
    encode_contents,
    encode_header,
)
from tests.conftest import START, Harness, issue, redeem
from tests.tpm_fixtures import (  # noqa: F401  fixtures
    HAVE_PYTSS,
    HAVE_SWTPM,
    requires_tpm,
    swtpm_fixture,
    template_without,
    tpm_settings_fixture,
)

pytestmark = requires_tpm

if HAVE_PYTSS and HAVE_SWTPM:
    from tpm2_pytss import ESAPI  # type: ignore[import-untyped, unused-ignore]
    from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
        ESYS_TR,
        TPMA_OBJECT,
    )
    from tpm2_pytss.types import (  # type: ignore[import-untyped, unused-ignore]
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPM2B_SENSITIVE_DATA,
        TPMS_SENSITIVE_CREATE,
    )

    from authority.backends.tpm import SwtpmProcess, open_tpm_backend
    from authority.backends.tpm._errors import Phase
    from authority.backends.tpm.connection import Connection
    from authority.backends.tpm.templates import (
        aes_template,
        hmac_template,
        loaded_problems,
        primary_template,
    )
    from authority.config import Secret, TpmSettings

GOOD = bytes.fromhex("0102030405060708")
PLANTED = bytes.fromhex("bad0bad0bad0bad0")
AES_VALUE = bytes(range(32))             # known outside the TPM: whoever planted it
HMAC_VALUE = bytes(range(100, 132))
STATE = ResumptionState(id_i=b"\x02\x00\x00\x00forged.example", id_r=b"\x02\x00\x00\x00gw",
                        spi_i=bytes(8), spi_r=bytes(range(1, 9)), sk_d=bytes(32), encr_id=20,
                        encr_key_bits=256, prf_id=5, integ_id=0, dh_group=19, auth_method=14)
LOG = "authority.backends.tpm"


def _plant(tcti: str, key_dir: Path, key_id: bytes, *, known: bool,
           change: Callable[[Any], None] | None) -> None:
    """Make a ticket key with tpm2-pytss under the backend's storage primary (``known``: its
    two values given, AES_VALUE and HMAC_VALUE, so not sensitiveDataOrigin) with ``change``
    made to both templates, and write its blobs under ``key_id`` (replacing any)."""
    esapi = ESAPI(tcti)
    try:
        primary, *_ = esapi.create_primary(None, primary_template(), ESYS_TR.OWNER)
        parts: dict[str, bytes] = {}
        for prefix, template, value in (("aes", aes_template(), AES_VALUE),
                                        ("hmac", hmac_template(), HMAC_VALUE)):
            sensitive = None
            if known:
                template_without(TPMA_OBJECT.SENSITIVEDATAORIGIN)(template)
                sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(
                    data=TPM2B_SENSITIVE_DATA(value)))
            if change is not None:
                change(template)
            private, public, *_ = esapi.create(primary, sensitive, template)
            parts |= {f"{prefix}.pub": public.marshal(), f"{prefix}.priv": private.marshal()}
        esapi.flush_context(primary)
    finally:
        esapi.close()
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for part, data in parts.items():
        path = key_dir / f"{key_id.hex()}.{part}"
        path.write_bytes(data)
        path.chmod(0o600)


def _forge(key_id: bytes, plaintext: bytes) -> bytes:
    """A format-2 sealed body made with the planted key's known values, as the TPM makes it:
    iv | AES-256-CFB | HMAC-SHA256 over header | iv | ciphertext."""
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(AES_VALUE), CFB(iv)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    aad = encode_header(key_id, FORMAT_V2_TPM)
    return iv + ciphertext + hmac.new(HMAC_VALUE, aad + iv + ciphertext, hashlib.sha256).digest()


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and PLANTED.hex() in r.getMessage()]


@pytest.mark.parametrize(("known", "change", "named"), [
    (True, None, ["aes.sensitive_data_origin is false", "hmac.sensitive_data_origin is false"]),
    # fixedParent clear: duplicable (under a fixedTPM parent the TPM wants fixedTPM to match)
    (False, template_without(TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.FIXEDTPM),
     ["aes.fixed_parent is false", "aes.fixed_tpm is false", "hmac.fixed_parent is false",
      "hmac.fixed_tpm is false"]),
], ids=["known-value", "duplicable"])
def test_a_key_not_made_from_the_templates_is_never_used(
        swtpm: SwtpmProcess, tpm_settings: TpmSettings, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, known: bool, change: Callable[[Any], None] | None,
        named: list[str]) -> None:
    assert tpm_settings.key_dir is not None
    _plant(swtpm.tcti, tpm_settings.key_dir, PLANTED, known=known, change=change)
    caplog.set_level(logging.INFO, LOG)
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    try:
        backend.create_key(GOOD)
        aad = encode_header(PLANTED, FORMAT_V2_TPM)
        plain = encode_contents(TicketContents(bytes(16), 1, 2, STATE))
        forged = _forge(PLANTED, plain)
        loads = backend.counters()["blob_loads"]

        assert backend.list_keys() == {GOOD}
        with pytest.raises(KeyNotFound):
            backend.seal(PLANTED, aad, plain)
        with pytest.raises(UnsealFailed):
            backend.unseal(PLANTED, aad, forged)
        with pytest.raises(KeyNotFound):
            backend.key_attributes(PLANTED)
        good_aad = encode_header(GOOD, FORMAT_V2_TPM)
        sealed = backend.seal(GOOD, good_aad, plain)
        opened = backend.unseal_many([(PLANTED, aad, forged), (GOOD, good_aad, sealed)])
        assert isinstance(opened[0], UnsealFailed) and opened[1] == plain

        counters = backend.counters()
        assert counters["blob_loads"] == loads + 1      # GOOD's: PLANTED never reached TPM2_Load
        assert counters["keys_refused"] == 1
        (message,) = _refusals(caplog)                  # once, however often it was asked for
        listed = message.split("(", 1)[1].split(")", 1)[0].split(", ")
        assert sorted(listed) == sorted(named), message
        assert backend.list_keys() == {GOOD}
    finally:
        backend.close()


def test_destroying_a_refused_key_removes_its_blobs(swtpm: SwtpmProcess,
                                                    tpm_settings: TpmSettings,
                                                    tmp_path: Path) -> None:
    assert tpm_settings.key_dir is not None
    _plant(swtpm.tcti, tpm_settings.key_dir, PLANTED, known=True, change=None)
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    try:
        assert backend.list_keys() == set()
        backend.destroy_key(PLANTED)   # a MISSING key's window closing, or 'keys retire'
        assert list(tpm_settings.key_dir.iterdir()) == []
        with pytest.raises(KeyNotFound):
            backend.destroy_key(PLANTED)
    finally:
        backend.close()


def test_a_loaded_object_must_be_the_public_area_that_was_checked(
        swtpm: SwtpmProcess, tpm_settings: TpmSettings, tmp_path: Path) -> None:
    """After TPM2_Load the backend compares what the TPM reports (TPM2_ReadPublic) with the
    blob it checked: the objects of one key against the blobs of another differ."""
    key_dir = tpm_settings.key_dir
    assert key_dir is not None
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    try:
        backend.create_key(GOOD)
        backend.create_key(PLANTED)
    finally:
        backend.close()

    def blob(key_id: bytes, part: str, cls: Any) -> Any:
        return cls.unmarshal((key_dir / f"{key_id.hex()}.{part}").read_bytes())[0]

    conn = Connection(swtpm.tcti, Secret(""), 0)
    conn.connect(Phase.CONNECT)
    try:
        primary, *_ = conn.esapi.create_primary(None, primary_template(), ESYS_TR.OWNER)
        handles = {prefix: conn.esapi.load(primary, blob(GOOD, f"{prefix}.priv", TPM2B_PRIVATE),
                                           blob(GOOD, f"{prefix}.pub", TPM2B_PUBLIC))
                   for prefix in ("aes", "hmac")}
        conn.esapi.flush_context(primary)
        own = {prefix: blob(GOOD, f"{prefix}.pub", TPM2B_PUBLIC) for prefix in handles}
        other = {prefix: blob(PLANTED, f"{prefix}.pub", TPM2B_PUBLIC) for prefix in handles}
        assert loaded_problems(conn, handles, own) == []
        assert loaded_problems(conn, handles, other) == [
            "aes: the TPM reports another public area than its blob's",
            "hmac: the TPM reports another public area than its blob's"]
        for handle in handles.values():
            conn.esapi.flush_context(handle)
    finally:
        conn.close()


def _forged_ticket(key_id: bytes) -> bytes:
    contents = TicketContents(os.urandom(16), int(START), int(START) + 3600, STATE)
    header = encode_header(key_id, FORMAT_V2_TPM)
    return assemble_ticket(header, _forge(key_id, encode_contents(contents)))


def test_a_swapped_sealing_key_is_replaced_and_its_forged_tickets_are_invalid(
        swtpm: SwtpmProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sealing key's blobs swapped, while the server was stopped, for a key whose value
    is known and which may be duplicated: at the next start issue seals under a new key,
    and a ticket forged under the swapped id is INVALID (it was OK before the check)."""
    harness = Harness(tmp_path / "state", "tpm")
    config = replace(harness.config, tpm=TpmSettings(tcti=swtpm.tcti))
    harness.start(config)
    try:
        first = issue(harness.tickets, 1)
    finally:
        harness.stop()
    swapped = first.ticket[4:12]
    _plant(swtpm.tcti, tmp_path / "state" / "tpm" / "keys", swapped, known=True,
           change=template_without(TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.FIXEDTPM))
    forged = _forged_ticket(swapped)
    caplog.set_level(logging.INFO, LOG)
    harness.start(config)
    try:
        invalid = authority_pb2.REDEEM_RESULT_INVALID
        assert redeem(harness.tickets, forged).result == invalid
        assert redeem(harness.tickets, first.ticket).result == invalid
        fresh = issue(harness.tickets, 2).ticket
        assert fresh[4:12] != swapped
        assert redeem(harness.tickets, fresh).result == authority_pb2.REDEEM_RESULT_OK
        refusals = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.ERROR and swapped.hex() in r.getMessage()]
        assert len(refusals) == 1 and "aes.fixed_tpm is false" in refusals[0], refusals
        assert "sensitive_data_origin is false" in refusals[0]
    finally:
        harness.stop()
