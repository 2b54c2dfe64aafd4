"""One device process as the service sees it: start it, wait for it, call it, end it."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from typing import Any

from authority.backends.processes.channel import Channel
from authority.backends.processes.environment import child_environment
from authority.backends.processes.wire import WireError, decode_reply
from authority.config import Secret
from authority.errors import DeviceUnavailable, InvalidTicket, StartupError

log = logging.getLogger("authority.backends.processes")


def spawn_child(module: str, extra_fds: tuple[int, ...] = (),
                process_group: int | None = None,
                ) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start ``python -m module FD`` with the device processes' minimal environment
    (environment.py) and one end of a new socket pair as FD (plus ``extra_fds`` inherited);
    returns the process and our end. Raises: OSError (nothing is left open)."""
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno())],
            pass_fds=(theirs.fileno(), *extra_fds), stdin=subprocess.DEVNULL,
            env=child_environment(device_process=True), process_group=process_group)
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


class DeviceProcess:
    """A child process with its own device session, reached over a socket pair."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel

    @classmethod
    def spawn(cls, index: int) -> DeviceProcess:
        """Start the child (it imports its modules, then waits for ``hello``), with a minimal
        environment (environment.py: nothing of ours it does not need, no secret).

        Raises: StartupError (the process cannot be started).
        """
        try:
            proc, ours = spawn_child("authority.backends.processes.child")
        except OSError as exc:
            raise StartupError(f"server.device_processes: cannot start a device process: "
                               f"{exc.strerror}") from exc
        return cls(index, proc, Channel(ours))

    def open(self, hello: dict[str, Any], timeout: float) -> None:
        """Send the settings (a ``Secret`` is revealed only into this message) and wait until
        the child has opened its session.

        Raises: StartupError with the child's reason.
        """
        self.channel.sock.settimeout(timeout)
        try:
            settings = {k: v.reveal() if isinstance(v, Secret) else v for k, v in hello.items()}
            self.channel.send(json.dumps({**settings, "index": self.index}).encode())
        except OSError as exc:
            self.kill()
            raise StartupError(f"server.device_processes: device process {self.index} exited "
                               f"at start ({exc})") from exc
        try:
            decode_reply(self.channel.recv())  # an empty RESULTS reply: the session is open
        except DeviceUnavailable as exc:  # the child's StartupError, message kept
            self.kill()
            raise StartupError(exc.message) from None
        except (EOFError, OSError, WireError) as exc:
            self.kill()
            raise StartupError(f"server.device_processes: device process {self.index} did "
                               f"not start ({type(exc).__name__}: {exc})") from exc
        log.debug("device process %d (pid %d) ready", self.index, self.proc.pid)

    def call(self, payload: bytes, timeout: float) -> list[bytes | InvalidTicket]:
        """Send one request and return its results.

        Raises: DeviceUnavailable, KeyNotFound (the whole request failed in the device);
        BrokenProcess (the process died, timed out or answered garbage: replace it).
        """
        self.channel.sock.settimeout(timeout)
        try:
            self.channel.send(payload)
            reply = self.channel.recv()
        except (EOFError, OSError, WireError) as exc:
            raise BrokenProcess(f"device process {self.index} (pid {self.proc.pid}) failed: "
                                f"{type(exc).__name__}: {exc}") from exc
        try:
            return decode_reply(reply)
        except WireError as exc:
            raise BrokenProcess(f"device process {self.index} sent a bad reply: {exc}") from exc

    def alive(self) -> bool:
        """Whether the child is still running. Never raises."""
        return self.proc.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        """Close the channel (the child logs out and exits), then wait; kill it if it does not
        exit within ``timeout``. Never raises."""
        self.channel.close()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.proc.poll() is None:
            log.warning("device process %d did not exit; killing it", self.index)
            self.kill()

    def kill(self) -> None:
        """SIGKILL the child and reap it. Never raises."""
        self.channel.close()
        try:
            self.proc.kill()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass


class BrokenProcess(DeviceUnavailable):
    """A device process died, hung or broke the protocol; its request failed and it must be
    replaced."""


def checked(results: list[bytes | InvalidTicket], count: int, index: int
            ) -> list[bytes | InvalidTicket]:
    """``results`` if device process ``index`` answered ``count`` of them.
    Raises: DeviceUnavailable otherwise."""
    if len(results) != count:
        raise DeviceUnavailable(f"device process {index} returned {len(results)} results "
                                f"for {count} items")
    return results


def sealed(results: list[bytes | InvalidTicket]) -> list[bytes]:
    """Seal results. Raises: DeviceUnavailable if one came back as an item error."""
    if not all(isinstance(r, bytes) for r in results):
        raise DeviceUnavailable("device process returned an item error for a seal")
    return results  # type: ignore[return-value]  # checked above
