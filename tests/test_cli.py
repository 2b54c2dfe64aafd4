"""The ticket-authority command as an operator uses it: real processes, real token, real gRPC."""

from __future__ import annotations

import argparse
import json
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

from authority.admin_cli import DEFAULT_ADDRESS, resolve_address
from authority.audit import AuditLog
from authority.bench.device import raw_device_rate
from authority.bench.progress import Progress
from authority.bench.runner import bench_config
from authority.cli import build_parser, main
from authority.errors import ConfigError
from tests.conftest import Harness, issue

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
    assert " status --listen " in banner and "pkcs11" in banner
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


# -- which server an admin command talks to --------------------------------------------------

ADMIN_COMMANDS = [["status"], ["keys", "list"], ["keys", "rotate"], ["keys", "retire", "00" * 8],
                  ["tickets", "revoke", "--id-i", "0200000061"], ["tickets", "revocations"],
                  ["policy", "bump", "blue"], ["policy", "list"]]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=" ".join)
def test_an_explicit_state_dir_without_a_server_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    for state in (tmp_path / "nowhere", tmp_path):  # no such directory; no server.json in it
        status, out, err = run_main(capsys, *command, "--state-dir", str(state),
                                    "--timeout", "2")
        assert (status, out) == (2, ""), err
        assert err.startswith("ticket-authority: --state-dir: "), err
        assert str(state / "server.json") in err


def test_a_config_whose_server_cannot_be_found_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "authority.toml"
    for server in ("", '[server]\nlisten = "127.0.0.1:0"\n'):   # default listen; port 0
        toml.write_text(f'state_dir = "{tmp_path / "state"}"\n{server}')
        status, out, err = run_main(capsys, "keys", "rotate", "--config", str(toml),
                                    "--timeout", "2")
        assert (status, out) == (2, ""), err
        assert err.startswith("ticket-authority: --config: "), err
        assert str(tmp_path / "state" / "server.json") in err


def test_a_target_that_resolves_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def target(*args: str) -> str:
        return resolve_address(build_parser().parse_args(["status", *args]))

    toml = tmp_path / "authority.toml"
    toml.write_text('[server]\nlisten = "127.0.0.1:6000"\n')
    assert target("--config", str(toml)) == "127.0.0.1:6000"
    toml.write_text('[server]\nlisten = "127.0.0.1:6000"\nadmin_listen = "unix:/run/a.sock"\n')
    assert target("--config", str(toml)) == "unix:/run/a.sock"
    (tmp_path / "server.json").write_text('{"address": "127.0.0.1:7001", "pid": 1}')
    assert target("--state-dir", str(tmp_path)) == "127.0.0.1:7001"
    assert target("--state-dir", str(tmp_path), "--listen", "[::1]:7002") == "[::1]:7002"
    # only the implicit default state directory may fall back to the default address
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("TICKET_AUTHORITY_STATE_DIR", raising=False)
    assert target() == DEFAULT_ADDRESS
    monkeypatch.setenv("TICKET_AUTHORITY_STATE_DIR", str(tmp_path / "env"))
    with pytest.raises(ConfigError, match=r"^TICKET_AUTHORITY_STATE_DIR: .*server\.json"):
        target()


def test_a_damaged_server_file_is_an_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "server.json").write_text("{not json")
    status, _, err = run_main(capsys, "status", "--state-dir", str(tmp_path))
    assert status == 2 and err.startswith("ticket-authority: --state-dir: "), err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_a_positive_number(value: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["status", "--timeout", value, "--listen", "127.0.0.1:1"])
    assert exit_.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def every_parser(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


def test_help_shows_no_raw_markup() -> None:
    for parser in every_parser(build_parser()):
        assert "``" not in parser.format_help(), parser.prog


# -- audit verify ----------------------------------------------------------------------------

def test_audit_verify_defaults_to_the_state_dirs_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    log = AuditLog(state / "audit.log")
    log.record("local", "key.created", {"key_id": "00" * 8})
    log.close()
    status, out, err = run_main(capsys, "audit", "verify", "--state-dir", str(state))
    assert status == 0, err
    assert out.startswith(f"{state / 'audit.log'}: OK, 1 lines")
    monkeypatch.setenv("TICKET_AUTHORITY_STATE_DIR", str(state))
    assert run_main(capsys, "audit", "verify")[1] == out
    elsewhere = tmp_path / "elsewhere.log"
    (state / "audit.log").rename(elsewhere)
    toml = tmp_path / "authority.toml"
    toml.write_text(f'state_dir = "{state}"\naudit_log = "{elsewhere}"\n')
    status, out, _ = run_main(capsys, "audit", "verify", "--config", str(toml))
    assert status == 0 and out.startswith(f"{elsewhere}: OK")
    status, _, err = run_main(capsys, "audit", "verify", "--state-dir", str(state))
    assert status == 2 and f"cannot read {state / 'audit.log'}" in err


# -- keys list: seals made, seals reserved ---------------------------------------------------

def test_keys_list_shows_seals_made_and_reserved_and_json_always_has_seals(
        pkcs11_harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    h = pkcs11_harness
    assert h.running is not None
    address = h.running.address
    status, out, _ = run_main(capsys, "keys", "list", "--json", "--listen", address)
    assert status == 0
    (fresh,) = json.loads(out)["keys"]
    assert fresh["seal_count"] == "0"
    issue(h.tickets, 1)
    assert run_main(capsys, "keys", "rotate", "--listen", address)[0] == 0
    issue(h.tickets, 2)
    issue(h.tickets, 3)
    status, out, _ = run_main(capsys, "keys", "list", "--listen", address)
    rows = {line.split()[1]: line for line in out.splitlines()[2:]}
    assert out.splitlines()[0].split()[-1] == "SEALS"
    assert rows["ACTIVE"].endswith("  2")          # the sealing key's live count
    assert re.search(r"  \d+ reserved$", rows["DECRYPT_ONLY"])  # the store's upper bound


# -- serve: a busy port, and quiet bench and demo --------------------------------------------

@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
def test_a_busy_port_is_refused_before_anything_is_provisioned(tmp_path: Path,
                                                                flag: str) -> None:
    state = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        ports = {"--listen": "127.0.0.1:0", "--metrics-listen": ""} | {flag: address}
        result = cli("serve", "--state-dir", str(state), *(x for kv in ports.items() for x in kv))
    setting = {"--listen": "server.listen", "--metrics-listen": "server.metrics_listen"}[flag]
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"ticket-authority: {setting}: cannot listen on {address}: "
                             "the address is already in use\n")
    assert not (state / "hsm").exists() and not (state / "authority.db").exists()


def test_demo_prints_no_log_lines() -> None:
    result = cli("demo", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("IKEv2 session resumption")
    assert " INFO " not in result.stderr and " INFO " not in result.stdout, result.stderr


def test_bench_opens_its_device_without_log_lines(tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    config = bench_config(tmp_path / "state", "pkcs11")
    run = raw_device_rate(config, 4, 0.2, Progress(enabled=False).bar("raw", 0.2))
    assert run.tally.ok
    out, err = capfd.readouterr()
    assert " INFO " not in out + err, err


def test_keys_table_names_every_key_state_of_the_proto() -> None:
    from authority._proto.ticketauthority.v1 import admin_pb2
    from authority.admin_cli import commands

    table = commands()[("keys", "list")].table
    for name, number in admin_pb2.KeyState.items():
        if number:
            key = admin_pb2.KeyInfo(key_id="00" * 8, state=number)
            listed = table(admin_pb2.ListKeysResponse(keys=[key]))
            assert listed.splitlines()[2].split()[1] == name.removeprefix("KEY_STATE_")


# -- the banner's "Try:" lines work on the machine scripts/run set up --------------------------

NOT_ON_MINIMAL_DEBIAN = {"grpcurl", "curl", "wget"}


def test_the_try_lines_work_where_scripts_run_started_the_server(tmp_path: Path) -> None:
    program = ROOT / ".venv" / "bin" / "ticket-authority"
    if not program.exists():
        pytest.skip("scripts/bootstrap has not run here")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}   # a login shell's PATH: no .venv/bin
    proc = subprocess.Popen([str(program), "serve", "--state-dir", str(tmp_path / "state"),
                             "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Stop with"):
                break
        tries = banner[banner.index("Try:\n") + 1:-1]
        assert tries
        for line in tries:
            command = line.strip()
            assert command.split()[0] not in NOT_ON_MINIMAL_DEBIAN, command
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, f"{command}: {done.stderr}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
