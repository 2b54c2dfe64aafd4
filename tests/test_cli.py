"""The ticket-authority command as an operator uses it: real processes, real token, real gRPC."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authority.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


class Server:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "authority.cli", "serve", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.banner: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.banner.append(line)
            if line.startswith("Stop with"):
                break
        match = re.search(r"listening on (\S+)", "".join(self.banner))
        assert match, "".join(self.banner)
        self.address = match.group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    state = tmp_path / "state"
    srv = Server(["--state-dir", str(state), "--listen", "127.0.0.1:0",
                  "--metrics-listen", "127.0.0.1:0"])
    yield srv, state
    srv.stop()


def test_operator_session(server: tuple[Server, Path]) -> None:
    srv, state = server
    banner = "".join(srv.banner)
    assert "ticket-authority status" in banner and "pkcs11" in banner
    assert "server    aio (one event loop; ticket device calls inline" in banner
    status = cli("status", "--state-dir", str(state))  # address found via the state dir
    assert status.returncode == 0, status.stderr
    assert "pkcs11" in status.stdout and "sealing key" in status.stdout
    listing = cli("keys", "list", "--state-dir", str(state))
    assert listing.returncode == 0 and "ACTIVE" in listing.stdout
    first = re.search(r"^([0-9a-f]{16})\s+ACTIVE", listing.stdout, re.MULTILINE)
    assert first
    refused = cli("keys", "retire", first.group(1), "--listen", srv.address)
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    rotated = cli("keys", "rotate", "--state-dir", str(state))
    assert rotated.returncode == 0 and "DECRYPT_ONLY" in rotated.stdout
    retired = cli("keys", "retire", first.group(1), "--state-dir", str(state))
    assert retired.returncode == 0 and "DESTROYED" in retired.stdout
    as_json = cli("keys", "list", "--all", "--json", "--state-dir", str(state))
    assert as_json.stdout.count('"key_id"') == 2
    assert srv.stop() == 0
    assert not (state / "server.json").exists()


def test_state_dir_secrets_are_private(server: tuple[Server, Path]) -> None:
    _, state = server
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    pins = [p for p in state.rglob("*.pin")]
    assert pins
    for pin in pins:
        assert stat.S_IMODE(pin.stat().st_mode) == 0o600
    for log_line in _all_text(state):
        for pin in pins:
            assert pin.read_text().strip() not in log_line


def _all_text(state: Path) -> list[str]:
    return [p.read_text(errors="replace") for p in state.rglob("*.json")]


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli("status", "--listen", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert "cannot reach" in result.stderr or "UNAVAILABLE" in result.stderr


@pytest.mark.parametrize(("args", "toml", "setting"), [
    (["--listen", "0.0.0.0:50051"], None, "server.listen"),
    (["--listen", "localhost"], None, "server.listen"),
    ([], "[tickets]\nmax_lifetime = -1\n", "tickets.max_lifetime"),
    ([], "[tickets]\ndefault_lifetime = 'long'\n", "tickets.default_lifetime"),
    ([], "[keys]\nmax_seals_per_key = 8589934592\n", "keys.max_seals_per_key"),
    ([], "[server]\nlisten_port = 1\n", "server.listen_port"),
    ([], "backend = 'floppy'\n", "backend"),
    ([], "[pkcs11]\nmodule = '/x.so'\n", "pkcs11.token_label"),
    ([], "not toml [", "--config"),
])
def test_bad_settings_are_startup_errors_naming_the_setting(
        tmp_path: Path, args: list[str], toml: str | None, setting: str) -> None:
    extra = list(args)
    if toml is not None:
        (tmp_path / "authority.toml").write_text(toml)
        extra += ["--config", str(tmp_path / "authority.toml")]
    result = cli("serve", "--state-dir", str(tmp_path / "state"), "--metrics-listen", "", *extra)
    assert result.returncode == 2
    assert result.stderr.startswith(f"ticket-authority: {setting}:"), result.stderr


def test_serve_with_no_arguments_uses_the_embedded_defaults(tmp_path: Path) -> None:
    for port in (50051, 9464):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"127.0.0.1:{port} is in use on this machine")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("XDG_STATE_HOME", None)
    env.pop("TICKET_AUTHORITY_STATE_DIR", None)
    srv = Server([], env=env)
    try:
        assert srv.address == "127.0.0.1:50051"
        state = tmp_path / ".local" / "state" / "ticket-authority"
        assert (state / "hsm" / "softhsm2.conf").exists()
        result = cli("keys", "list", env=env)
        assert result.returncode == 0 and "ACTIVE" in result.stdout
    finally:
        assert srv.stop() == 0
    again = Server([], env=env)  # second start reuses token, PIN and key
    try:
        listing = cli("keys", "list", env=env).stdout
        assert listing == result.stdout
    finally:
        again.stop()


def test_serve_backend_tpm_starts_its_own_swtpm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    srv = Server(["--backend", "tpm", "--state-dir", str(state), "--listen", "127.0.0.1:0",
                  "--metrics-listen", ""])
    try:
        status = cli("status", "--state-dir", str(state))
        assert status.returncode == 0, status.stderr
        assert re.search(r"^backend\s+tpm$", status.stdout, re.MULTILINE)
        assert "server    threads (16 workers)" in "".join(srv.banner)
        assert "swtpm" in status.stdout
        assert "ACTIVE" in cli("keys", "list", "--state-dir", str(state)).stdout
    finally:
        assert srv.stop() == 0
    leftover = subprocess.run(["pgrep", "-f", f"swtpm.*{state}"], capture_output=True,
                              text=True, check=False)
    assert leftover.stdout == "", "the embedded swtpm must stop with the service"
