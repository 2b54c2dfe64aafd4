"""Replicas on one machine (issue 13): ``server.processes = N`` makes ``serve`` the supervisor of
N server processes on one port (SO_REUSEPORT), each a replica sharing the state (the state
directory's SQLite file, or PostgreSQL) and the embedded SoftHSM2 token. Real processes, a real
token, real gRPC; nothing mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, admin_pb2_grpc, authority_pb2
from authority._proto.ticketauthority.v1 import authority_pb2_grpc as ticket_grpc
from authority.config import Config, ServerSettings
from authority.errors import ConfigError, DeviceUnavailable
from authority.service.supervisor import (
    AUTO_PROCESSES,
    metrics_listens,
    replica_config,
    replica_device_processes,
    reuse_port,
    server_processes,
)
from authority.store.sqlite import SqliteStore
from tests.conftest import (
    at_once,
    issue,
    load_toml,
    process_gone,
    redeem,
    sample_state,
    wait_until,
)
from tests.postgres_fixtures import (  # noqa: F401
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.serve_helpers import read_banner

ROOT = Path(__file__).resolve().parent.parent
OK = authority_pb2.REDEEM_RESULT_OK
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED
T = TypeVar("T")
#: a quick heartbeat, so that replicas see each other (and a new key) within a second or two
CLUSTER = "[cluster]\nheartbeat_interval = 0.2\nreplica_timeout = 2.0\nlease_duration = 2.0\n"


@dataclass
class Served:
    """A ``ticket-authority serve`` process (the supervisor) and where it listens."""

    proc: subprocess.Popen[str]
    address: str
    state: Path
    log: Path
    channels: list[grpc.Channel] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """Its server.json."""
        info: dict[str, Any] = json.loads((self.state / "server.json").read_text())
        return info

    def replica_pids(self) -> list[int]:
        return [int(r["pid"]) for r in self.info()["replicas"]]

    def channel(self) -> grpc.Channel:
        """A channel with a connection of its own (the kernel picks its replica)."""
        channel = grpc.insecure_channel(self.address,
                                        options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        return channel

    def stop(self) -> int:
        for channel in self.channels:
            channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def launch(state: Path, toml: str) -> tuple[subprocess.Popen[str], Path]:
    """Start ``serve`` with the settings ``toml`` on port 0 (not waiting); it and its log."""
    state.parent.mkdir(parents=True, exist_ok=True)
    config = state.parent / f"{state.name}.toml"
    config.write_text(toml)
    log = state.parent / f"{state.name}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authority.cli", "serve", "--state-dir", str(state),
             "--listen", "127.0.0.1:0", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    return proc, log


def serve(state: Path, toml: str) -> Served:
    """Start ``serve`` with the settings ``toml`` on port 0; wait for its banner.
    Raises: AssertionError (with its log) if it exits first."""
    proc, log = launch(state, toml)
    banner, address = read_banner(proc)
    assert address, f"{banner}\n{log.read_text()}"
    return Served(proc, address, state, log)


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` now (children, their children...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue   # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def started_at(channel: grpc.Channel) -> int:
    """Which replica answers on ``channel``: its start time (GetStatus), in nanoseconds."""
    reply = admin_pb2_grpc.TicketAdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(),
                                                              timeout=10)
    return int(reply.started_at.ToNanoseconds())


def sealing_key(channel: grpc.Channel) -> str:
    """The sealing key of the replica answering on ``channel`` (GetStatus)."""
    reply = admin_pb2_grpc.TicketAdminStub(channel).GetStatus(admin_pb2.GetStatusRequest(),
                                                              timeout=10)
    return str(reply.sealing_key_id)


def one_channel_per_replica(served: Served, replicas: int = 2) -> dict[int, grpc.Channel]:
    """New connections until every replica answered on one: {replica's start time: channel}.
    Raises: AssertionError if 64 connections reached fewer replicas."""
    found: dict[int, grpc.Channel] = {}
    for _ in range(64):
        channel = served.channel()
        found.setdefault(started_at(channel), channel)
        if len(found) == replicas:
            return found
    raise AssertionError(f"64 connections reached {len(found)} replica(s), not {replicas}")


def retried(call: Callable[[], T], attempts: int = 5) -> T:
    """``call``, again on UNAVAILABLE (a connection the dying replica had accepted)."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def issue_and_redeem(stub: ticket_grpc.TicketAuthorityStub, n: int) -> int:
    """Issue a ticket and redeem it on ``stub`` (each retried on UNAVAILABLE); the result."""
    ticket = retried(lambda: issue(stub, n)).ticket
    result: int = retried(lambda: redeem(stub, ticket)).result
    return result


def stubs(channel: grpc.Channel) -> ticket_grpc.TicketAuthorityStub:
    return ticket_grpc.TicketAuthorityStub(channel)


def check_replayed_across(channels: list[grpc.Channel]) -> None:
    """A ticket issued on each replica and consumed there is REPLAYED on every other one."""
    for n, own in enumerate(channels):
        ticket = issue(stubs(own), n).ticket
        others = [c for c in channels if c is not own]
        assert redeem(stubs(others[0]), ticket).result == OK       # any replica opens it
        assert redeem(stubs(own), ticket, consume=True).result == OK
        for other in others:
            assert redeem(stubs(other), ticket, consume=True).result == REPLAYED


@pytest.fixture(scope="module")
def sqlite_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``serve`` with server.processes = 2 on SQLite and the embedded token; no metrics.
    Stopped at the end of the module (the kill -9 test, last, leaves it whole again)."""
    served = serve(tmp_path_factory.mktemp("pair") / "state",
                   '[server]\nprocesses = 2\nmetrics_listen = ""\n[keys]\n'
                   f'publish_delay = 600.0\n{CLUSTER}')
    yield served
    assert served.stop() == 0


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "65", "\"many\"", "true", "1.5"])
def test_processes_setting_is_auto_or_1_to_64(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(tmp_path, f"[server]\nprocesses = {value}\n")
    assert str(err.value).startswith("server.processes:")


def test_tpm_refuses_several_processes_and_auto_is_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(tmp_path, "backend = \"tpm\"\n[server]\nprocesses = 2\n")
    message = str(err.value)
    assert message.startswith("server.processes:") and "TPM is one device" in message
    assert server_processes(load_toml(tmp_path, "backend = \"tpm\"\n")) == 1
    assert server_processes(load_toml(tmp_path, "")) == AUTO_PROCESSES
    assert server_processes(load_toml(tmp_path, "[server]\nprocesses = 3\n")) == 3


@pytest.mark.parametrize("value", ["0", "0.5", "-3", "\"soon\"", "true", "86401"])
def test_replica_watchdog_setting_is_auto_or_seconds(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(tmp_path, f"[server]\nprocesses = 2\nreplica_watchdog = {value}\n")
    message = str(err.value)
    assert message.startswith("server.replica_watchdog:") and "unknown" not in message


def test_replica_watchdog_auto_outlasts_the_longest_store_call(tmp_path: Path) -> None:
    """auto: 3 x cluster.replica_timeout (the peers' own bound on a silent replica), and
    never less than twice what one PostgreSQL call may block (connect + statement)."""
    from authority.service.supervisor import replica_watchdog

    assert replica_watchdog(load_toml(tmp_path, "")) == 15.0
    assert replica_watchdog(load_toml(tmp_path, "[server]\nreplica_watchdog = 4\n")) == 4.0
    assert replica_watchdog(load_toml(
        tmp_path, "[cluster]\nreplica_timeout = 8.0\n")) == 24.0
    slow = ('[postgresql]\ndsn = "postgresql:///x"\nstatement_timeout = 20.0\n'
            "connect_timeout = 10.0\n")
    assert replica_watchdog(load_toml(tmp_path, slow)) == 60.0


def test_metrics_ports_must_fit_one_per_replica(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(tmp_path, "[server]\nprocesses = 3\nmetrics_listen = \"127.0.0.1:65534\"\n")
    assert str(err.value).startswith("server.metrics_listen:")


def test_each_replica_gets_its_metrics_port_and_admin_listener(tmp_path: Path) -> None:
    base = Config(state_dir=tmp_path, server=ServerSettings(
        processes=3, listen="127.0.0.1:0", metrics_listen="127.0.0.1:9464",
        admin_listen=f"unix:{tmp_path}/admin.sock"))
    assert metrics_listens(base) == ["127.0.0.1:9464", "127.0.0.1:9465", "127.0.0.1:9466"]
    first, third = replica_config(base, 0), replica_config(base, 2, 41000)
    assert (first.server.listen, first.server.admin_listen) == (
        "127.0.0.1:0", f"unix:{tmp_path}/admin.sock")
    assert (third.server.listen, third.server.admin_listen, third.server.metrics_listen) == (
        "127.0.0.1:41000", f"unix:{tmp_path}/admin.sock.2", "127.0.0.1:9466")
    tcp = Config(state_dir=tmp_path, server=ServerSettings(
        processes=2, admin_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    second = replica_config(tcp, 1, 41000, 41001)
    assert (second.server.admin_listen, second.server.metrics_listen) == (
        "127.0.0.1:41001", "127.0.0.1:0")


def test_only_a_replica_of_a_supervisor_shares_its_port(tmp_path: Path) -> None:
    """SO_REUSEPORT only where the supervisor gave an explicit count above 1: never for an
    ``auto`` server built in process (a second server on its port must still fail)."""
    auto = Config(state_dir=tmp_path)
    assert reuse_port(auto) == 0
    assert reuse_port(Config(state_dir=tmp_path, server=ServerSettings(processes=1))) == 0
    two = Config(state_dir=tmp_path, server=ServerSettings(processes=2))
    assert reuse_port(two) == 1
    resolved = replica_config(auto, 0)
    assert resolved.server.processes == AUTO_PROCESSES   # replicas get the count, not auto


def test_replicas_split_the_cpus_for_their_device_processes(tmp_path: Path) -> None:
    """``device_processes = auto`` with 2 replicas on 2 CPUs: batches inline in each (the
    faster of the two as measured); on 8 CPUs 4 each; a set value is kept; one process keeps
    auto."""
    def config(**server: Any) -> Config:
        return Config(state_dir=tmp_path, server=ServerSettings(**server))

    assert replica_device_processes(config(processes=2), cpus=2) == 0
    assert replica_device_processes(config(processes=2), cpus=8) == 4
    assert replica_device_processes(config(processes=3), cpus=8) == 2
    assert replica_device_processes(config(processes=4), cpus=4) == 0
    assert replica_device_processes(config(processes=2, device_processes=2), cpus=2) == 2
    assert replica_device_processes(config(processes=2, mode="threads"), cpus=8) == 0
    assert replica_device_processes(config(processes=1), cpus=8) == "auto"


# -- SQLite shared by processes ----------------------------------------------------------------

_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO consumed VALUES (?, ?)", (b"h" * 16, 4_000_000_000))
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def _hold_write_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the file's write lock for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_sqlite_write_waits_for_another_process_then_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "authority.db")
    try:
        holder = _hold_write_lock(tmp_path / "authority.db", 0.5)
        assert store.consume_many([(b"t" * 16, 4_000_000_000)], 0.0) == [True]  # waited
        assert holder.wait(timeout=10) == 0
        assert store.consumed_among([b"h" * 16, b"t" * 16], 0.0) == {b"h" * 16, b"t" * 16}
        assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        store.close()


def test_sqlite_write_locked_past_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "authority.db", busy_timeout=0.2)
    try:
        holder = _hold_write_lock(tmp_path / "authority.db", 3.0)
        with pytest.raises(DeviceUnavailable) as err:
            store.consume_many([(b"t" * 16, 4_000_000_000)], 0.0)
        assert "database is locked" in str(err.value)
        holder.kill()
        holder.wait()
    finally:
        store.close()


# -- two processes on one port -----------------------------------------------------------------


def test_two_processes_answer_on_one_port_sharing_the_consumed_set(sqlite_pair: Served) -> None:
    info = sqlite_pair.info()
    assert info["address"] == sqlite_pair.address and info["pid"] == sqlite_pair.proc.pid
    assert len(info["replicas"]) == 2 and len(set(sqlite_pair.replica_pids())) == 2
    assert sqlite_pair.proc.pid not in sqlite_pair.replica_pids()
    channels = one_channel_per_replica(sqlite_pair)
    check_replayed_across(list(channels.values()))


def test_a_key_one_replica_makes_in_the_shared_token_is_found_by_the_other(
        sqlite_pair: Served) -> None:
    """RotateKey on one replica: the new key seals only once every live replica reported it
    loaded (publish_delay is 600 s here), i.e. the other replica found it in the token."""
    channels = list(one_channel_per_replica(sqlite_pair).values())
    admin = admin_pb2_grpc.TicketAdminStub(channels[0])
    new = admin.RotateKey(admin_pb2.RotateKeyRequest(), timeout=30).new_key.key_id

    def sealing() -> bool:
        keys = admin.ListKeys(admin_pb2.ListKeysRequest(), timeout=10).keys
        return any(k.key_id == new and k.state == admin_pb2.KEY_STATE_ACTIVE for k in keys)

    wait_until(sealing, timeout=30)
    for channel in channels:   # each replica now seals with it; the other opens what it seals
        wait_until(lambda c=channel: sealing_key(c) == new, timeout=30)  # type: ignore[misc]
    check_replayed_across(channels)


def test_kill_9_of_a_replica_is_replaced_and_calls_keep_being_answered(
        sqlite_pair: Served) -> None:
    """Runs last on the module's pair: it leaves it with a new replica 1."""
    channels = list(one_channel_per_replica(sqlite_pair).values())
    ticket = issue(stubs(channels[0]), 7).ticket
    assert redeem(stubs(channels[0]), ticket, consume=True).result == OK
    victim = sqlite_pair.replica_pids()[1]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: process_gone(victim), timeout=10)
    served_calls = 0
    deadline = time.monotonic() + 60

    def replaced() -> bool:
        pids = sqlite_pair.replica_pids()
        return len(pids) == 2 and victim not in pids

    while not replaced():   # until the supervisor replaced it, fresh connections are served
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        # a fresh connection, retried on UNAVAILABLE: one the dying replica had accepted, or
        # one refused while the kernel drops its socket from the port group
        assert retried(lambda n=served_calls: issue_and_redeem(stubs(sqlite_pair.channel()), n),
                       attempts=30) == OK
        served_calls += 1
    assert served_calls > 0
    assert sqlite_pair.proc.poll() is None
    channels = list(one_channel_per_replica(sqlite_pair).values())   # the new one answers
    for channel in channels:
        assert redeem(stubs(channel), ticket, consume=True).result == REPLAYED
    check_replayed_across(channels)
    log = sqlite_pair.log.read_text()
    assert f"replica 1 (pid {victim}) exited with status -9; restarting it in 0.5 s" in log


def test_a_replica_that_cannot_start_fails_serve_with_its_error(tmp_path: Path) -> None:
    """Replica 0 cannot open its device: serve exits 2 with the replica's own message (and
    the state dir is free again)."""
    toml = tmp_path / "bad.toml"
    toml.write_text('[server]\nprocesses = 2\nmetrics_listen = ""\n[pkcs11]\n'
                    f'module = "{tmp_path}/missing.so"\ntoken_label = "t"\npin = "1234"\n')
    done = subprocess.run(
        [sys.executable, "-m", "authority.cli", "serve", "--state-dir", str(tmp_path / "state"),
         "--listen", "127.0.0.1:0", "--config", str(toml)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert (f"ticket-authority: replica 0: pkcs11.module: {tmp_path}/missing.so does not "
            "exist") in done.stderr
    assert not done.stdout   # no banner
    assert not (tmp_path / "state" / "server.json").exists()


def test_two_processes_on_postgresql_share_the_database(tmp_path: Path,
                                                        postgres_dsn: str) -> None:
    """The same on PostgreSQL: one database for both replicas; SIGTERM stops them all and the
    supervisor exits 0, removing server.json."""
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(postgres_dsn)
    dsn_file.chmod(0o600)
    served = serve(tmp_path / "state",
                   f'[server]\nprocesses = 2\nmetrics_listen = "127.0.0.1:0"\n{CLUSTER}'
                   f'[postgresql]\ndsn_file = "{dsn_file}"\npool_size = 2\n')
    try:
        replicas = served.info()["replicas"]
        assert all(r["metrics_port"] for r in replicas)
        assert len({r["metrics_port"] for r in replicas}) == 2   # one port per replica
        check_replayed_across(list(one_channel_per_replica(served).values()))
        pids = served.replica_pids()
    finally:
        code = served.stop()
    assert code == 0
    assert all(process_gone(pid) for pid in pids)
    assert not (served.state / "server.json").exists()


# -- a replica that hangs; signals while the replicas start -------------------------------------

PAIR = f'[server]\nprocesses = 2\nmetrics_listen = ""\n{CLUSTER}'
#: a quick watchdog: a replica silent for 3 s is killed (SIGTERM, SIGKILL 2 s later) and replaced
WATCHED = PAIR.replace("[server]\n", "[server]\nreplica_watchdog = 3.0\n")


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``serve`` with 2 replicas and a 3 s replica watchdog."""
    served = serve(tmp_path_factory.mktemp("watched") / "state", WATCHED)
    yield served
    assert served.stop() == 0


def _redeem_batches(channel: grpc.Channel, until: float) -> int:
    """Issue 50 tickets and redeem them in one batch, again and again until ``until``
    (monotonic); how many batches were answered."""
    stub = stubs(channel)
    done = 0
    while time.monotonic() < until:
        issued = stub.IssueTickets(authority_pb2.IssueTicketsRequest(items=[
            authority_pb2.IssueTicketRequest(state=sample_state(n)) for n in range(50)]),
            timeout=30)
        stub.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
            authority_pb2.RedeemTicketRequest(ticket=item.ticket.ticket)
            for item in issued.items]), timeout=30)
        done += 1
    return done


def test_a_busy_replica_is_not_killed_by_the_watchdog(watched: Served) -> None:
    """Both replicas issue and redeem batches on 6 connections for 1.5 times the watchdog's
    bound: the proof of life does not wait behind the calls, so neither is replaced."""
    pids = watched.replica_pids()
    channels = list(one_channel_per_replica(watched).values())
    channels += [watched.channel() for _ in range(4)]
    until = time.monotonic() + 4.5
    batches = at_once([lambda c=c: _redeem_batches(c, until) for c in channels])
    assert all(batches)
    assert watched.replica_pids() == pids
    assert all(not process_gone(pid) for pid in pids)
    assert "replica_watchdog" not in watched.log.read_text()


def test_a_stopped_replica_is_killed_and_replaced_by_the_watchdog(watched: Served) -> None:
    """SIGSTOP one replica (it hangs: it neither serves nor exits): within the watchdog's
    bound plus the kill grace the supervisor kills it and starts another; the port answers on
    both replicas again."""
    victim = watched.replica_pids()[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: process_gone(victim), timeout=3.0 + 2.0 + 5.0)
    finally:
        if not process_gone(victim):
            os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        pids = watched.replica_pids()
        return len(pids) == 2 and victim not in pids

    wait_until(replaced, timeout=30)
    assert watched.proc.poll() is None
    check_replayed_across(list(one_channel_per_replica(watched).values()))
    log = watched.log.read_text()
    assert f"replica 1 (pid {victim}) gave no sign of life for" in log
    assert "server.replica_watchdog 3 s" in log


def test_sighup_while_the_replicas_start_does_not_stop_the_service(tmp_path: Path) -> None:
    """SIGHUP (TLS reload) sent to the supervisor again and again while its replicas start
    (one still in Python's start-up has no handler yet): serve still comes up with both; a
    SIGHUP afterwards reaches the serving replicas, which keep running."""
    proc, log = launch(tmp_path / "state", PAIR)
    wait_until(lambda: descendants(proc.pid) or proc.poll() is not None, poll=0.005)
    for _ in range(100):                       # for ~2 s: both replicas' start-up
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    banner, address = read_banner(proc)
    assert address, f"{banner}\n{log.read_text()}"
    served = Served(proc, address, tmp_path / "state", log)
    try:
        pids = served.replica_pids()
        assert len(pids) == 2
        proc.send_signal(signal.SIGHUP)
        check_replayed_across(list(one_channel_per_replica(served).values()))
        assert served.replica_pids() == pids and proc.poll() is None
        assert "received SIGHUP: forwarded to the replicas" in log.read_text()
    finally:
        assert served.stop() == 0
    assert "exited with status" not in log.read_text()


def test_sigterm_while_the_replicas_start_leaves_no_process(tmp_path: Path) -> None:
    """SIGTERM to the supervisor once replica 1 is being started (replica 0 serves): serve
    exits 0 and every process it started (replicas, their device processes) is gone."""
    proc, log = launch(tmp_path / "state",
                       PAIR.replace("[server]\n", "[server]\ndevice_processes = 1\n"))
    wait_until(lambda: "replica 0 serving" in log.read_text() or proc.poll() is not None,
               poll=0.005)
    seen = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None:                 # every process it starts or stops meanwhile
        seen |= descendants(proc.pid)
        time.sleep(0.01)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert len(seen) >= 3                      # replica 0, its device process, replica 1
    wait_until(lambda: all(process_gone(pid) for pid in seen), timeout=10)
    assert not (tmp_path / "state" / "server.json").exists()


# -- bench ---------------------------------------------------------------------------------------


def test_bench_measures_each_process_count_in_one_run(tmp_path: Path) -> None:
    """``bench --server-processes 1,2``: the gRPC phases once per count against its own
    server, the first count's figures at the top level, the client's connections spread
    evenly over the replicas."""
    done = subprocess.run(
        [sys.executable, "-m", "authority.bench", "--quick", "--duration", "0.3",
         "--storm-tickets", "300", "--concurrency", "4", "--batch-size", "50", "--json",
         "--no-progress", "--state-dir", str(tmp_path / "state"), "--server-processes", "1,2"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["failures"] == 0 and not figures["errors"]
    assert figures["server_processes"] == 1
    assert set(figures["by_server_processes"]) == {"1", "2"}
    for count in figures["by_server_processes"].values():
        assert count["unary_redeem_per_s"] > 0 and count["batch_redeem_per_s"] > 0
        assert count["storm_seconds"] > 0
    assert figures["by_server_processes"]["1"]["unary_redeem_per_s"] == (
        figures["unary_redeem_per_s"])
    assert "4 channels" in figures["settings"]["client"]
    assert figures["settings"]["server_processes"] == [1, 2]
