"""Scenario 3 of ``ticket-authority chaos`` (issue 16): kill -9 of the server at the points of a
rotation (authority/chaos/rotation_kill.py), the crash-point seam it uses
(authority/crashpoints.py), and the defects the scenario found."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from authority import crashpoints
from authority._proto.ticketauthority.v1 import admin_pb2
from authority.bench.serveproc import ServeProcess
from authority.chaos import run_one
from authority.chaos.core import table
from authority.chaos.rotation_kill import NAME, device_keys
from authority.chaos.servers import single
from authority.errors import ConfigError
from tests.pkcs11_fixtures import requires_softhsm

ACTIVE = admin_pb2.KEY_STATE_ACTIVE


@requires_softhsm
def test_the_quick_scenario_holds() -> None:
    outcome = run_one(NAME, quick=True)
    assert outcome.held, table([outcome])
    assert outcome.calls > 0 and outcome.wrong == 0 and outcome.lost == 0
    assert outcome.figures["kills"] >= 8


# -- the seam --------------------------------------------------------------------------------------

def test_crash_points_parse_and_refuse() -> None:
    assert crashpoints.parse("rotate.after_create") == ("rotate.after_create", 1)
    assert crashpoints.parse("destroy.after_device:3") == ("destroy.after_device", 3)
    for wrong in ("rotate.nowhere", "rotate.after_create:0", "rotate.after_create:x", ""):
        with pytest.raises(ConfigError, match=crashpoints.VARIABLE):
            crashpoints.parse(wrong)


def test_an_unarmed_point_does_nothing() -> None:
    crashpoints.disarm()
    for point in crashpoints.POINTS:
        crashpoints.reached(point)   # still here


_ARMED_CHILD = """
import sys
from authority import crashpoints
crashpoints.arm("rotate.after_record", 2)
crashpoints.reached("rotate.after_create")
crashpoints.reached("rotate.after_record")
print("first", flush=True)
crashpoints.reached("rotate.after_record")
print("second", flush=True)
"""


def test_an_armed_point_kills_the_process_the_nth_time() -> None:
    """Another point passes, the first time passes, the second is a SIGKILL (nothing after)."""
    done = subprocess.run([sys.executable, "-c", _ARMED_CHILD], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["first"]


def test_serve_refuses_an_unknown_crash_point(tmp_path: Path) -> None:
    """A typo in the seam stops ``serve`` (status 2, naming the variable) before it opens
    anything."""
    server = ServeProcess(tmp_path, "a", f'state_dir = "{tmp_path / "a"}"\n'
                          '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\n')
    done = subprocess.run(server.command("serve"), capture_output=True, text=True, timeout=60,
                          check=False, env={**_environ(), crashpoints.VARIABLE: "rotate.later"})
    assert done.returncode == 2
    assert "TICKET_AUTHORITY_CRASH_AT: unknown crash point 'rotate.later'" in done.stderr
    assert not (tmp_path / "a" / "authority.db").exists()


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


# -- defects found ---------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    started = single(tmp_path)
    try:
        yield started
    finally:
        started.kill()


@requires_softhsm
def test_a_restart_after_kill_9_does_not_wait_for_its_dead_predecessor(
        server: ServeProcess) -> None:
    """A single server (SQLite, one process: it holds the state directory's lock alone) killed
    with SIGKILL leaves its replica record and the maintenance lease behind. Restarted, it
    counted that dead process as a live replica for cluster.replica_timeout: a rotation then
    was PENDING (failed before: KEY_STATE_PENDING, the previous key still sealing) and the
    maintenance lease stayed the dead process's for lease_duration. Now the restart forgets
    it: the rotation seals at once."""
    server.kill()
    server.serve()
    reply = server.admin.RotateKey(admin_pb2.RotateKeyRequest(), timeout=10)
    assert reply.new_key.state == ACTIVE
    assert reply.previous_key.state == admin_pb2.KEY_STATE_DECRYPT_ONLY
    status = server.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
    assert len(status.replicas) == 1, status.replicas
    assert bytes.fromhex(reply.new_key.key_id) in device_keys(server.state)
