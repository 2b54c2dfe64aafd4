"""A PIN or TPM owner auth given by environment variable (``pkcs11.pin_env``,
``tpm.owner_auth_env``) is taken out of the environment once read, and no child of the
authority (device processes, the TPM process, the embedded swtpm) has it in its environment:
each gets a minimal one. Real SoftHSM2, real swtpm, the real server started from a TOML file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2_grpc
from authority.backends.processes.environment import DEVICE_VARIABLES, PROGRAM_VARIABLES
from authority.backends.softhsm import provision_embedded_token
from authority.config import Config
from authority.service.server import RunningServer, build_server
from tests.conftest import issue, load_toml
from tests.pkcs11_fixtures import requires_softhsm
from tests.tpm_fixtures import HAVE_PYTSS, HAVE_SWTPM, requires_tools, requires_tpm, run_tool

if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.tpm import SwtpmProcess

PIN_VAR = "TA_TEST_DEVICE_PIN"
AUTH_VAR = "TA_TEST_OWNER_AUTH"
SERVER = '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\n'


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _names(pid: int) -> str:
    """The program a process runs (its argv[0..2]), for failure messages."""
    return " ".join(a.decode(errors="replace")
                    for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3])


def _allowed(name: bytes, pid: int) -> bool:
    """Whether child ``pid`` may have the variable ``name``: what any program needs; for a
    device process (Python) also the interpreter's and the device libraries' configuration."""
    if name.decode() in PROGRAM_VARIABLES or name.startswith(b"LC_"):
        return True
    device_process = b"python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    return device_process and (name.decode() in DEVICE_VARIABLES or name.startswith(b"PYTHON"))


def _assert_nowhere(var: str, secret: str, children: list[int], expect: int) -> None:
    """There are ``expect`` ``children``; neither ``var`` nor ``secret`` is in the environment of
    any of them, which hold only a minimal environment; ``var`` is gone from os.environ."""
    assert len(children) == expect, [_names(p) for p in children]
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert secret.encode() not in environ, _names(pid)
        assert var.encode() + b"=" not in environ, _names(pid)
        names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0") if entry}
        assert not [n for n in names if not _allowed(n, pid)], (_names(pid), sorted(names))
    assert var not in os.environ


@pytest.fixture
def serving() -> Iterator[list[RunningServer]]:
    """Holds the server a test starts; stopped after the test."""
    running: list[RunningServer] = []
    yield running
    for server in running:
        server.stop(grace=1.0)


def _start(config: Config, serving: list[RunningServer]) -> tuple[RunningServer, list[int]]:
    """Start the server; return it and the processes it started."""
    before = set(_children(os.getpid()))
    server = build_server(config)
    serving.append(server)
    return server, [p for p in _children(os.getpid()) if p not in before]


@requires_softhsm
def test_pin_env_is_in_no_device_process_and_leaves_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: list[RunningServer]) -> None:
    hsm = provision_embedded_token(tmp_path / "hsm")
    monkeypatch.setenv(PIN_VAR, hsm.pin.reveal())
    config = load_toml(tmp_path, SERVER + 'mode = "aio"\ndevice_processes = 2\n'
                       f'[pkcs11]\nmodule = "{hsm.module}"\ntoken_label = "{hsm.token_label}"\n'
                       f'pin_env = "{PIN_VAR}"\nsofthsm2_conf = "{hsm.softhsm2_conf}"\n')
    assert config.pkcs11 is not None and config.pkcs11.pin.reveal() == hsm.pin.reveal()
    server, children = _start(config, serving)
    _assert_nowhere(PIN_VAR, hsm.pin.reveal(), children, expect=2)
    with grpc.insecure_channel(server.address) as channel:  # the processes work without it
        assert issue(authority_pb2_grpc.TicketAuthorityStub(channel)).ticket


@requires_tpm
@requires_tools
@pytest.mark.parametrize("processes", [0, 1])
def test_owner_auth_env_is_in_no_child_and_leaves_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serving: list[RunningServer],
        processes: int) -> None:
    secret = "owner-auth-5e1d0c"
    swtpm = SwtpmProcess.start(tmp_path / "tpm" / "swtpm")  # the embedded swtpm's state
    try:
        run_tool(swtpm.tcti, "tpm2_changeauth", "-c", "owner", secret)
    finally:
        swtpm.stop()
    monkeypatch.setenv(AUTH_VAR, secret)
    config = load_toml(tmp_path, 'backend = "tpm"\n' + SERVER +
                       f"device_processes = {processes}\n[tpm]\nowner_auth_env = \"{AUTH_VAR}\"\n")
    server, children = _start(config, serving)
    _assert_nowhere(AUTH_VAR, secret, children, expect=1 + processes)  # swtpm (+ TPM process)
    with grpc.insecure_channel(server.address) as channel:
        assert issue(authority_pb2_grpc.TicketAuthorityStub(channel)).ticket


def test_the_secret_leaves_the_servers_own_proc_environ(tmp_path: Path) -> None:
    """/proc/<pid>/environ shows the block copied at exec, not os.environ: the value read
    through pin_env is zeroed there too (same user and root could read it before)."""
    import subprocess
    import sys
    secret = "s3cret-pin-4242-not-anywhere"
    config = tmp_path / "a.toml"
    config.write_text('[pkcs11]\nmodule = "/nonexistent.so"\ntoken_label = "t"\n'
                      f'pin_env = "{PIN_VAR}"\n')
    code = ("import pathlib, sys; from authority.settings_loader import load_config; "
            "cfg = load_config(pathlib.Path(sys.argv[1])); "
            "assert cfg.pkcs11.pin.reveal() == sys.argv[2][::-1]; "
            "env = pathlib.Path('/proc/self/environ').read_bytes(); "
            "print('LEAK' if sys.argv[2][::-1].encode() in env else 'CLEAN')")
    env = {**os.environ, PIN_VAR: secret}
    out = subprocess.run([sys.executable, "-c", code, str(config), secret[::-1]], env=env,
                         capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "CLEAN", out.stdout + out.stderr
