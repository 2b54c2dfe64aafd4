"""Two network namespaces joined by a veth pair, for tests that run a real IKE peer (pluto) on
one side and our gateway on the other; and a UDP socket opened inside a namespace from this
process, which itself stays in the root namespace (where the authority listens on 127.0.0.1).

    client namespace (pluto)  192.0.2.1/24 --veth-- 192.0.2.2/24  gateway namespace

Namespace names carry this process's pid and a counter, so parallel test processes do not
collide; both are removed on exit, also after a failure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from types import TracebackType

CLIENT_ADDRESS = "192.0.2.1"
GATEWAY_ADDRESS = "192.0.2.2"
PREFIX_LENGTH = 24
NETNS_DIR = Path("/run/netns")   # where `ip netns add` bind-mounts a namespace
CLONE_NEWNET = 0x40000000
_COUNTER = itertools.count()


class NetnsError(RuntimeError):
    """An `ip` command or setns(2) failed."""


def ip(*args: str, namespace: str | None = None) -> str:
    """Run ``ip ARGS`` (inside ``namespace`` when given) and return its stdout.

    Raises NetnsError with ip's stderr when it exits non-zero."""
    argv = ["ip", *args] if namespace is None else ["ip", "-n", namespace, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def can_create_netns() -> tuple[bool, str]:
    """Whether this process can create (and delete) a network namespace, and why not."""
    if shutil.which("ip") is None:
        return False, "the ip program (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    probe = f"ita-probe-{os.getpid()}-{next(_COUNTER)}"
    try:
        ip("netns", "add", probe)
    except NetnsError as exc:
        return False, f"cannot create a network namespace here: {exc}"
    try:
        ip("netns", "delete", probe)
    except NetnsError as exc:
        return False, f"created a network namespace but cannot delete it: {exc}"
    return True, ""


class NetnsPair:
    """The client and gateway namespaces, the veth between them and their addresses.

    Use as a context manager; ``__enter__`` raises NetnsError (after removing whatever it
    had created) when a step fails."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{next(_COUNTER)}"
        self.client = f"ita-client-{tag}"
        self.gateway = f"ita-gw-{tag}"
        self.client_if = "veth-client"    # each lives in its own namespace: no clash
        self.gateway_if = "veth-gw"
        self.client_address = CLIENT_ADDRESS
        self.gateway_address = GATEWAY_ADDRESS
        self._created: list[str] = []

    def __enter__(self) -> NetnsPair:
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.remove()

    def _create(self) -> None:
        for name in (self.client, self.gateway):
            ip("netns", "add", name)
            self._created.append(name)
        ip("link", "add", self.client_if, "netns", self.client, "type", "veth",
           "peer", "name", self.gateway_if, "netns", self.gateway)
        for name, interface, address in ((self.client, self.client_if, self.client_address),
                                         (self.gateway, self.gateway_if,
                                          self.gateway_address)):
            ip("link", "set", "lo", "up", namespace=name)
            ip("address", "add", f"{address}/{PREFIX_LENGTH}", "dev", interface,
               namespace=name)
            ip("link", "set", interface, "up", namespace=name)

    def exec_argv(self, namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace`` (through ``ip netns exec``)."""
        return ["ip", "netns", "exec", namespace, *argv]

    def remove(self) -> None:
        """Delete the namespaces created (the veth goes with them). Raises NetnsError when
        one cannot be deleted; the others are still tried."""
        failures = []
        while self._created:
            name = self._created.pop()
            try:
                ip("netns", "delete", name)
            except NetnsError as exc:
                failures.append(str(exc))
        if failures:
            raise NetnsError("; ".join(failures))


def _setns(path: Path) -> None:
    """Move the calling thread into the network namespace bound at ``path``.

    Raises NetnsError with errno's text."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NetnsError(f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def udp_socket_in(namespace: str, address: str, port: int) -> socket.socket:
    """A UDP socket bound to ``address``:``port`` inside ``namespace``.

    A short-lived thread enters the namespace with setns(2), creates and binds the socket and
    ends; the socket keeps its namespace, this process's other threads stay where they are.
    Raises NetnsError when setns fails, OSError when the bind does."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def inside() -> None:
        try:
            _setns(NETNS_DIR / namespace)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((address, port))
            except OSError:
                sock.close()
                raise
            made.append(sock)
        except BaseException as exc:   # handed to the calling thread, raised there
            failed.append(exc)

    thread = threading.Thread(target=inside, name=f"setns-{namespace}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]
