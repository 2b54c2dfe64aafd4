"""Device processes (authority/backends/processes): batches sealed and unsealed in child
processes with their own sessions on a real SoftHSM2 token, synchronously and on an event loop;
keys made and destroyed here seen there; a killed process replaced; the PIN never on a command
line or in an environment; every process gone after close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.app import device_processes
from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.pkcs11.officer import SecurityOfficer
from authority.backends.processes.child import hello_for
from authority.backends.processes.handoff import Handoff
from authority.backends.processes.pool import DeviceProcesses
from authority.backends.softhsm import SO_PIN_NAME, provision_embedded_token
from authority.config import ClusterSettings, Config, Pkcs11Settings, Secret, ServerSettings
from authority.errors import (
    ConfigError,
    DeviceUnavailable,
    KeyNotFound,
    StartupError,
    UnsealFailed,
)
from authority.keyring.core import wrapping_backend
from authority.ticket_format import encode_header
from tests.conftest import Harness, issue, load_toml, make_config, process_gone, wait_until
from tests.pkcs11_fixtures import KID, OTHER, hsm_fixture, requires_softhsm  # noqa: F401

pytestmark = requires_softhsm
OK = authority_pb2.REDEEM_RESULT_OK


def _hello(settings: Pkcs11Settings) -> dict[str, object]:
    return hello_for(settings, "WARNING")


def _open(hsm: Pkcs11Settings, asynchronous: bool = False, count: int = 2) -> DeviceProcesses:
    local = Pkcs11Backend.open(replace(hsm, sessions=2))
    try:
        return DeviceProcesses(local, _hello(hsm), count, asynchronous=asynchronous,
                               start_timeout=30).start()
    except BaseException:
        local.close()  # as app.open_backend does: no backend left open for the next test
        raise


@pytest.fixture
def procs(hsm: Pkcs11Settings) -> Iterator[DeviceProcesses]:
    backend = _open(hsm)
    backend.create_key(KID)
    yield backend
    backend.close()


def _items(backend: DeviceProcesses, n: int = 20) -> tuple[list[bytes], list[tuple[bytes, ...]]]:
    header = encode_header(KID, 1)
    plaintexts = [f"state {i}".encode() * 3 for i in range(n)]
    sealed = backend.seal_many([(KID, header, p) for p in plaintexts])
    return plaintexts, [(KID, header, body) for body in sealed]


def test_batches_round_trip_through_the_processes(procs: DeviceProcesses) -> None:
    plaintexts, items = _items(procs)
    assert procs.unseal_many(items) == plaintexts
    assert procs.describe().processes == 2
    assert procs.describe().sessions == 2 + 2  # this process's two, one per device process
    assert len(set(procs.pids())) == 2 and os.getpid() not in procs.pids()


def test_item_errors_come_back_in_place(procs: DeviceProcesses) -> None:
    plaintexts, items = _items(procs, 4)
    key_id, header, body = items[1]
    tampered = (key_id, header, body[:-1] + bytes([body[-1] ^ 1]))
    unknown = (OTHER, encode_header(OTHER, 1), items[2][2])
    results = procs.unseal_many([items[0], tampered, unknown, items[3]])
    assert results[0] == plaintexts[0] and results[3] == plaintexts[3]
    assert isinstance(results[1], UnsealFailed)
    assert isinstance(results[2], KeyNotFound) and results[2].key_id == OTHER


def test_sealing_under_a_missing_key_fails_the_batch(procs: DeviceProcesses) -> None:
    header = encode_header(OTHER, 1)
    with pytest.raises(KeyNotFound):
        procs.seal_many([(OTHER, header, b"a"), (OTHER, header, b"b")])


def test_a_key_made_here_opens_there_and_a_destroyed_one_does_not(
        procs: DeviceProcesses) -> None:
    procs.create_key(OTHER)  # after the processes opened their sessions
    header = encode_header(OTHER, 1)
    sealed = procs.seal_many([(OTHER, header, b"x"), (OTHER, header, b"y")])
    items = [(OTHER, header, body) for body in sealed]
    for _ in range(4):  # every process has used (and cached) the key
        assert procs.unseal_many(items) == [b"x", b"y"]
    procs.destroy_key(OTHER)
    for _ in range(4):
        assert all(isinstance(r, KeyNotFound) for r in procs.unseal_many(items))


def test_the_pin_is_on_no_command_line_and_in_no_environment(procs: DeviceProcesses,
                                                              hsm: Pkcs11Settings) -> None:
    assert hsm.pin.reveal() not in repr(procs._fleet.__dict__)  # held as a Secret here too
    pin = hsm.pin.reveal().encode()
    for pid in procs.pids():
        assert pin not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert pin not in Path(f"/proc/{pid}/environ").read_bytes()


def test_a_killed_process_is_replaced(procs: DeviceProcesses) -> None:
    plaintexts, items = _items(procs)
    victim = procs.pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: process_gone(victim))
    outcomes = []
    for _ in range(6):  # the dead one is noticed and replaced; the other one serves meanwhile
        try:
            outcomes.append(procs.unseal_many(items) == plaintexts)
        except DeviceUnavailable:
            outcomes.append(False)
    assert outcomes[-1]
    wait_until(lambda: len(procs.pids()) == 2 and victim not in procs.pids())
    assert procs.unseal_many(items) == plaintexts


def test_close_ends_every_process(hsm: Pkcs11Settings) -> None:
    backend = _open(hsm)
    pids = backend.pids()
    backend.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_a_process_that_cannot_log_in_stops_the_start(hsm: Pkcs11Settings) -> None:
    local = Pkcs11Backend.open(hsm)
    hello = {**_hello(hsm), "pin": "wrong-pin"}
    try:
        with pytest.raises(StartupError, match="pkcs11"):
            DeviceProcesses(local, hello, 2, start_timeout=30).start()
    finally:
        local.close()


def test_on_an_event_loop_requests_pipeline_and_survive_a_kill(hsm: Pkcs11Settings) -> None:
    backend = _open(hsm, asynchronous=True)
    try:
        backend.create_key(KID)
        header = encode_header(KID, 1)

        async def scenario() -> None:
            sealed = await backend.seal_many_async([(KID, header, b"%d" % i) for i in range(50)])
            items = [(KID, header, body) for body in sealed]
            many = await asyncio.gather(*(backend.unseal_many_async(items) for _ in range(12)))
            assert all(r == [b"%d" % i for i in range(50)] for r in many)
            victim = backend.pids()[0]
            os.kill(victim, signal.SIGKILL)
            await asyncio.sleep(0.2)
            results = await asyncio.gather(*(backend.unseal_many_async(items)
                                             for _ in range(6)), return_exceptions=True)
            assert all(isinstance(r, (list, DeviceUnavailable)) for r in results)
            assert any(isinstance(r, list) for r in results)
            deadline = time.monotonic() + 30
            while victim in backend.pids() or len(backend.pids()) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the successor attaches to this loop
            again = await asyncio.gather(*(backend.unseal_many_async(items) for _ in range(6)))
            assert all(r == [b"%d" % i for i in range(50)] for r in again)
            await backend.detach()

        asyncio.run(scenario())
    finally:
        backend.close()


def test_single_items_stay_in_this_process(procs: DeviceProcesses) -> None:
    """Unary calls (one item) use this process's own session: no socket round trip."""
    plaintexts, items = _items(procs, 2)
    for pid in procs.pids():
        os.kill(pid, signal.SIGSTOP)  # a batch would hang; a single item must not
    try:
        assert procs.unseal_many(items[:1]) == plaintexts[:1]
    finally:
        for pid in procs.pids():
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize(("toml", "expected"), [
    ("", "auto"), ("device_processes = 3", 3), ('device_processes = "auto"', "auto"),
    ("device_processes = 0", 0)])
def test_device_processes_setting(tmp_path: Path, toml: str, expected: object) -> None:
    assert load_toml(tmp_path, f"[server]\n{toml}\n").server.device_processes == expected


@pytest.mark.parametrize("toml", ['device_processes = "many"', "device_processes = -1",
                                  "device_processes = 65", "device_processes = true"])
def test_bad_device_processes_settings_name_the_setting(tmp_path: Path, toml: str) -> None:
    with pytest.raises(ConfigError, match=r"^server\.device_processes:"):
        load_toml(tmp_path, f"[server]\n{toml}\n")


@pytest.mark.parametrize(("backend", "mode", "setting", "cpus", "expected"), [
    ("pkcs11", "auto", "auto", 2, 2), ("pkcs11", "auto", "auto", 8, 4),
    ("pkcs11", "auto", "auto", 1, 0), ("pkcs11", "threads", "auto", 2, 0),
    ("tpm", "auto", "auto", 2, 0), ("tpm", "aio", 1, 2, 1), ("pkcs11", "threads", 3, 1, 3)])
def test_auto_resolves_per_backend_server_and_cpus(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: str, mode: str,
        setting: object, cpus: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    config = Config(state_dir=tmp_path, backend=backend,
                    server=ServerSettings(mode=mode, device_processes=setting))  # type: ignore[arg-type]
    assert device_processes(config) == expected


def test_a_returned_process_goes_to_the_caller_waiting_longest() -> None:
    """No barging: the thread that gives a process back cannot take it again ahead of a
    waiting one (queue.Queue let a bench thread starve for 5 s)."""
    pool: Handoff[int] = Handoff()
    pool.put(1)
    taken = pool.get(1.0)
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get(10.0)))
    waiter.start()
    wait_until(lambda: pool._waiters)  # the other thread is in line
    pool.put(taken)  # type: ignore[arg-type]
    assert pool.get(0.05) is None  # ... so this caller waits its turn
    waiter.join(10)
    assert got == [1]
    assert pool.get(0.01) is None  # nothing idle: a timeout gives None and leaves the line
    assert not pool._waiters


@pytest.mark.parametrize("mode", ["aio", "threads"])
def test_a_server_with_device_processes_survives_losing_one(tmp_path: Path, mode: str) -> None:
    """Over gRPC, on both servers: batches run in the device processes; a SIGKILLed one
    costs at most some UNAVAILABLE batches (never another status, never a wrong result), is
    replaced, and GetStatus counts it again."""
    h = Harness(tmp_path / "state", "pkcs11", mode)
    config = make_config(h.state_dir, "pkcs11", mode)
    h.start(replace(config, server=replace(config.server, device_processes=2)))
    try:
        stub, admin = h.tickets, h.admin
        tickets = [issue(stub, n).ticket for n in range(40)]
        request = authority_pb2.RedeemTicketsRequest(items=[
            authority_pb2.RedeemTicketRequest(ticket=t) for t in tickets])

        def redeem_all() -> str:
            try:
                reply = stub.RedeemTickets(request, timeout=30)
            except grpc.RpcError as exc:
                return str(exc.code().name)
            assert [i.redeemed.result for i in reply.items] == [OK] * len(tickets)
            return "OK"

        def status() -> int:
            return int(admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
                       .device_processes)

        assert redeem_all() == "OK" and status() == 2
        processes = h.authority.backend._inner
        victim = processes.pids()[0]
        os.kill(victim, signal.SIGKILL)
        codes = [redeem_all() for _ in range(8)]
        assert set(codes) <= {"OK", "UNAVAILABLE"} and codes[-1] == "OK"
        wait_until(lambda: status() == 2 and victim not in processes.pids())
        assert all(redeem_all() == "OK" for _ in range(4))
        registry = h.authority.metrics.registry
        assert registry.get_sample_value("ticket_authority_device_processes") == 2
        assert registry.get_sample_value("ticket_authority_device_process_restarts_total") == 1
    finally:
        h.stop()


def test_a_replacement_that_cannot_start_is_retried_while_the_others_serve(
        procs: DeviceProcesses, caplog: pytest.LogCaptureFixture) -> None:
    """While a successor fails to open its session (here: the PIN it is given is wrong), the
    fleet runs one process short, batches keep being answered by the others, and the
    successor is retried with backoff until it starts."""
    plaintexts, items = _items(procs)
    fleet = procs._fleet
    right_pin = fleet._hello["pin"]
    fleet._hello["pin"] = Secret("not-the-pin")
    victim = procs.pids()[0]
    os.kill(victim, signal.SIGKILL)
    for _ in range(4):  # synchronous mode notices a dead process when it is next used
        with contextlib.suppress(DeviceUnavailable):
            procs.unseal_many(items)
    wait_until(lambda: "could not restart" in caplog.text)
    assert len(procs.pids()) == 1
    for _ in range(4):
        assert procs.unseal_many(items) == plaintexts
    fleet._hello["pin"] = right_pin
    wait_until(lambda: len(procs.pids()) == 2)
    assert procs.describe().processes == 2 and fleet.restarts == 1
    assert procs.unseal_many(items) == plaintexts


def test_per_node_tokens_work_with_device_processes(tmp_path: Path) -> None:
    """``cluster.per_node_tokens`` with the default device processes: the key ring's wrapping
    backend is the DeviceProcesses (before: StartupError "the backend cannot copy keys");
    a wrappable key made through it is wrapped and checked in this process, and batches
    sealed and opened under it run in the device processes."""
    hsm = provision_embedded_token(tmp_path / "hsm")
    so_pin = Secret((tmp_path / "hsm" / SO_PIN_NAME).read_text("utf-8").strip())
    with SecurityOfficer.open(hsm.module, hsm.softhsm2_conf, hsm.token_label, so_pin) as so:
        so.make_kek()
    backend = _open(replace(hsm, per_node_keys=True))   # as serve opens it for per-node tokens
    try:
        wrapper = wrapping_backend(ClusterSettings(per_node_tokens=True), backend)
        assert wrapper is backend
        wrapper.create_wrappable_key(OTHER)
        assert len(wrapper.wrap_key(OTHER)) == 40 and len(wrapper.key_check(OTHER)) == 16
        header = encode_header(OTHER, 1)
        sealed = backend.seal_many([(OTHER, header, b"x"), (OTHER, header, b"y")])
        assert backend.unseal_many([(OTHER, header, body) for body in sealed]) == [b"x", b"y"]
    finally:
        backend.close()
