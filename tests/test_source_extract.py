"""Unpacking the vendored libreswan tarball (tests/libreswan_fixtures.extract_source) works on
every Python the project supports and refuses a member that would land outside the target.

Debian 12's python3.11 (3.11.2) has no extraction filters (tarfile.data_filter and the
``filter=`` argument came in 3.11.4): the build once called ``extractall(filter="data")`` and
every interop test errored there on a fresh Debian 12 machine. The 3.11.2 tests below give
TarFile.extractall 3.11.2's own signature and take data_filter away, as that Python has them.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.libreswan_fixtures import LibreswanError, extract_source


def _tarball(path: Path, members: Iterable[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, b""


def _as_python_3_11_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """TarFile.extractall with 3.11.2's signature (no ``filter``) and no tarfile.data_filter."""
    original = tarfile.TarFile.extractall

    def extractall(self: tarfile.TarFile, path: str | Path = ".", members: Any = None, *,
                   numeric_owner: bool = False) -> None:
        original(self, path, members, numeric_owner=numeric_owner)

    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    if hasattr(tarfile, "data_filter"):
        monkeypatch.delattr(tarfile, "data_filter")


GOOD = [_file("libreswan-5.2/Makefile", b"all:\n"), _file("libreswan-5.2/lib/x.c", b"int x;\n"),
        _link("libreswan-5.2/lib/y.c", "x.c"), _link("libreswan-5.2/docs/m", "../lib/x.c")]

BAD = {
    "absolute": [_file("/tmp/ita-extract-evil")],
    "dot-dot": [_file("libreswan-5.2/../../evil")],
    "symlink out": [_link("libreswan-5.2/out", "../../etc/passwd")],
    "absolute symlink": [_link("libreswan-5.2/out", "/etc/passwd")],
    "hard link out": [_link("libreswan-5.2/out", "/etc/passwd", tarfile.LNKTYPE)],
    "device": [_special("libreswan-5.2/dev", tarfile.CHRTYPE)],
    "fifo": [_special("libreswan-5.2/fifo", tarfile.FIFOTYPE)],
    "through a symlink": [_link("libreswan-5.2/d", "."), _link("libreswan-5.2/d/e", "../../x")],
}


@pytest.mark.parametrize("python", ["this Python", "Python 3.11.2"])
def test_the_source_is_unpacked(python: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    if python == "Python 3.11.2":
        _as_python_3_11_2(monkeypatch)
    tarball = _tarball(tmp_path / "src.tar.gz", GOOD)
    extract_source(tarball, tmp_path / "src")
    tree = tmp_path / "src" / "libreswan-5.2"
    assert (tree / "Makefile").read_bytes() == b"all:\n"
    assert (tree / "lib" / "y.c").read_bytes() == b"int x;\n"
    assert (tree / "docs" / "m").read_bytes() == b"int x;\n"


@pytest.mark.parametrize("python", ["this Python", "Python 3.11.2"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_member_outside_the_target_is_refused_before_anything_is_written(
        case: str, python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if python == "Python 3.11.2":
        _as_python_3_11_2(monkeypatch)
    tarball = _tarball(tmp_path / "src.tar.gz", [*GOOD, *BAD[case]])
    with pytest.raises(LibreswanError, match=r"src\.tar\.gz: member 'libreswan-5\.2/|"
                                             r"src\.tar\.gz: member '/tmp/ita-extract-evil'"):
        extract_source(tarball, tmp_path / "src")
    assert not (tmp_path / "src").exists()
    assert not Path("/tmp/ita-extract-evil").exists()
