"""The release artefacts (issue 17): an sdist built from this tree, a wheel built from that sdist
(so the sdist is complete), what each holds, one version from authority/__init__.py, and the
wheel installed with pip into a fresh virtual environment running ``ticket-authority --version``
and a real ``serve`` (embedded SoftHSM2 token, port 0) that issues and redeems over gRPC and
exits 0 on SIGTERM."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

from authority import __version__
from authority._proto.ticketauthority.v1 import admin_pb2
from authority.bench.serveproc import ServeProcess
from authority.chaos.servers import round_trip, single_settings
from tests.pkcs11_fixtures import requires_softhsm

ROOT = Path(__file__).resolve().parents[1]
DIST = "ike_ticket_authority"
PROTO_STUBS = [f"authority/_proto/ticketauthority/v1/{name}_pb2{ext}"
               for name in ("authority", "admin") for ext in (".py", ".pyi", "_grpc.py")]
DATA = ["authority/py.typed", "authority/_hsm_config/softhsm2.conf.template",
        "authority/_hsm_config/authority.example.toml"]
BUILD_TIMEOUT = 120.0
INSTALL_TIMEOUT = 180.0      # pip resolving the dependencies from the registry (or its cache)


@dataclass(frozen=True)
class Dists:
    """The built sdist and the wheel built from it."""
    sdist: Path
    wheel: Path


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``cwd``. Raises: AssertionError with its output if it fails."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """``python -m build --sdist`` of this tree, then ``pip wheel`` of that sdist (no network:
    the build backend is the environment's setuptools)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out),
          str(ROOT)], out, BUILD_TIMEOUT)
    (sdist,) = out.glob("*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", str(out), str(sdist)], out, BUILD_TIMEOUT)
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _wheel_text(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode()


def _sdist_names(sdist: Path) -> set[str]:
    """Paths in the sdist, without its top directory."""
    with tarfile.open(sdist) as archive:
        return {name.partition("/")[2] for name in archive.getnames()}


def _source_version() -> str:
    """``__version__`` as authority/__init__.py assigns it (read, not imported)."""
    tree = ast.parse((ROOT / "authority" / "__init__.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)):
            return str(node.value.value)
    raise AssertionError("authority/__init__.py assigns no __version__")


def _source_modules() -> set[str]:
    """The modules of authority/ that git tracks (a fresh clone's, as CI builds; another
    engineer's untracked work in this checkout is not judged), every .py file outside git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", "authority/*.py"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode == 0 and listed.stdout:
        return {name for name in listed.stdout.decode().split("\0") if name}
    return {str(path.relative_to(ROOT)) for path in (ROOT / "authority").rglob("*.py")
            if "__pycache__" not in path.parts}


def test_the_version_has_one_place() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "authority.__version__"}
    assert _source_version() == __version__


def test_the_changelog_s_newest_release_is_the_version() -> None:
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert [h for h in headings if h != "Unreleased"][:1] == [__version__]


def test_the_artefacts_carry_the_version(dists: Dists) -> None:
    assert dists.sdist.name == f"{DIST}-{__version__}.tar.gz"
    assert dists.wheel.name == f"{DIST}-{__version__}-py3-none-any.whl"
    metadata = Parser().parsestr(
        _wheel_text(dists.wheel, f"{DIST}-{__version__}.dist-info/METADATA"))
    assert metadata["Version"] == __version__
    assert metadata["Name"] == "ike-ticket-authority"
    assert metadata["License-Expression"] == "Apache-2.0"


def test_the_wheel_holds_every_module_the_stubs_and_the_data(dists: Dists) -> None:
    """Every module of authority/ (a package left out of pyproject's list fails here), the
    generated gRPC stubs and their typing stubs, py.typed and the hsm-config files."""
    names = set(_wheel_names(dists.wheel))
    missing = sorted(_source_modules() - names)
    assert missing == [], f"not in the wheel (pyproject [tool.setuptools] packages?): {missing}"
    assert sorted(set(PROTO_STUBS + DATA) - names) == []


def test_the_wheel_holds_nothing_else(dists: Dists) -> None:
    info = f"{DIST}-{__version__}.dist-info/"
    stray = [name for name in _wheel_names(dists.wheel)
             if not (name.startswith(("authority/", info)))
             or "__pycache__" in name or name.endswith(".pyc") or "/tests/" in name]
    assert stray == []
    entry_points = _wheel_text(dists.wheel, info + "entry_points.txt")
    assert "ticket-authority = authority.cli:main" in entry_points


def test_the_license_text_ships_with_both_artefacts(dists: Dists) -> None:
    """The Apache-2.0 text the metadata declares is in the tree, the sdist and the wheel
    (a declared license without its text is not one a user can follow)."""
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "LICENSE" in _sdist_names(dists.sdist)
    info = f"{DIST}-{__version__}.dist-info/"
    assert _wheel_text(dists.wheel, info + "licenses/LICENSE") == text
    metadata = Parser().parsestr(_wheel_text(dists.wheel, info + "METADATA"))
    assert metadata.get_all("License-File") == ["LICENSE"]


def test_the_sdist_is_the_source_release(dists: Dists) -> None:
    names = _sdist_names(dists.sdist)
    wanted = ["pyproject.toml", "README.md", "CHANGELOG.md", "authority/__init__.py",
              "hsm-config/softhsm2.conf.template", "tests/conftest.py",
              "tests/pkcs11_fixtures.py", "docs/versioning.md"]
    wanted += [str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto")]
    assert sorted(set(wanted) - names) == []
    assert [name for name in names if "__pycache__" in name or name.endswith(".pyc")] == []


class _WheelServe(ServeProcess):
    """A ``serve`` run by the installed ``ticket-authority`` program of another environment."""

    def __init__(self, directory: Path, program: Path) -> None:
        super().__init__(directory, "wheel", single_settings(directory / "wheel"))
        self.program = program

    def command(self, *argv: str) -> list[str]:
        return [str(self.program), *argv, "--config", str(self.config)]


def _fresh_venv(venv: Path, wheel: Path) -> Path:
    """A new virtual environment at ``venv`` with ``wheel`` installed by pip (dependencies
    from the registry); its ``python``. Raises: AssertionError if either step fails."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent, 60.0)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
          "--disable-pip-version-check", str(wheel)], venv.parent, INSTALL_TIMEOUT)
    return python


@pytest.mark.slow
@requires_softhsm
def test_the_wheel_installed_in_a_fresh_venv_serves(dists: Dists, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv", dists.wheel)
    program = python.parent / "ticket-authority"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    where = subprocess.run([str(python), "-c", "import authority; print(authority.__file__)"],
                           cwd=tmp_path, env=clean, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv")
    shown = subprocess.run([str(program), "--version"], cwd=tmp_path, env=clean,
                           capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == f"ticket-authority {__version__}"

    server = _WheelServe(tmp_path, program)
    try:
        server.serve()
        assert server.proc is not None
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(tmp_path / "venv")), cmdline
        status = server.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10.0)
        assert status.version == __version__
        assert round_trip(server), server.log_tail()
        server.close_channel()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=35) == 0, server.log_tail()
    finally:
        server.kill()
