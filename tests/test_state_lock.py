"""One authority per state directory: a second one, in this process or another, is refused
with a message naming the directory and the process that holds it. Real SoftHSM2 token, real
server processes."""

from __future__ import annotations

import os
import re
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
from tests.conftest import issue, make_config, redeem

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
        assert proc.stdout is not None
        banner = ""
        for line in proc.stdout:
            banner += line
            if line.startswith("Stop with"):
                break
        match = re.search(r"listening on (\S+)", banner)
        assert match, banner
        with pytest.raises(StartupError) as err:
            Authority.open(make_config(state, "pkcs11", "threads"), ManualClock())
        assert str(state) in str(err.value) and f"process {proc.pid}" in str(err.value)
        with grpc.insecure_channel(match.group(1)) as channel:   # the first still serves
            stub = authority_pb2_grpc.TicketAuthorityStub(channel)
            assert redeem(stub, issue(stub).ticket).result == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
