"""The TPM backend in a device process of its own (authority/backends/tpm/process.py over
authority/backends/processes/remote.py), on a real swtpm: every KeyBackend call answered there
with the same results and errors as in process; the owner auth never on a command line or in an
environment; a killed or hung process failing its calls with UNAVAILABLE and replaced while the
swtpm and the keys survive; saturation refused at once; over gRPC on the default TPM server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.app import device_processes
from authority.config import Config, Secret, ServerSettings
from authority.errors import (
    ConfigError,
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    KeyNotFound,
    UnsealFailed,
)
from authority.ticket_format import encode_header
from tests.conftest import Harness, issue, load_toml, make_config, process_gone, wait_until
from tests.tpm_fixtures import (  # noqa: F401
    HAVE_PYTSS,
    HAVE_SWTPM,
    requires_tools,
    requires_tpm,
    run_tool,
    swtpm_fixture,
    tpm_settings_fixture,
)

pytestmark = requires_tpm
if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.processes.child import tpm_hello_for
    from authority.backends.processes.remote import RemoteBackend
    from authority.backends.tpm import SwtpmProcess
    from authority.backends.tpm.process import open_tpm_process
    from authority.config import TpmSettings

KID, OTHER = b"P" * 8, b"Q" * 8
HEADER = encode_header(KID, 2)
OK = authority_pb2.REDEEM_RESULT_OK


@pytest.fixture
def remote(tpm_settings: TpmSettings, tmp_path: Path) -> Iterator[RemoteBackend]:
    """The TPM process on the fixture's swtpm, with one key; closed after the test."""
    backend = open_tpm_process(tpm_settings, tmp_path / "tpm", "WARNING")
    backend.create_key(KID)
    yield backend
    backend.close()


def _started(settings: TpmSettings, tmp_path: Path, call_timeout: float,
             max_waiting: int = 1024) -> RemoteBackend:
    """A RemoteBackend on the fixture's swtpm with these bounds, started."""
    assert settings.tcti is not None
    hello = tpm_hello_for(settings, settings.tcti, tmp_path / "tpm", "WARNING", 8)
    return RemoteBackend(hello, name="tpm", format_version=2, call_timeout=call_timeout,
                         max_waiting=max_waiting).start()


def test_every_call_runs_in_the_process(remote: RemoteBackend) -> None:
    pid = remote.pids()[0]
    assert pid != os.getpid() and not process_gone(pid)
    assert remote.list_keys() == {KID}
    attrs = remote.key_attributes(KID)
    assert attrs["aes.fixed_tpm"] and attrs["aes.fixed_parent"]
    assert attrs["hmac.fixed_tpm"] and attrs["hmac.fixed_parent"]
    sealed = remote.seal(KID, HEADER, b"one ticket")
    assert remote.unseal(KID, HEADER, sealed) == b"one ticket"
    plaintexts = [f"state {i}".encode() * 4 for i in range(30)]
    bodies = remote.seal_many([(KID, HEADER, p) for p in plaintexts])
    assert len(set(bodies)) == 30
    opened = remote.unseal_many([(KID, HEADER, body) for body in bodies])
    assert opened == plaintexts
    info = remote.describe()
    assert (info.backend, info.processes, info.sessions) == ("tpm", 1, 1)
    assert "tpm2-pytss" in info.library


def test_item_results_and_errors_cross_intact(remote: RemoteBackend) -> None:
    good = remote.seal(KID, HEADER, b"good")
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    results = remote.unseal_many([(KID, HEADER, good), (KID, HEADER, tampered),
                                  (OTHER, HEADER, good), (KID, HEADER, b"short")])
    assert results[0] == b"good"
    assert isinstance(results[1], UnsealFailed) and isinstance(results[3], UnsealFailed)
    assert isinstance(results[2], KeyNotFound) and results[2].key_id == OTHER
    with pytest.raises(UnsealFailed):
        remote.unseal(KID, HEADER, tampered)
    with pytest.raises(KeyNotFound):
        remote.unseal(OTHER, HEADER, good)
    with pytest.raises(KeyNotFound):
        remote.seal(OTHER, HEADER, b"x")
    with pytest.raises(FailedPrecondition, match="already exists"):
        remote.create_key(KID)
    with pytest.raises(InvalidArgument) as bad:
        remote.seal_many([(KID, HEADER, b"ok"), (KID, HEADER, b"x" * 2000)])
    assert bad.value.field == "items[1].plaintext"
    with pytest.raises(InvalidArgument) as bad_id:
        remote.create_key(b"short")
    assert bad_id.value.field == "key_id"
    with pytest.raises(KeyNotFound):
        remote.destroy_key(OTHER)
    remote.destroy_key(KID)
    assert remote.list_keys() == set()
    with pytest.raises(KeyNotFound):
        remote.unseal(KID, HEADER, good)
    assert remote.pids(), "errors are answers: the process stays"


def test_concurrent_callers_get_their_own_results(remote: RemoteBackend) -> None:
    """Requests pipelined to the process and run there at once come back to their callers."""
    remote.create_key(OTHER)
    other_header = encode_header(OTHER, 2)
    batches = []
    for n in range(12):
        key, header = (KID, HEADER) if n % 2 else (OTHER, other_header)
        plaintexts = [f"caller {n} item {i}".encode() for i in range(1 + n % 5)]
        batches.append(([(key, header, p) for p in plaintexts], plaintexts))

    def round_trip(n: int) -> bool:
        items, plaintexts = batches[n]
        bodies = remote.seal_many(items)
        opened = remote.unseal_many([(k, h, b) for (k, h, _), b in zip(items, bodies, strict=True)])
        return opened == plaintexts

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(round_trip, list(range(12)) * 3))


def test_batches_from_another_event_loop(remote: RemoteBackend) -> None:
    async def run() -> list[bytes]:
        bodies = await remote.seal_many_async([(KID, HEADER, b"a"), (KID, HEADER, b"b")])
        opened = await remote.unseal_many_async([(KID, HEADER, body) for body in bodies])
        assert await remote.unseal_many_async([]) == []
        return [o for o in opened if isinstance(o, bytes)]

    assert asyncio.run(run()) == [b"a", b"b"]


@requires_tools
def test_owner_auth_reaches_the_process_only_through_its_socket(
        swtpm: SwtpmProcess, tmp_path: Path) -> None:
    secret = "owner-auth-7f3c9a"
    run_tool(swtpm.tcti, "tpm2_changeauth", "-c", "owner", secret)
    settings = TpmSettings(tcti=swtpm.tcti, key_dir=tmp_path / "keys",
                           owner_auth=Secret(secret))
    backend = open_tpm_process(settings, tmp_path / "tpm", "WARNING")
    try:
        backend.create_key(KID)  # under our primary: needs the owner auth
        pid = backend.pids()[0]
        for name in ("cmdline", "environ"):
            assert secret.encode() not in Path(f"/proc/{pid}/{name}").read_bytes()
        assert secret not in repr(backend)
    finally:
        backend.close()
    wrong = TpmSettings(tcti=swtpm.tcti, key_dir=tmp_path / "keys2")
    with pytest.raises(Exception, match=r"tpm\.owner_auth"):
        open_tpm_process(wrong, tmp_path / "tpm2", "WARNING")


def test_a_killed_process_is_replaced_and_the_keys_survive(remote: RemoteBackend,
                                                           swtpm: SwtpmProcess) -> None:
    sealed = remote.seal(KID, HEADER, b"before the crash")
    pid = remote.pids()[0]
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(DeviceUnavailable):  # the call in flight, or one meanwhile
        remote.unseal(KID, HEADER, sealed)
    wait_until(lambda: remote.pids() and remote.pids()[0] != pid)
    wait_until(lambda: remote.describe().processes == 1)
    assert process_gone(pid) and swtpm.running
    assert remote.unseal(KID, HEADER, sealed) == b"before the crash"
    assert remote.describe().process_restarts == 1


def test_a_hung_process_fails_its_calls_and_is_replaced(tpm_settings: TpmSettings,
                                                        tmp_path: Path) -> None:
    backend = _started(tpm_settings, tmp_path, call_timeout=1.0, max_waiting=2)
    try:
        backend.create_key(KID)
        sealed = backend.seal(KID, HEADER, b"x")
        pid = backend.pids()[0]
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(DeviceUnavailable, match="did not answer within 1 s"):
            backend.unseal(KID, HEADER, sealed)
        wait_until(lambda: backend.pids() and backend.pids()[0] != pid)
        wait_until(lambda: backend.describe().processes == 1)
        assert process_gone(pid)
        assert backend.unseal(KID, HEADER, sealed) == b"x"
    finally:
        backend.close()


def test_saturation_is_refused_at_once(tpm_settings: TpmSettings, tmp_path: Path) -> None:
    backend = _started(tpm_settings, tmp_path, call_timeout=60.0, max_waiting=2)
    pid = backend.pids()[0]
    try:
        backend.create_key(KID)
        sealed = backend.seal(KID, HEADER, b"x")
        os.kill(pid, signal.SIGSTOP)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(backend.unseal, KID, HEADER, sealed) for _ in range(2)]
            wait_until(lambda: backend._waiting == 2)
            started = time.monotonic()
            with pytest.raises(DeviceUnavailable, match="saturated"):
                backend.unseal(KID, HEADER, sealed)
            assert time.monotonic() - started < 30  # refused, not queued behind the others
            os.kill(pid, signal.SIGCONT)
            assert [f.result(60) for f in waiting] == [b"x", b"x"]
    finally:
        os.kill(pid, signal.SIGCONT)
        backend.close()


def test_close_fails_the_calls_in_flight(tpm_settings: TpmSettings, tmp_path: Path) -> None:
    backend = _started(tpm_settings, tmp_path, call_timeout=60.0)
    backend.create_key(KID)
    sealed = backend.seal(KID, HEADER, b"x")
    pid = backend.pids()[0]
    os.kill(pid, signal.SIGSTOP)  # the call below stays in flight until close
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(backend.unseal, KID, HEADER, sealed)
        wait_until(lambda: backend._waiting == 1)
        backend.close()  # the stopped process does not exit: killed after its grace period
        with pytest.raises(DeviceUnavailable):
            pending.result(30)
    assert process_gone(pid)


def test_close_ends_the_process_and_the_embedded_swtpm(tmp_path: Path) -> None:
    backend = open_tpm_process(TpmSettings(), tmp_path / "tpm", "WARNING")
    backend.create_key(KID)
    pid = backend.pids()[0]
    assert "embedded swtpm" in backend.describe().library
    swtpm_pid = int((tmp_path / "tpm" / "swtpm" / "swtpm.pid").read_text())
    backend.close()
    backend.close()  # idempotent
    assert process_gone(pid) and process_gone(swtpm_pid)
    with pytest.raises(DeviceUnavailable, match="closed"):
        backend.list_keys()
    again = open_tpm_process(TpmSettings(), tmp_path / "tpm", "WARNING")
    try:  # the key blob and the swtpm state outlive both processes
        assert again.list_keys() == {KID}
    finally:
        again.close()


def test_setting_for_the_tpm(tmp_path: Path) -> None:
    for mode in ("threads", "aio"):  # auto: the TPM worker in the server (measured faster)
        server = ServerSettings(mode=mode)
        assert device_processes(Config(state_dir=tmp_path, backend="tpm", server=server)) == 0
    assert device_processes(load_toml(tmp_path, 'backend = "tpm"\n[server]\n'
                                      "device_processes = 1\n")) == 1
    with pytest.raises(ConfigError, match=r"server\.device_processes: 0 or 1 for backend tpm"):
        load_toml(tmp_path, 'backend = "tpm"\n[server]\ndevice_processes = 2\n')


def _batch(stub: object, tickets: list[bytes]) -> list[int]:
    request = authority_pb2.RedeemTicketsRequest(
        items=[authority_pb2.RedeemTicketRequest(ticket=t) for t in tickets])
    return [item.redeemed.result for item in stub.RedeemTickets(request, timeout=30).items]  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_over_grpc_a_killed_tpm_process_costs_only_unavailable(tmp_path: Path,
                                                               mode: str) -> None:
    harness = Harness(tmp_path, backend="tpm", mode=mode)
    config = make_config(tmp_path, backend="tpm", mode=mode)
    harness.start(replace(config, server=replace(config.server, device_processes=1)))
    try:
        status = harness.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert status.device_processes == 1
        tickets = [issue(harness.tickets, n).ticket for n in range(6)]
        assert _batch(harness.tickets, tickets[:3]) == [OK] * 3
        backend = harness.authority.backend._inner
        pid = backend.pids()[0]
        os.kill(pid, signal.SIGKILL)
        try:
            assert _batch(harness.tickets, tickets[3:]) == [OK] * 3
            served = True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            served = False
        wait_until(lambda: backend.pids() and backend.pids()[0] != pid)
        wait_until(lambda: backend.describe().processes == 1)
        if not served:
            assert _batch(harness.tickets, tickets[3:]) == [OK] * 3
        status = harness.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert status.device_processes == 1
    finally:
        harness.stop()
