"""systemd (issue 17): the unit packaging/systemd/ticket-authority.service passes
``systemd-analyze verify`` (which can fail: broken copies do), its ``systemd-analyze security``
exposure is at most the figure packaging/systemd/README.md states and every check it still
fails is explained there, its settings agree with the service's (stop timeout, state
directory), its sysusers file makes the user; and a real ``serve`` speaks the notification
protocol (authority/sdnotify.py) as ``Type=notify`` needs: READY=1 only once it answers gRPC
calls, STOPPING=1 on SIGTERM, from the main process only (``NotifyAccess=main``), for one
process and for a supervisor of replicas. No systemd runs as PID 1 here: the unit is checked
offline, the protocol against a socket of the test's own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority.bench.serveproc import ServeProcess
from authority.chaos.servers import round_trip, single_settings
from authority.sdnotify import ENVIRONMENT, Notifier, socket_address
from authority.service.supervisor import STOP_MARGIN
from authority.settings_loader import load_config
from tests.pkcs11_fixtures import requires_softhsm
from tests.tpm_fixtures import requires_tpm

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging" / "systemd"
UNIT = PACKAGING / "ticket-authority.service"
README = PACKAGING / "README.md"
SYSUSERS = PACKAGING / "ticket-authority.sysusers"
EXAMPLE = PACKAGING / "authority.toml"
INSTALLED = "/opt/ike-ticket-authority/bin/ticket-authority"   # ExecStart's program
DRAIN_MAX = 1.0   # seconds of refusals before the gRPC stop (authority/service/interceptors.py)

requires_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                      reason="systemd-analyze not installed (package systemd)")


# -- the unit, offline ---------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, by ``Section.Key``, in order (keys repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def verifiable_copy(directory: Path, text: str) -> Path:
    """``text`` (the unit) written to ``directory`` under the unit's name, ExecStart's program
    (installed in /opt, absent here) replaced by this checkout's ``ticket-authority``: verify
    insists the program exists. Raises: AssertionError if the unit names no such program."""
    program = Path(sys.executable).parent / "ticket-authority"
    assert text.count(INSTALLED) == 1, f"ExecStart no longer runs {INSTALLED}"
    path = directory / UNIT.name
    path.write_text(text.replace(INSTALLED, str(program)))
    return path


def verify(path: Path) -> tuple[int, str]:
    """``systemd-analyze verify``'s exit status and what it said. It exits 0 after warnings
    ("Unknown key", "Failed to parse ..., ignoring": the setting silently dropped), so a clean
    unit is status 0 *and* nothing said."""
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, (done.stdout + done.stderr).strip()


@requires_analyze
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    status, said = verify(verifiable_copy(tmp_path, UNIT.read_text()))
    assert (status, said) == (0, "")


@requires_analyze
@pytest.mark.parametrize(("change", "expected"), [
    (("ProtectSystem=strict", "ProtectSystem=strcit"), "Failed to parse"),
    (("NoNewPrivileges=yes", "NoNewPrivilege=yes"), "Unknown key"),
    (("RestrictAddressFamilies=AF_UNIX", "RestrictAddressFamilies=AF_UNIKS"), "address family"),
    (("Type=notify", "Type=notfy"), "Failed to parse"),
])
def test_verify_fails_on_a_broken_copy(tmp_path: Path, change: tuple[str, str],
                                       expected: str) -> None:
    old, new = change
    text = UNIT.read_text()
    assert old in text
    _status, said = verify(verifiable_copy(tmp_path, text.replace(old, new, 1)))
    assert expected in said, said


@requires_analyze
def test_verify_fails_when_the_program_is_missing(tmp_path: Path) -> None:
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text())   # /opt/ike-ticket-authority is not installed here
    assert not Path(INSTALLED).exists()
    status, said = verify(path)
    assert status != 0 and "is not executable" in said, said


@dataclass(frozen=True)
class Exposure:
    """What ``systemd-analyze security --offline=yes`` says of the unit."""

    overall: float
    failing: list[str]        # the names of the checks marked ✗ (e.g. "PrivateNetwork=")


def security(path: Path) -> Exposure:
    """Run ``systemd-analyze security --offline=yes`` on ``path``. Raises: AssertionError if
    it failed or printed no overall level."""
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match, done.stdout
    failing = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("✗")]
    return Exposure(float(match.group(1)), failing)


def documented_exposure() -> float:
    """The figure packaging/systemd/README.md states. Raises: AssertionError if none."""
    match = re.search(r"exposure level: \*\*(\d+\.\d)", README.read_text())
    assert match, "README.md states no 'exposure level: **N.N'"
    return float(match.group(1))


@requires_analyze
def test_the_exposure_is_at_most_the_documented_figure_and_each_gap_is_explained(
        tmp_path: Path) -> None:
    found = security(verifiable_copy(tmp_path, UNIT.read_text()))
    assert found.overall <= documented_exposure()
    readme = README.read_text().replace("\\|", "|")   # a table cell escapes |
    unexplained = [name for name in found.failing if f"`{name}`" not in readme]
    assert not unexplained, f"not explained in {README.name}: {unexplained}"


@requires_analyze
def test_the_exposure_figure_can_fail(tmp_path: Path) -> None:
    """The same unit without its sandbox scores worse than the documented figure."""
    weak = "\n".join(line for line in UNIT.read_text().splitlines()
                     if not line.startswith(("Protect", "Restrict", "SystemCall", "Private")))
    assert security(verifiable_copy(tmp_path, weak)).overall > documented_exposure()


def test_the_stop_timeout_outlasts_the_drain_and_the_supervisor() -> None:
    """TimeoutStopSec leaves the example settings' drain (grace + refusals) and the
    supervisor's SIGKILL of a late replica (grace + STOP_MARGIN) time to happen first."""
    settings = unit_settings(UNIT.read_text())
    timeout = float(settings["Service.TimeoutStopSec"][-1].removesuffix("s"))
    grace = load_config(EXAMPLE).server.grace_seconds
    assert timeout > grace + DRAIN_MAX
    assert timeout > grace + STOP_MARGIN
    assert settings["Service.KillMode"] == ["mixed"]   # SIGTERM to the main process only


def test_the_unit_and_the_example_settings_name_the_same_places() -> None:
    """ExecStart reads the example settings' installed path; its state_dir is the
    StateDirectory=, writable; its admin socket is in the RuntimeDirectory=."""
    settings = unit_settings(UNIT.read_text())
    config = load_config(EXAMPLE)
    (state,) = settings["Service.StateDirectory"]
    (runtime,) = settings["Service.RuntimeDirectory"]
    (configuration,) = settings["Service.ConfigurationDirectory"]
    assert config.state_dir == Path("/var/lib") / state
    assert str(config.state_dir) in settings["Service.ReadWritePaths"]
    assert config.server.admin_listen.startswith(f"unix:/run/{runtime}/")
    assert settings["Service.ExecStart"][0].endswith(
        f"serve --config /etc/{configuration}/{EXAMPLE.name}")
    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.NotifyAccess"] == ["main"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_makes_the_user_a_member_of_tss(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    user = next(line.split(":") for line in passwd.splitlines()
                if line.startswith("ticket-authority:"))
    assert int(user[2]) < 1000 and user[5] == "/var/lib/ticket-authority"
    assert user[6] == "/usr/sbin/nologin"
    groups = {line.split(":")[0]: line.split(":")[3]
              for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert "ticket-authority" in groups
    assert groups["tss"].split(",") == ["ticket-authority"]


# -- the notification protocol ---------------------------------------------------------------


class Manager:
    """The service manager's end: a datagram socket that receives notifications with their
    sender's credentials (as systemd checks NotifyAccess= against them)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout: float) -> tuple[dict[str, str], int]:
        """The next notification's assignments and its sender's pid. Raises: TimeoutError."""
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _address = self.sock.recvmsg(
            4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", value[:struct.calcsize("3i")])[0]
        fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
        return fields, pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(name="manager")
def manager_fixture(tmp_path: Path) -> Iterator[tuple[Manager, str]]:
    """A manager socket at a path, and the ``$NOTIFY_SOCKET`` value naming it."""
    path = tmp_path / "notify"
    manager = Manager(str(path))
    yield manager, str(path)
    manager.close()


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd/notify") == b"\0sd/notify"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert socket_address(unusable) is None


def test_claim_takes_the_variable_and_sends_to_an_abstract_socket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@ita-test-{os.getpid()}-{time.monotonic_ns()}"
    manager = Manager(b"\0" + name[1:].encode())
    try:
        monkeypatch.setenv(ENVIRONMENT, name)
        notifier = Notifier.claim()
        assert ENVIRONMENT not in os.environ   # a child started now does not inherit it
        notifier.ready("serving on\n127.0.0.1:1")
        fields, pid = manager.receive(5)
        assert fields == {"READY": "1", "STATUS": "serving on 127.0.0.1:1"}
        assert pid == os.getpid()
    finally:
        manager.close()


def test_without_a_manager_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    notifier = Notifier.claim()
    assert not notifier.enabled and not notifier.send("READY=1")


def test_a_manager_gone_is_logged_not_raised(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="authority.sdnotify"):
        assert not notifier.send("READY=1")
    assert "cannot notify the service manager" in caplog.text


def _start(tmp_path: Path, notify: str, extra: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """``ticket-authority serve`` on the embedded token, port 0, ``$NOTIFY_SOCKET`` =
    ``notify``; the process and its state directory."""
    state = tmp_path / "state"
    settings = tmp_path / "authority.toml"
    settings.write_text(f'state_dir = "{state}"\n[server]\nlisten = "127.0.0.1:0"\n'
                        f'metrics_listen = ""\n{extra}')
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "authority.cli", "serve", "--config",
                             str(settings)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, ENVIRONMENT: notify})
    log.close()
    return proc, state


def _answers_now(address: str) -> bool:
    """Whether a health check answers SERVING at once (no waiting for a connection)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5.0, wait_for_ready=False)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _until_ready(manager: Manager, proc: subprocess.Popen[bytes],
                 log: Path) -> list[tuple[dict[str, str], int]]:
    """The notifications up to and including READY=1. Raises: AssertionError with the log if
    the server exits or takes over 120 s."""
    received = []
    deadline = time.monotonic() + 120
    while not received or received[-1][0].get("READY") != "1":
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "no READY=1 in 120 s"
        try:
            received.append(manager.receive(0.2))
        except TimeoutError:
            continue
    return received


def _stop(manager: Manager, proc: subprocess.Popen[bytes]) -> list[tuple[dict[str, str], int]]:
    """SIGTERM the server; the notifications until it exited (status 0 checked)."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    received = []
    while True:
        try:
            received.append(manager.receive(0.5))
        except TimeoutError:
            return received


@requires_softhsm
def test_serve_is_ready_once_it_answers_and_stopping_on_sigterm(
        tmp_path: Path, manager: tuple[Manager, str]) -> None:
    receiver, notify = manager
    proc, state = _start(tmp_path, notify)
    try:
        before = _until_ready(receiver, proc, tmp_path / "serve.log")
        # the moment READY=1 arrives: server.json is there and a call is answered at once
        info = json.loads((state / "server.json").read_text())
        assert _answers_now(info["address"])
        assert [fields for fields, _ in before] == [
            {"READY": "1", "STATUS": f"serving on {info['address']}"}]
        after = _stop(receiver, proc)
    finally:
        proc.kill()
        proc.wait()
    assert [fields.get("STOPPING") for fields, _ in after] == ["1"]
    assert "draining" in after[0][0]["STATUS"]
    assert {pid for _, pid in before + after} == {proc.pid}   # NotifyAccess=main suffices


def _descendants(pid: int) -> list[int]:
    """The live children of ``pid`` (one level), from /proc."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@requires_softhsm
def test_a_supervisor_is_ready_once_every_replica_serves(tmp_path: Path) -> None:
    name = f"ita-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = Manager(b"\0" + name.encode())
    proc, state = _start(tmp_path, f"@{name}", "processes = 2\n")
    try:
        before = _until_ready(receiver, proc, tmp_path / "serve.log")
        info = json.loads((state / "server.json").read_text())
        assert len(info["replicas"]) == 2
        assert _answers_now(info["address"])
        assert before[-1][0]["STATUS"] == f"serving on {info['address']}: 2 of 2 replicas"
        for replica in info["replicas"]:
            assert replica["pid"] in _descendants(proc.pid)
            environ = Path(f"/proc/{replica['pid']}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith(ENVIRONMENT.encode()) for v in environ)
        after = _stop(receiver, proc)
    finally:
        proc.kill()
        proc.wait()
        receiver.close()
    assert [fields.get("STOPPING") for fields, _ in after] == ["1"]
    assert {pid for _, pid in before + after} == {proc.pid}


# -- two of the unit's restrictions, rehearsed without systemd -------------------------------

#: what runs ``serve`` under the kernel's own write-xor-execute rule (PR_SET_MDWE, Linux 6.3+,
#: kept across exec and fork: the rule MemoryDenyWriteExecute=yes enforces with seccomp) and a
#: /proc of processes only (ProcSubset=pid), in a mount namespace of its own
_WX = ("import ctypes, os, sys; "
       "assert ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) == 0; "
       "os.execv(sys.argv[1], sys.argv[1:])")
_SANDBOX = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t proc -o subset=pid proc /proc && exec "$@"', "sh",
            sys.executable, "-c", _WX, sys.executable]


def _sandbox_refusal() -> str | None:
    """Why the rehearsal cannot run here (None: it can): it needs root (a mount namespace)
    and a kernel with PR_SET_MDWE."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare (a mount namespace for /proc subset=pid)"
    probe = subprocess.run([*_SANDBOX, "-c", "pass"], capture_output=True, text=True,
                           timeout=30, check=False)
    return None if probe.returncode == 0 else f"no PR_SET_MDWE or no mount: {probe.stderr}"


def test_the_rehearsal_sandbox_refuses_what_the_unit_refuses() -> None:
    """Within it, a writable and executable mapping is refused and /proc/cpuinfo is gone:
    the rehearsal below can fail."""
    refusal = _sandbox_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    done = subprocess.run([*_SANDBOX, "-c",
                           "import mmap, os\n"
                           "print(os.path.exists('/proc/cpuinfo'), "
                           "os.path.exists('/proc/self/status'))\n"
                           "mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout.split() == ["False", "True"]
    assert done.returncode != 0 and "PermissionError" in done.stderr


class SandboxedServe(ServeProcess):
    """``serve`` run within the rehearsal sandbox."""

    def command(self, *argv: str) -> list[str]:
        return [*_SANDBOX, *super().command(*argv)[1:]]


@requires_softhsm
@pytest.mark.parametrize("backend", ["pkcs11", pytest.param("tpm", marks=requires_tpm)])
def test_serve_works_without_writable_executable_memory_and_with_a_pid_only_proc(
        tmp_path: Path, backend: str) -> None:
    """MemoryDenyWriteExecute=yes and ProcSubset=pid hold for the server, its device
    processes, the embedded SoftHSM2 token and the embedded swtpm: it starts, issues and
    redeems, stops cleanly."""
    refusal = _sandbox_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    server = SandboxedServe(tmp_path, "a", single_settings(tmp_path / "a", backend))
    try:
        server.serve()
        assert round_trip(server), server.log_tail()
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0, server.log_tail()
