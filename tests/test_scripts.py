"""The set-up scripts as a new user meets them on a fresh Debian 12: every program a test, the
service or a script runs is installed by scripts/bootstrap; a second bootstrap does nothing and
prints nothing; the package metadata builds without deprecation warnings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "scripts" / "bootstrap"
SOURCES = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("authority/**/*.py"),
           *ROOT.glob("tools/*.py"), *ROOT.glob("examples/**/*.py")]
SCRIPTS = [*ROOT.glob("scripts/*"), ROOT / ".ci" / "run", ROOT / "examples" / "cluster" / "run"]

# argv[0] of a subprocess call, a shutil.which() lookup, or a tpm2-tools command named anywhere
_CALLS = re.compile(r"(?:subprocess\.(?:run|Popen|check_output|check_call|call)|"
                    r"create_subprocess_exec)\(\s*\[\s*\"([\w.+-]+)\"")
_WHICH = re.compile(r"shutil\.which\(\s*\"([\w.+-]+)\"")
_TPM2_TOOLS = re.compile(r"\"(tpm2_[a-z]+)\"")
# a PostgreSQL server program run from its directory (authority/devdb.py: self._bin / "initdb")
_PG_BINARY = re.compile(r"_bin\s*/\s*\"([\w.+-]+)\"")
# a command in a shell script: at the start of a line or after ; & | { $( if ! then do exec
# $sudo, past VAR=value assignments; not a variable (x=, x+=), a path (x/...) or a function
# call; ${...} is an expansion, not a group
_SHELL = re.compile(r"(?:^|[;&|]|(?<!\$)\{|\$\(|\bif\s+!?|\bthen\b|\bdo\b|\bexec\b|"
                    r"\$sudo\b)\s*(?:[A-Z_]+=\S*\s+)*([a-z][\w.+-]*)(?![\w/=(+.-])")
_PLAIN_STRING = re.compile(r'"(?:[^"$]|\$(?!\())*"')   # a "..." without a $( ... ) inside
_ARITHMETIC = re.compile(r"\(\(.*?\)\)")                # (( ... )): no command inside
# the body of a here-document with a quoted delimiter (<<'PY'): text for another program
_HEREDOC = re.compile(r"<<-?\s*'(\w+)'[^\n]*\n.*?^\s*\1$", re.MULTILINE | re.DOTALL)
_FUNCTION = re.compile(r"^\s*([a-z_][\w-]*)\s*\(\)\s*\{", re.MULTILINE)  # name() { ...
_SHELL_WORDS = {"if", "then", "else", "fi", "for", "in", "do", "done", "while", "case", "esac",
                "set", "cd", "echo", "exit", "read", "export", "local", "return", "true",
                "false", "exec", "until", "trap", "wait", "kill",   # bash builtins
                "sudo"}   # bootstrap runs as root, or with sudo where the user has it
_NOT_COMMANDS = {"tpm2_pytss"}   # the Python binding, not a program


def shell_commands(text: str) -> set[str]:
    """The programs a bash script runs by name (not its own functions)."""
    text = re.sub(r"^(?:test_)?debs=\([^)]*\)", "", text, flags=re.MULTILINE)  # packages
    text = _HEREDOC.sub("", text)
    found: set[str] = set()
    for line in text.splitlines():
        code = "" if line.lstrip().startswith("#") else line.split(" #", 1)[0]
        code = _ARITHMETIC.sub("", _PLAIN_STRING.sub('""', code))
        found.update(_SHELL.findall(code))
    return found - _SHELL_WORDS - set(_FUNCTION.findall(text))


def programs() -> set[str]:
    """Every external program the sources and scripts call by name, except those pip puts in
    .venv/bin (ruff, mypy, python, the console script)."""
    found: set[str] = set()
    for path in SOURCES:
        text = path.read_text()
        for pattern in (_CALLS, _WHICH, _TPM2_TOOLS, _PG_BINARY):
            found.update(pattern.findall(text))
    for path in SCRIPTS:
        found.update(shell_commands(path.read_text()))
    from_pip = {"ticket-authority", "python", "ruff", "mypy", "pytest"}
    return found - _NOT_COMMANDS - from_pip


def bootstrap_packages(text: str) -> set[str]:
    """The Debian packages scripts/bootstrap --test installs (its debs=( ... ) list and the
    test_debs=( ... ) one, added with --test)."""
    match = re.search(r"^debs=\(([^)]*)\)", text, re.MULTILINE)
    assert match, "scripts/bootstrap has no debs=( ... ) list"
    for_tests = re.search(r"^test_debs=\(([^)]*)\)", text, re.MULTILINE)
    return set(match.group(1).split()) | set(for_tests.group(1).split() if for_tests else ())


def package_of(program: str) -> str | None:
    """The Debian package that installed ``program`` (None: not found). Debian's own copy
    counts even where PATH finds another first (a pyenv python3, the .venv's)."""
    candidates = [f"{d}/{program}" for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin")]
    candidates += map(str, Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))
    path = shutil.which(program)
    if path is not None:
        candidates += [path, os.path.realpath(path)]
    for candidate in candidates:
        done = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True,
                              check=False)
        if done.returncode == 0:
            return done.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


def field(package: str, name: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f", f"${{{name}}}", package],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip()


def provided(wanted: set[str]) -> set[str]:
    """The packages bootstrap installs and what they depend on directly (Pre-Depends too)."""
    have = set(wanted)
    for package in wanted:
        depends = f"{field(package, 'Pre-Depends')},{field(package, 'Depends')}"
        have.update(alternative.split()[0].split(":")[0]
                    for alternative in re.split(r"[,|]", depends) if alternative.strip())
    return have


def on_every_debian(package: str) -> bool:
    return field(package, "Essential") == "yes" or field(package, "Priority") == "required"


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian system")
def test_every_program_called_is_installed_by_bootstrap() -> None:
    called = programs()
    assert {"pgrep", "pkcs11-tool", "swtpm", "tpm2_createprimary", "dpkg-query",
            "apt-get", "python3", "initdb", "pg_ctl", "runuser",
            "ip", "make", "certutil", "dumpcap", "tshark"} <= called
    installed = provided(bootstrap_packages(BOOTSTRAP.read_text()))
    problems = []
    for program in sorted(called):
        package = package_of(program)
        if package is None:
            problems.append(f"{program}: not installed here, so no package to check")
        elif package not in installed and not on_every_debian(package):
            problems.append(f"{program}: from {package}, which scripts/bootstrap does not "
                            "install (nor is it on every Debian system)")
    assert not problems, "\n".join(problems)


def test_package_metadata_has_no_deprecated_settings() -> None:
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)   # an SPDX expression
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("this setuptools predates SPDX license expressions")
    with warnings.catch_warnings():   # what pip install -e prints, as errors
        warnings.simplefilter("error")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")


def _stamp_current() -> bool:
    stamp = ROOT / ".venv" / "bootstrap.stamp"
    return stamp.exists() and (ROOT / ".venv" / "bin" / "ticket-authority").exists()


@pytest.mark.skipif(not _stamp_current(), reason="scripts/bootstrap has not run here")
def test_a_second_bootstrap_does_nothing_and_prints_nothing() -> None:
    """Run where scripts/test ran bootstrap first: all Debian packages are there, and the
    stamp matches unless pyproject.toml changed since (then the first run here installs)."""
    wanted = bootstrap_packages(BOOTSTRAP.read_text())
    absent = [p for p in sorted(wanted) if subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", p], capture_output=True, text=True,
        check=False).stdout != "install ok installed"]
    if absent:
        pytest.skip(f"would apt-get install {absent}")
    record = next((ROOT / ".venv" / "lib").glob("python3*/site-packages/"
                                                "ike_ticket_authority-*.dist-info/RECORD"))
    first = subprocess.run([str(BOOTSTRAP), "--test"], capture_output=True, text=True,
                           timeout=600, check=False)
    assert first.returncode == 0, first.stderr
    installed = record.stat().st_mtime_ns
    again = subprocess.run([str(BOOTSTRAP), "--test"], capture_output=True, text=True,
                           timeout=120, check=False)
    plain = subprocess.run([str(BOOTSTRAP)], capture_output=True, text=True, timeout=120,
                           check=False)
    for run in (again, plain):
        assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert record.stat().st_mtime_ns == installed, "pip ran again"
