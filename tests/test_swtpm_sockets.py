"""The embedded swtpm listens on no TCP port: its data and control channels are Unix sockets
inside its 0700 state directory, so another local user cannot reach them (no TPM commands, no
shutdown through the control channel). Read from /proc (no tool needed); real swtpm, real
TPM process. The TPM process mode (``server.device_processes = 1``) reconnects a replaced process
to the same swtpm. And what the embedded swtpm does not protect: a copy of the state directory
holds the TPM's seeds, so the key blobs open with the copy elsewhere."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from authority.errors import DeviceUnavailable, StartupError
from authority.ticket_format import encode_header
from tests.conftest import process_gone, wait_until
from tests.tpm_fixtures import HAVE_PYTSS, HAVE_SWTPM, requires_tpm

pytestmark = requires_tpm
if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.processes.remote import RemoteBackend
    from authority.backends.tpm import SwtpmProcess, open_tpm_backend
    from authority.backends.tpm.process import open_tpm_process
    from authority.config import TpmSettings

KID = b"S" * 8
HEADER = encode_header(KID, 2)
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp
_UNIX_LISTENING = 1 << 16  # __SO_ACCEPTCON in /proc/net/unix flags


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of every socket ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _tcp_listeners() -> set[int]:
    """Inodes of every listening TCP socket (IPv4 and IPv6) of this network namespace."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN:
                found.add(int(fields[9]))
    return found


def _unix_listeners() -> dict[int, str]:
    """Inode -> path of every listening Unix socket bound to a path."""
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & _UNIX_LISTENING:
            found[int(fields[6])] = fields[7]
    return found


def _check_private_sockets(pid: int, state_dir: Path) -> list[Path]:
    """Assert the swtpm ``pid`` has no TCP listener and listens only on Unix sockets in its
    0700 state directory; return their paths."""
    held = _socket_inodes(pid)
    assert not held & _tcp_listeners(), "the embedded swtpm listens on TCP"
    unix = _unix_listeners()
    paths = [Path(unix[inode]) for inode in held if inode in unix]
    assert len(paths) == 2, paths  # data and control
    for path in paths:
        assert path.parent == state_dir, path
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    return paths


def test_embedded_swtpm_listens_on_no_tcp_port(tmp_path: Path) -> None:
    backend = open_tpm_backend(TpmSettings(), tmp_path / "tpm")
    try:
        swtpm = backend.swtpm
        assert swtpm is not None
        paths = _check_private_sockets(swtpm.pid, swtpm.state_dir)
        assert sorted(p.name for p in paths) == ["tpm.sock", "tpm.sock.ctrl"]
        assert swtpm.tcti == f"swtpm:path={swtpm.state_dir / 'tpm.sock'}"
        backend.create_key(KID)
        assert backend.unseal(KID, HEADER, backend.seal(KID, HEADER, b"x")) == b"x"
    finally:
        backend.close()
    assert not swtpm.running
    assert not any(p.exists() for p in paths)  # swtpm removes them when it stops


def _connect_as(path: Path, user: int | None) -> str:
    """Try to connect to the Unix socket ``path`` from a forked process, as ``user`` (uid and
    gid, no supplementary groups) if given: "connected" or "refused"."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # only system calls here, then _exit
        answer = b"error"
        try:
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            answer = b"connected"
        except PermissionError:
            answer = b"refused"
        finally:
            os.write(write_end, answer)
            os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(child, 0)


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every local user may enter (tmp_path's parents are private to us, so they
    would hide the swtpm's own permissions); removed after the test."""
    parent = Path(tempfile.mkdtemp(prefix="swtpm-sockets-"))
    os.chmod(parent, 0o755)  # noqa: S103  (the point: other users can walk up to the state dir)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_cannot_reach_the_control_channel(open_parent: Path) -> None:
    swtpm = SwtpmProcess.start(open_parent / "swtpm")
    nobody = 65534
    try:
        _check_private_sockets(swtpm.pid, swtpm.state_dir)
        assert _connect_as(swtpm.ctrl_path, None) == "connected"   # the path is right
        assert _connect_as(swtpm.ctrl_path, nobody) == "refused"
        assert _connect_as(swtpm.socket_path, nobody) == "refused"
        # a directory others may traverse: the sockets (0600) still refuse them
        os.chmod(swtpm.state_dir, 0o711)  # noqa: S103
        assert _connect_as(swtpm.ctrl_path, nobody) == "refused"
        # the control: with both opened, nobody gets in (so the refusals above were ours)
        os.chmod(swtpm.ctrl_path, 0o666)  # noqa: S103
        assert _connect_as(swtpm.ctrl_path, nobody) == "connected"
        os.chmod(swtpm.ctrl_path, 0o600)
        os.chmod(swtpm.state_dir, 0o700)
        assert swtpm.running and swtpm.shutdown_tpm()
    finally:
        swtpm.stop()


def test_tpm_process_reconnects_to_the_same_embedded_swtpm(tmp_path: Path) -> None:
    state = tmp_path / "tpm" / "swtpm"
    backend = open_tpm_process(TpmSettings(), tmp_path / "tpm", "WARNING")
    try:
        swtpm_pid = int((state / "swtpm.pid").read_text())
        _check_private_sockets(swtpm_pid, state)
        backend.create_key(KID)
        sealed = backend.seal(KID, HEADER, b"kept")
        pid = backend.pids()[0]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_gone(pid))
        wait_until(lambda: _unsealed(backend, sealed) == b"kept")
        assert backend.pids() and backend.pids()[0] != pid
        assert int((state / "swtpm.pid").read_text()) == swtpm_pid   # the same swtpm
        _check_private_sockets(swtpm_pid, state)
    finally:
        backend.close()
    assert process_gone(swtpm_pid)


def _unsealed(backend: RemoteBackend, sealed: bytes) -> bytes | None:
    """The plaintext, or None while the replaced process is not attached yet."""
    try:
        return backend.unseal(KID, HEADER, sealed)
    except DeviceUnavailable:
        return None


def test_a_socket_path_too_long_is_refused_naming_state_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "swtpm"
    with pytest.raises(StartupError, match=r"^state_dir: .*too long"):
        SwtpmProcess.start(deep)


def test_a_copy_of_the_embedded_swtpm_state_opens_the_tickets_elsewhere(tmp_path: Path) -> None:
    """Not a protection, a limit the threat model states: the embedded swtpm's state (its
    seeds) is in state_dir, so a copy of it is as good as the TPM (a real TPM's is not)."""
    backend = open_tpm_backend(TpmSettings(), tmp_path / "here" / "tpm")
    try:
        backend.create_key(KID)
        sealed = backend.seal(KID, HEADER, b"not bound to this host")
    finally:
        backend.close()
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere")
    copy = open_tpm_backend(TpmSettings(), tmp_path / "elsewhere" / "tpm")
    try:
        assert copy.unseal(KID, HEADER, sealed) == b"not bound to this host"
    finally:
        copy.close()
