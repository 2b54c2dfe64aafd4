"""Fixtures: a real SoftHSM2 token per test (provisioned in tmp_path), a real gRPC server on
port 0, real channels and stubs. Nothing here mocks the device or the transport."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from authority._proto.ticketauthority.v1 import (
    admin_pb2_grpc,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.clock import ManualClock
from authority.config import Config, KeyPolicy, ServerSettings
from authority.service.server import RunningServer, build_server
from authority.settings_loader import load_config

START = 1_800_000_000.0


BACKENDS = ["pkcs11", "tpm"]
#: what ``harness`` and ``make_harness`` run on: each backend on its default server
#: (``server.mode = "auto"``: aio for SoftHSM2, threads for swtpm), and SoftHSM2 on the
#: thread-pool server too
SERVERS = ["pkcs11", "tpm", "pkcs11-threads"]


def _server_param(param: str) -> tuple[str, str]:
    """``"pkcs11-threads"`` -> (backend, server mode); no mode: ``auto`` (the default: aio for
    pkcs11, threads for tpm)."""
    backend, _, mode = param.partition("-")
    return backend, mode or "auto"


def make_config(state_dir: Path, backend: str = "pkcs11", mode: str = "auto",
                **keys: Any) -> Config:
    """Settings for a test server: its own state dir (so its own SoftHSM2 token or embedded
    swtpm), port 0, no background maintenance (tests call ``maintain`` with a manual clock).
    SoftHSM2 on the aio server runs its batches in 2 device processes (what ``auto`` gives
    on 2+ CPUs), whatever this machine's CPU count."""
    policy = replace(KeyPolicy(maintenance_interval=3600.0), **keys)
    processes = 2 if backend == "pkcs11" and mode in ("auto", "aio") else 0
    return Config(state_dir=state_dir, keys=policy, backend=backend,
                  server=ServerSettings(listen="127.0.0.1:0", workers=16, metrics_listen="",
                                        mode=mode, device_processes=processes))


def wait_until(condition: Callable[[], object], timeout: float = 30.0,
               poll: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail the test if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(poll)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited: absent, or a zombie not yet reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def load_toml(tmp_path: Path, text: str) -> Config:
    """``load_config`` of ``text`` written to a file in ``tmp_path`` (also the state dir).
    Raises: ConfigError, as load_config."""
    path = tmp_path / "authority.toml"
    path.write_text(text)
    return load_config(path, state_dir=tmp_path)


class Harness:
    """Starts servers on one state dir and one manual clock; stops them all at teardown."""

    def __init__(self, state_dir: Path, backend: str = "pkcs11", mode: str = "auto") -> None:
        self.state_dir = state_dir
        self.backend = backend
        self.mode = mode
        self.clock = ManualClock(START)
        self.config = make_config(state_dir, backend, mode)
        self.running: RunningServer | None = None
        self._channels: list[grpc.Channel] = []

    def start(self, config: Config | None = None) -> RunningServer:
        """Start (or restart, after ``stop``) the server on the same state dir."""
        assert self.running is None, "stop the running server first"
        if config is not None:
            self.config = config
        self.running = build_server(self.config, clock=self.clock)
        return self.running

    def stop(self) -> None:
        """Stop the server and close its device and store."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.running is not None:
            self.running.stop(grace=1.0)
            self.running = None

    def restart(self) -> RunningServer:
        """Stop, then start a new server process state on the same state dir and clock."""
        self.stop()
        return self.start()

    def channel(self) -> grpc.Channel:
        assert self.running is not None
        channel = grpc.insecure_channel(self.running.address)
        self._channels.append(channel)
        return channel

    @property
    def tickets(self) -> authority_pb2_grpc.TicketAuthorityStub:
        return authority_pb2_grpc.TicketAuthorityStub(self.channel())

    @property
    def admin(self) -> admin_pb2_grpc.TicketAdminStub:
        return admin_pb2_grpc.TicketAdminStub(self.channel())

    @property
    def authority(self) -> Any:
        assert self.running is not None
        return self.running.authority


def _running(state_dir: Path, backend: str, mode: str = "auto") -> Iterator[Harness]:
    h = Harness(state_dir, backend, mode)
    h.start()
    yield h
    h.stop()


@pytest.fixture(params=SERVERS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A running authority on a fresh device, once per backend (SoftHSM2, swtpm) and once on
    the thread-pool server."""
    yield from _running(tmp_path / "state", *_server_param(request.param))


@pytest.fixture
def pkcs11_harness(tmp_path: Path) -> Iterator[Harness]:
    """A running authority on a fresh SoftHSM2 token (PKCS#11-specific tests)."""
    yield from _running(tmp_path / "state", "pkcs11")


@pytest.fixture(params=SERVERS)
def make_harness(request: pytest.FixtureRequest,
                 tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Build a harness with a custom key policy, once per backend and server mode (as
    ``harness``); started by the test."""
    made: list[Harness] = []
    backend, mode = _server_param(request.param)

    def make(**keys: Any) -> Harness:
        h = Harness(tmp_path / f"state{len(made)}", backend, mode)
        h.config = make_config(h.state_dir, backend, mode, **keys)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def sample_state(n: int = 0, **changes: Any) -> authority_pb2.ResumptionState:
    """A valid state: IDs of 30 octets, SHA-256 PRF, AES-GCM-256."""
    fields: dict[str, Any] = {
        "id_i": b"\x02\x00\x00\x00" + f"client-{n:06d}.vpn.example.net"[:26].encode(),
        "id_r": b"\x02\x00\x00\x00" + b"gw-a.vpn.example.net".ljust(26, b"."),
        "spi_i": (n + 1).to_bytes(8, "big"), "spi_r": (0xA5 << 56 | n + 1).to_bytes(8, "big"),
        "sk_d": bytes((n + i) % 256 for i in range(32)), "encr_id": 20, "encr_key_bits": 256,
        "prf_id": 5, "integ_id": 0, "dh_group": 19, "auth_method": 14,
        "gateway_data": f"session={n}".encode()}
    fields.update(changes)
    return authority_pb2.ResumptionState(**fields)


def issue(stub: Any, n: int = 0, lifetime: int = 0) -> Any:
    return stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state(n),
                                                             lifetime_seconds=lifetime))


def redeem(stub: Any, ticket: bytes, consume: bool = False) -> Any:
    return stub.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=ticket, consume=consume))

T = TypeVar("T")


def at_once(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` on threads released together; their results in order.
    Raises: AssertionError if one raised or did not finish within 120 s."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    return results
