"""One authority per state directory: a second one, in this process or another, is refused
with a message naming the directory and the process that holds it. Real SoftHSM2 token, real
server processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from authority._proto.ticketauthority.v1 import authority_pb2_grpc
from authority.app import Authority
from authority.clock import ManualClock
from authority.errors import StartupError
from authority.statedir import StateLock, adopt
from tests.conftest import issue, make_config, process_gone, redeem, wait_until
from tests.serve_helpers import read_banner

ROOT = Path(__file__).resolve().parent.parent


def test_second_open_in_one_process_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state", "pkcs11", "threads")
    first = Authority.open(config, ManualClock())
    try:
        with pytest.raises(StartupError) as err:
            Authority.open(config, ManualClock())
        message = str(err.value)
        assert message.startswith("state_dir:")
        assert str(config.state_dir) in message and f"process {os.getpid()}" in message
        assert first.ring.primary_id is not None   # the first is untouched
    finally:
        first.close()
    again = Authority.open(config, ManualClock())  # closing released the lock
    again.close()


def test_second_server_process_is_refused_naming_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "authority.cli", "serve", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--metrics-listen", ""],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner, address = read_banner(proc)
        assert address, banner
        with pytest.raises(StartupError) as err:
            Authority.open(make_config(state, "pkcs11", "threads"), ManualClock())
        assert str(state) in str(err.value) and f"process {proc.pid}" in str(err.value)
        with grpc.insecure_channel(address) as channel:   # the first still serves
            stub = authority_pb2_grpc.TicketAuthorityStub(channel)
            assert redeem(stub, issue(stub).ticket).result == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_lock_handed_to_a_replica_is_adopted_once_and_stays_the_supervisors(
        tmp_path: Path) -> None:
    """The supervisor of server.processes holds the lock; a replica given its locked file
    (here a duplicate descriptor: the same open file, as an inherited one) adopts it once;
    anyone else, and a second open in the replica, is refused naming the supervisor."""
    state = tmp_path / "state"
    state.mkdir()
    supervisor = StateLock.acquire(state)
    try:
        adopt(os.dup(supervisor.fileno()))
        replica = StateLock.acquire(state)   # the given lock, not a new one
        with pytest.raises(StartupError) as err:
            StateLock.acquire(state)
        assert f"process {os.getpid()}" in str(err.value)
        replica.release()                    # closes the replica's descriptor only
        with pytest.raises(StartupError):
            StateLock.acquire(state)         # the supervisor still holds it
    finally:
        supervisor.release()
    StateLock.acquire(state).release()


def test_a_second_serve_is_refused_while_a_supervisor_and_its_replicas_run(
        tmp_path: Path) -> None:
    """server.processes = 2: the replicas share the state dir, a second independent serve
    (one process or several) is refused naming the supervisor; killed with SIGKILL, the
    supervisor's replicas stop by themselves and the state dir is free again."""
    state = tmp_path / "state"
    config = tmp_path / "two.toml"
    config.write_text('[server]\nprocesses = 2\nmetrics_listen = ""\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "authority.cli", "serve", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        read_banner(proc)
        replicas = [r["pid"] for r in json.loads((state / "server.json").read_text())["replicas"]]
        assert len(replicas) == 2
        for extra in ([], ["--config", str(config)]):
            second = subprocess.run(
                [sys.executable, "-m", "authority.cli", "serve", "--state-dir", str(state),
                 "--listen", "127.0.0.1:0", "--metrics-listen", "", *extra],
                cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stderr
            assert f"{state} is in use by process {proc.pid}" in second.stderr
        with pytest.raises(StartupError) as err:
            Authority.open(make_config(state, "pkcs11", "threads"), ManualClock())
        assert f"process {proc.pid}" in str(err.value)
        proc.kill()
        proc.wait()
        wait_until(lambda: all(process_gone(pid) for pid in replicas), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    Authority.open(make_config(state, "pkcs11", "threads"), ManualClock()).close()
