"""Settings: defaults, TOML, flags, validation naming the setting, secrets kept out of reprs."""

from __future__ import annotations

from pathlib import Path

import pytest

from authority.config import Config, KeyPolicy, Secret, ServerSettings, TicketPolicy
from authority.errors import ConfigError
from authority.settings_loader import load_config, parse_listen
from tests.conftest import load_toml

ROOT = Path(__file__).resolve().parent.parent


def test_example_file_states_the_defaults(tmp_path: Path) -> None:
    config = load_config(ROOT / "hsm-config" / "authority.example.toml", state_dir=tmp_path)
    assert config == Config(state_dir=tmp_path.resolve())
    assert (config.server, config.tickets, config.keys) == (ServerSettings(), TicketPolicy(),
                                                            KeyPolicy())
    assert config.embedded_token


def test_flags_override_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('state_dir = "/nowhere"\n[server]\nlisten = "127.0.0.1:6000"\n')
    config = load_config(toml, listen="[::1]:7000", state_dir=tmp_path / "s")
    assert config.server.listen == "[::1]:7000"
    assert config.state_dir == (tmp_path / "s").resolve()


def test_pkcs11_table_with_pin_file(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("123456\n")
    toml = tmp_path / "a.toml"
    toml.write_text(f'[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin_file = "{pin}"\n'
                    "sessions = 2\n")
    config = load_config(toml, state_dir=tmp_path)
    assert config.pkcs11 is not None and config.pkcs11.pin.reveal() == "123456"
    assert "123456" not in repr(config) and "123456" not in str(config.pkcs11)
    assert not config.embedded_token


def test_pin_sources_are_exclusive(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin = "1"\npin_env = "X"\n')
    with pytest.raises(ConfigError, match=r"^pkcs11\.pin:"):
        load_config(toml, state_dir=tmp_path)


def test_secret_never_shows() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}" and secret.reveal() == "hunter2"


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:0", "127.0.0.1", 0), ("127.0.0.5:1", "127.0.0.5", 1),
    ("localhost:50051", "localhost", 50051), ("[::1]:50051", "[::1]", 50051),
    ("127.0.0.1:65535", "127.0.0.1", 65535)])
def test_loopback_listen_is_accepted(listen: str, host: str, port: int) -> None:
    assert parse_listen(listen) == (host, port)


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("0.0.0.0:50051", "0.0.0.0", 50051), ("[::]:1", "[::]", 1),  # noqa: S104
    ("authority.example.net:443", "authority.example.net", 443)])
def test_any_host_is_accepted_where_tls_allows_it(listen: str, host: str, port: int) -> None:
    assert parse_listen(listen, loopback_only=False) == (host, port)


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.0.0.1:1", "[::]:1", "example.com:1",
                                    "127.0.0.1", "127.0.0.1:70000", ":50051", "127.0.0.1:x"])
def test_other_listen_values_are_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^server\.listen:"):
        parse_listen(listen)


def test_lifetimes_must_be_consistent(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text("[tickets]\ndefault_lifetime = 9000\nmax_lifetime = 600\n")
    with pytest.raises(ConfigError, match=r"^tickets\.default_lifetime:"):
        load_config(toml, state_dir=tmp_path)


def test_tpm_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OWNER_AUTH", "s3cret")
    toml = tmp_path / "a.toml"
    toml.write_text('backend = "tpm"\n[tpm]\ntcti = "device:/dev/tpmrm0"\n'
                    'owner_auth_env = "OWNER_AUTH"\nretries = 3\nqueue_size = 16\n')
    config = load_config(toml, state_dir=tmp_path)
    assert config.backend == "tpm" and not config.embedded_token
    assert config.tpm.tcti == "device:/dev/tpmrm0" and config.tpm.retries == 3
    assert config.tpm.owner_auth.reveal() == "s3cret" and "s3cret" not in repr(config)
    toml.write_text("[tpm]\nqueue_size = 0\n")
    with pytest.raises(ConfigError, match=r"^tpm\.queue_size:"):
        load_config(toml, state_dir=tmp_path)


@pytest.mark.parametrize("body, setting", [
    ('[tpm]\nkey_dir = 5\n', "tpm.key_dir"),
    ('[tpm]\nowner_auth_file = 5\n', "tpm.owner_auth_file"),
    ('[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin_file = 5\n', "pkcs11.pin_file"),
    ('[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin = "1"\nsofthsm2_conf = 7\n',
     "pkcs11.softhsm2_conf"),
    ('[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin = "1"\nso_pin_file = []\n',
     "pkcs11.so_pin_file"),
    ('[postgresql]\ndsn_file = 3\n', "postgresql.dsn_file"),
    ("[server]\ngrace_seconds = -1\n", "server.grace_seconds"),
])
def test_a_setting_of_the_wrong_kind_is_named_not_a_crash(tmp_path: Path, body: str,
                                                          setting: str) -> None:
    """A path given as a number (before: TypeError out of pathlib, a traceback instead of exit
    2), a negative grace (before: loaded): ConfigError naming the setting."""
    with pytest.raises(ConfigError) as refused:
        load_toml(tmp_path, body)
    assert setting in str(refused.value)
