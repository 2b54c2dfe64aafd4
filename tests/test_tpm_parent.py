"""A persistent storage key as the parent of the ticket keys (tpm.parent), on a real swtpm."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from authority.errors import DeviceUnavailable, KeyNotFound, StartupError, UnsealFailed
from tests.tpm_fixtures import (  # noqa: F401
    requires_tools,
    run_tool,
    swtpm_fixture,
    tpm_settings_fixture,
)

PARENT = 0x81000010

pytestmark = requires_tools


def make_persistent_srk(tcti: str, tmp_path: Path, handle: int, attributes: str,
                        alg: str = "ecc256:aes128cfb") -> None:
    context = str(tmp_path / "srk.ctx")
    run_tool(tcti, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", alg,
             "-a", attributes, "-c", context)
    run_tool(tcti, "tpm2_evictcontrol", "-C", "o", "-c", context, f"0x{handle:08x}")
    run_tool(tcti, "tpm2_flushcontext", "-t")


def test_keys_under_a_persistent_parent(swtpm: object, tpm_settings: object,
                                        tmp_path: Path) -> None:
    from authority.backends.tpm import open_tpm_backend

    tcti = tpm_settings.tcti  # type: ignore[attr-defined]
    # A template unlike the built-in primary's (AES-256 instead of AES-128), so a different key.
    make_persistent_srk(tcti, tmp_path, PARENT, "restricted|decrypt|fixedtpm|fixedparent|"
                        "sensitivedataorigin|userwithauth|noda", alg="ecc256:aes256cfb")
    settings = replace(tpm_settings, parent=PARENT)  # type: ignore[type-var]
    backend = open_tpm_backend(settings, tmp_path / "tpm")
    try:
        backend.create_key(b"K" * 8)
        sealed = backend.seal(b"K" * 8, b"header", b"plaintext")
        assert backend.unseal(b"K" * 8, b"header", sealed) == b"plaintext"
        assert backend.key_attributes(b"K" * 8)["aes.fixed_tpm"] is True
    finally:
        backend.close()
    again = open_tpm_backend(settings, tmp_path / "tpm")
    try:
        assert again.unseal(b"K" * 8, b"header", sealed) == b"plaintext"
        assert f"0x{PARENT:x}" in run_tool(tcti, "tpm2_getcap", "handles-persistent").lower()
    finally:
        again.close()
    other = open_tpm_backend(replace(tpm_settings, key_dir=tmp_path / "keys"),  # type: ignore[type-var]
                             tmp_path / "tpm2")
    try:  # blobs made under the persistent parent do not load under the built-in primary
        with pytest.raises((UnsealFailed, DeviceUnavailable, KeyNotFound)):
            other.unseal(b"K" * 8, b"header", sealed)
    finally:
        other.close()


def test_a_missing_or_unsuitable_parent_is_a_startup_error(swtpm: object, tpm_settings: object,
                                                           tmp_path: Path) -> None:
    from authority.backends.tpm import open_tpm_backend

    tcti = tpm_settings.tcti  # type: ignore[attr-defined]
    with pytest.raises(StartupError, match=r"^tpm\.parent: 0x81000011"):
        open_tpm_backend(replace(tpm_settings, parent=0x81000011),  # type: ignore[type-var]
                         tmp_path / "tpm")
    make_persistent_srk(tcti, tmp_path, 0x81000012, "sign|fixedtpm|fixedparent|"
                        "sensitivedataorigin|userwithauth|noda", alg="ecc256:ecdsa-sha256")
    with pytest.raises(StartupError, match="not a storage key"):
        open_tpm_backend(replace(tpm_settings, parent=0x81000012),  # type: ignore[type-var]
                         tmp_path / "tpm")
