"""A ``ticket-authority serve`` process for the benches and the chaos scenarios: its state
directory, its configuration file, its log, the commands run for it, stubs to reach it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    authority_pb2_grpc,
)

CALL = 10.0              # the deadline of one call


def listening_address(proc: subprocess.Popen[Any], state: Path, timeout: float,
                      describe: Callable[[], str]) -> str:
    """The address ``serve`` process ``proc`` wrote to ``state``/server.json once it listens.

    Raises: AssertionError with ``describe()`` if it exits first or takes over ``timeout``."""
    deadline = time.monotonic() + timeout
    info = state / "server.json"
    while True:
        assert proc.poll() is None, f"exited: {describe()}"
        assert time.monotonic() < deadline, f"not serving in {timeout} s: {describe()}"
        try:
            found = json.loads(info.read_text())
        except (OSError, ValueError):
            found = {}
        if found.get("pid") == proc.pid:
            return str(found["address"])
        time.sleep(0.05)


class ServeProcess:
    """One server: ``directory``/``name`` its state directory, ``name``.toml its configuration
    (``settings``: TOML text), ``name``.log what it printed; started by :meth:`serve`."""

    def __init__(self, directory: Path, name: str, settings: str) -> None:
        self.name = name
        self.state = directory / name
        self.config = directory / f"{name}.toml"
        self.config.write_text(settings)
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}          # added to the environment of ``serve``
        self.address = ""
        self._channel: grpc.Channel | None = None

    def command(self, *argv: str) -> list[str]:
        """The argv of ``ticket-authority ARGV --config <this server's>``."""
        return [sys.executable, "-m", "authority.cli", *argv, "--config", str(self.config)]

    def cli(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a ``ticket-authority`` command for this server; its result (not checked)."""
        return subprocess.run(self.command(*argv), capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def serve(self, timeout: float = 90.0) -> None:
        """Start ``serve`` and wait until it answers GetStatus.

        Raises: AssertionError with its log if it exits or takes longer."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command("serve"), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env} if self.env else None)
        self.address = listening_address(self.proc, self.state, timeout,
                                         lambda: f"{self.name}:\n{self.log_tail()}")
        self.close_channel()
        self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=CALL, wait_for_ready=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def tickets(self) -> authority_pb2_grpc.TicketAuthorityStub:
        return authority_pb2_grpc.TicketAuthorityStub(self.channel())

    @property
    def admin(self) -> admin_pb2_grpc.TicketAdminStub:
        return admin_pb2_grpc.TicketAdminStub(self.channel())

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server process (if it runs). Never raises."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM the server (SIGKILL after 30 s). Never raises."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the server and reap it. Never raises."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0,
             poll: float = 0.02) -> float:
    """Poll ``check`` until true; seconds it took. Raises: AssertionError naming ``what``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(poll)
    return time.monotonic() - start


_LIST_KEYS = """
import sys, pkcs11
from pkcs11 import Attribute, ObjectClass
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
with token.open(user_pin=sys.stdin.read().strip()) as session:
    for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        if key[Attribute.LABEL].startswith("ita-"):
            print(bytes(key[Attribute.ID]).hex())
"""


def token_key_ids(module: Path, label: str, pin: str, softhsm2_conf: Path | None) -> set[str]:
    """The ids (hex) of the ticket keys a token holds, listed by python-pkcs11 in a process of
    its own (SoftHSM2 reads its configuration once per process, and a server may be using the
    token). Raises: AssertionError (the listing failed)."""
    env = dict(os.environ)
    if softhsm2_conf is not None:
        env["SOFTHSM2_CONF"] = str(softhsm2_conf)
    done = subprocess.run([sys.executable, "-c", _LIST_KEYS, str(module), label], input=pin,
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())
