"""The embedded software TPM: a ``swtpm`` child process on Unix sockets in its state directory.

Used when ``tpm.tcti`` is not set (development, tests, single-host deployments without a TPM).
The TPM state lives in a private (0700) directory and survives restarts, so key blobs made under
it keep loading. The swtpm listens on no TCP port: its data channel (``tpm.sock``, TCTI
``swtpm:path=...``) and its control channel (``tpm.sock.ctrl``: the name the swtpm TCTI derives)
are Unix sockets (0600) inside that directory, so only the service's user (and root) can send it
commands or stop it. It runs with a minimal environment (no secret of the service's).

This module talks to the swtpm only with two raw TPM 2.0 commands (GetRandom as the readiness
probe, Shutdown before stopping); everything else goes through tpm2-pytss in the backend. A TPM
stopped without TPM2_Shutdown counts as an unclean shutdown (dictionary-attack state), so
:meth:`SwtpmProcess.stop` sends TPM2_Shutdown(CLEAR) first.

Supervised (:meth:`SwtpmProcess.start` with ``supervised=True``, what the server does): a
thread waits for the swtpm to exit and starts it again on the same state, at once the first
time, then after a delay doubling from ``_RESTART_FIRST`` to ``_RESTART_MAX`` while it keeps
dying within ``_STABLE_AFTER`` of its start (a crash loop is not a busy loop). The backend's
reconnection (connection.py, at most 0.25 s apart) finds it again; until then calls fail
UNAVAILABLE (and health turns NOT_SERVING after a second of that). Each restart is logged once
(WARNING).

What it protects: the state directory holds the TPM's seeds, so a copy of it opens the key
blobs elsewhere; the embedded swtpm is a development default, not hardware protection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Final

from authority.backends.processes.environment import child_environment
from authority.errors import StartupError

__all__ = ["SwtpmProcess"]

log = logging.getLogger(__name__)

PID_FILE: Final = "swtpm.pid"
OWNER_FILE: Final = "swtpm.owner"   # "<pid> <start time>" of the process that started it
LOG_FILE: Final = "swtpm.log"
SOCKET_FILE: Final = "tpm.sock"      # the data channel; the control channel is this + ".ctrl"
_CTRL_SUFFIX: Final = ".ctrl"        # what the swtpm TCTI appends for the control channel
_SUN_PATH_MAX: Final = 107           # octets of a Unix socket path (sun_path less its NUL)
_READY_TIMEOUT: Final = 5.0
_STOP_TIMEOUT: Final = 5.0
_RESTART_FIRST: Final = 0.05   # seconds before the second restart of a swtpm that keeps dying,
_RESTART_MAX: Final = 5.0      # doubling up to this
_STABLE_AFTER: Final = 1.0     # a swtpm that ran this long did not die at once: restarted
                               # at once again

# TPM 2.0 wire constants for the two raw commands
_TPM_ST_NO_SESSIONS: Final = 0x8001
_TPM_CC_GET_RANDOM: Final = 0x17B
_TPM_CC_SHUTDOWN: Final = 0x145
_TPM_SU_CLEAR: Final = 0x0000
_TPM_RC_SUCCESS: Final = 0x000
_TPM_RC_INITIALIZE: Final = 0x100


def _tpm_command(path: Path, command: bytes, timeout: float = 2.0) -> int:
    """Send one raw TPM 2.0 command to the swtpm data socket ``path``; return the response code.

    Raises: OSError (no such socket, connection refused, timeout, short response).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(command)
        header = b""
        while len(header) < 10:
            chunk = conn.recv(4096)
            if not chunk:
                raise OSError("swtpm closed the connection before answering")
            header += chunk
    _tag, _size, rc = struct.unpack(">HII", header[:10])
    return int(rc)


def _get_random_command() -> bytes:
    return struct.pack(">HIIH", _TPM_ST_NO_SESSIONS, 12, _TPM_CC_GET_RANDOM, 8)


def _shutdown_command() -> bytes:
    return struct.pack(">HIIH", _TPM_ST_NO_SESSIONS, 12, _TPM_CC_SHUTDOWN, _TPM_SU_CLEAR)


def _check_socket_path(state_dir: Path) -> None:
    """Refuse a state directory whose control socket path a Unix socket cannot have (too long)
    or that the swtpm's and the TCTI's ``key=value,...`` options cannot carry (a comma).

    Raises: StartupError naming state_dir.
    """
    ctrl = str(state_dir / (SOCKET_FILE + _CTRL_SUFFIX))
    if len(ctrl.encode()) > _SUN_PATH_MAX:
        raise StartupError(
            f"state_dir: the embedded swtpm's socket {ctrl} is too long for a Unix socket "
            f"({len(ctrl.encode())} octets, at most {_SUN_PATH_MAX}): use a shorter state_dir, "
            "or set tpm.tcti to a TPM")
    if "," in str(state_dir):
        raise StartupError(f"state_dir: the embedded swtpm cannot use {state_dir}: its path "
                           "contains a comma (swtpm and TCTI options are comma-separated)")


def _private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing and make it 0700. Raises: OSError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


class SwtpmProcess:
    """A running ``swtpm socket --tpm2`` child listening on ``state_dir/tpm.sock`` (data) and
    ``state_dir/tpm.sock.ctrl`` (control)."""

    def __init__(self, state_dir: Path, process: subprocess.Popen[bytes],
                 log_file: IO[bytes]) -> None:
        """Use :meth:`start`."""
        self.state_dir = state_dir
        self.socket_path = state_dir / SOCKET_FILE
        self.ctrl_path = state_dir / (SOCKET_FILE + _CTRL_SUFFIX)
        self._process = process
        self._log_file = log_file
        self._started = time.monotonic()
        self._lock = threading.Lock()        # the process swapped by a restart vs. stop
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<SwtpmProcess pid={self.pid} state={str(self.state_dir)!r}>"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def tcti(self) -> str:
        """The TCTI string that reaches this swtpm (also for tpm2-tools' TPM2TOOLS_TCTI)."""
        return f"swtpm:path={self.socket_path}"

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    @property
    def supervised(self) -> bool:
        """Whether a thread starts this swtpm again when it exits."""
        return self._supervisor is not None

    # -- start ---------------------------------------------------------------------------------

    @classmethod
    def start(cls, state_dir: Path, supervised: bool = False) -> SwtpmProcess:
        """Start a swtpm with its state and its sockets in ``state_dir`` (created 0700); wait
        until it answers. ``supervised``: start it again whenever it exits, until :meth:`stop`.

        The flags ``not-need-init,startup-clear`` make the TPM usable at once. A swtpm orphaned
        on the same state directory by a killed process (the process that started it is gone)
        is stopped first; one still owned by a live process is refused.
        Raises: StartupError naming tpm.tcti (swtpm missing, exited, never answered) or
        state_dir (cannot be created; a path a Unix socket cannot have).
        """
        binary = shutil.which("swtpm")
        if binary is None:
            raise StartupError(
                "tpm.tcti: not set, and the embedded TPM needs swtpm, which is not installed "
                "(apt-get install swtpm swtpm-tools), or set tpm.tcti to a TPM "
                "(e.g. 'device:/dev/tpmrm0')"
            )
        state_dir = state_dir.absolute()
        _check_socket_path(state_dir)
        try:
            _private_dir(state_dir)
        except OSError as exc:
            raise StartupError(f"state_dir: cannot create swtpm state dir {state_dir}: "
                               f"{exc.strerror}") from exc
        _stop_orphan(state_dir)
        started = cls._launch(binary, state_dir)
        log.info("embedded swtpm started: pid %d, sockets and state in %s", started.pid,
                 state_dir)
        if supervised:
            started._supervisor = threading.Thread(
                target=started._supervise, args=(binary,), daemon=True,
                name=f"swtpm-supervisor[{started.pid}]")
            started._supervisor.start()
        return started

    @classmethod
    def _launch(cls, binary: str, state_dir: Path) -> SwtpmProcess:
        """Start it and wait for GetRandom to succeed.

        Raises: StartupError naming tpm.tcti (it exited, refused GetRandom, never answered).
        """
        log_path = state_dir / LOG_FILE
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log_file = os.fdopen(fd, "ab")
        data = state_dir / SOCKET_FILE
        argv = [
            binary, "socket", "--tpm2",
            "--server", f"type=unixio,path={data},mode=0600",
            "--ctrl", f"type=unixio,path={data}{_CTRL_SUFFIX},mode=0600",
            "--tpmstate", f"dir={state_dir},mode=0600",
            "--flags", "not-need-init,startup-clear",
            "--pid", f"file={state_dir / PID_FILE}",
        ]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, close_fds=True,
                                   env=child_environment())
        swtpm = cls(state_dir, process, log_file)
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log_file.close()
                raise _not_started(f"exited with status {process.returncode} "
                                   f"({_tail(log_path)})")
            try:
                rc = _tpm_command(data, _get_random_command(), timeout=1.0)
            except OSError:
                time.sleep(0.005)
                continue
            if rc == _TPM_RC_SUCCESS:
                _write_owner(state_dir)
                return swtpm
            problem = f"the TPM answered 0x{rc:x} to GetRandom"
            break
        else:
            problem = f"no answer on {data} within {_READY_TIMEOUT:g}s"
        swtpm._terminate()
        raise _not_started(problem)

    # -- supervision (its own thread) ----------------------------------------------------------

    def _supervise(self, binary: str) -> None:
        """Wait for the swtpm to exit; start it again until :meth:`stop`. Never raises."""
        attempts = 0   # restarts since the swtpm last ran _STABLE_AFTER seconds
        while True:
            process = self._process
            process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - self._started >= _STABLE_AFTER:
                attempts = 0
            with self._lock:
                self._reap()
            ended = _exit_description(process.returncode)
            gone = f"the embedded swtpm (pid {process.pid}) exited ({ended})"
            while not self._restart(binary, gone, attempts):
                attempts += 1
                if self._stopping.is_set():
                    return
            attempts += 1

    def _restart(self, binary: str, gone: str, attempts: int) -> bool:
        """Start the swtpm again after the delay ``attempts`` calls for; whether it runs (also
        True when stopped meanwhile: nothing to do). Never raises."""
        delay = 0.0 if attempts == 0 else min(_RESTART_MAX, _RESTART_FIRST * 2 ** (attempts - 1))
        if self._stopping.wait(delay):
            return True
        try:
            fresh = self._launch(binary, self.state_dir)
        except (StartupError, OSError) as exc:
            log.warning("%s; starting it again failed (attempt %d, next in %g s): %s", gone,
                        attempts + 1, min(_RESTART_MAX, _RESTART_FIRST * 2 ** attempts), exc)
            return False
        with self._lock:
            if self._stopping.is_set():
                fresh.stop()
                return True
            self._process, self._log_file = fresh._process, fresh._log_file
            self._started = time.monotonic()
        log.warning("%s; started again on its state", gone)
        return True

    # -- stop ----------------------------------------------------------------------------------

    def shutdown_tpm(self) -> bool:
        """Send TPM2_Shutdown(CLEAR) so the next start is an orderly one; False if it failed."""
        try:
            rc = _tpm_command(self.socket_path, _shutdown_command())
        except OSError as exc:
            log.warning("swtpm in %s: TPM2_Shutdown not sent: %s", self.state_dir, exc)
            return False
        if rc not in (_TPM_RC_SUCCESS, _TPM_RC_INITIALIZE):
            log.warning("swtpm in %s: TPM2_Shutdown answered 0x%x", self.state_dir, rc)
            return False
        return True

    def stop(self) -> None:
        """End supervision, then TPM2_Shutdown(CLEAR), then SIGTERM (SIGKILL after 5 s);
        idempotent."""
        self._stopping.set()
        with self._lock:   # a restart under way finishes (and stops its swtpm) first
            if self.running:
                self.shutdown_tpm()
            self._terminate()
        if self._supervisor is not None:
            self._supervisor.join(_READY_TIMEOUT + _STOP_TIMEOUT)
        log.info("embedded swtpm stopped (%s)", self.state_dir)

    def kill(self) -> None:
        """SIGKILL without TPM2_Shutdown: what a crash looks like (tests). A supervised swtpm
        is started again."""
        with self._lock:
            if self.running:
                self._process.kill()
            if self._supervisor is None:
                self._reap()

    def _terminate(self) -> None:
        if self.running:
            self._process.terminate()
            try:
                self._process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("swtpm pid %d ignored SIGTERM; killing it", self.pid)
                self._process.kill()
        self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(_STOP_TIMEOUT)
        self._log_file.close()
        pid_file = self.state_dir / PID_FILE
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text("ascii").strip()) == self.pid:
                pid_file.unlink()
                (self.state_dir / OWNER_FILE).unlink(missing_ok=True)


def _exit_description(returncode: int | None) -> str:
    """How a process ended: "signal 9", "status 1"."""
    if returncode is not None and returncode < 0:
        return f"signal {-returncode}"
    return f"status {returncode}"


def _not_started(problem: str) -> StartupError:
    return StartupError(f"tpm.tcti: the embedded swtpm did not start: {problem}")


def _tail(path: Path, limit: int = 300) -> str:
    """The last ``limit`` characters of a log file, on one line."""
    try:
        text = path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return "no log"
    return " ".join(text.split()) or "no output"


def _identity(pid: int) -> str | None:
    """"<pid> <start time>" of a live process (the start time tells a reused pid apart)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text("ascii", "replace")
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[-1].split()
    return f"{pid} {fields[19]}" if len(fields) > 19 else None


def _write_owner(state_dir: Path) -> None:
    """Record this process as the swtpm's owner (read by :func:`_stop_orphan`)."""
    with contextlib.suppress(OSError):
        (state_dir / OWNER_FILE).write_text(f"{_identity(os.getpid()) or os.getpid()}\n",
                                            "ascii")


def _stop_orphan(state_dir: Path) -> None:
    """Stop a swtpm left running on ``state_dir`` by a killed process (it holds the state lock).

    The swtpm is found by its pid file and must be a swtpm on this state dir; it is stopped only
    if the process recorded as its owner is gone (by pid and start time, so a reused pid or a
    subreaper adopting the orphan does not fool the check).
    Raises: StartupError if its owner is still running (another backend uses this state dir).
    """
    pid_file = state_dir / PID_FILE
    try:
        pid = int(pid_file.read_text("ascii").strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return  # none recorded, or not running any more
    if not _alive(pid) or not cmdline[0].endswith(b"swtpm") or \
            not any(str(state_dir).encode() in arg for arg in cmdline):
        return  # gone, or the pid was reused by something else
    try:
        owner = (state_dir / OWNER_FILE).read_text("ascii").strip()
    except OSError:
        owner = ""
    owner_pid = int(owner.split()[0]) if owner[:1].isdigit() else 0
    if owner and owner_pid and _identity(owner_pid) == owner:
        raise StartupError(
            f"tpm.tcti: the embedded swtpm on {state_dir} (pid {pid}) is still in use by process "
            f"{owner_pid}; two backends cannot share one state_dir"
        )
    log.warning("stopping swtpm pid %d left running on %s by a process that is gone", pid,
                state_dir)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.01)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text("ascii", "replace")
    except OSError:
        return False
    return "State:\tZ" not in status
