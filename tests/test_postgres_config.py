"""The ``[postgresql]`` table (authority/settings_loader.py): the DSN from exactly one of dsn,
dsn_file, dsn_env; its password never in reprs, logs or errors (the loader's, the store's at
start-up and while serving); the TPM backend refused with it; the store an authority opens.
The failures are real: a real PostgreSQL (tests/postgres_fixtures.py) refusing a password, a
socket that is not there, a database dropped under a running store."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from authority.app import Authority, open_store
from authority.config import Config, PostgresSettings, Secret
from authority.errors import ConfigError, DeviceUnavailable, StartupError
from authority.store.sqlite import SqliteStore
from tests.conftest import START, load_toml
from tests.postgres_fixtures import (  # noqa: F401
    PostgresServer,
    postgres_dsn_fixture,
    postgres_server_fixture,
)

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Pw-n0t-1n-l0gs"
DSN = f"host=db.example.org port=5433 dbname=authority user=ta password={PASSWORD}"
DSN_VAR = "TA_TEST_POSTGRES_DSN"


def pg(tmp_path: Path, body: str, head: str = "") -> Config:
    return load_toml(tmp_path, f"{head}[postgresql]\n{body}")


def test_dsn_file_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(DSN + "\n")
    cfg = pg(tmp_path, f'dsn_file = "{tmp_path / "dsn"}"\n')
    assert cfg.postgresql == PostgresSettings(dsn=Secret(DSN))
    assert cfg.postgresql.dsn.reveal() == DSN
    assert (cfg.postgresql.pool_size, cfg.postgresql.statement_timeout,
            cfg.postgresql.connect_timeout) == (10, 5.0, 5.0)
    for shown in (repr(cfg), str(cfg), repr(cfg.postgresql), f"{cfg.postgresql.dsn}"):
        assert PASSWORD not in shown and "db.example.org" not in shown


def test_settings(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(DSN)
    cfg = pg(tmp_path, f'dsn_file = "{tmp_path / "dsn"}"\npool_size = 3\n'
                       "statement_timeout = 1.5\nconnect_timeout = 2\n")
    assert cfg.postgresql == PostgresSettings(Secret(DSN), 3, 1.5, 2.0)


def test_no_postgresql_table_keeps_sqlite(tmp_path: Path) -> None:
    cfg = load_toml(tmp_path, "")
    assert cfg.postgresql is None
    store = open_store(cfg)
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "authority.db"
    finally:
        store.close()


def test_dsn_env_is_read_once_and_removed(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DSN_VAR, DSN)
    cfg = pg(tmp_path, f'dsn_env = "{DSN_VAR}"\n')
    assert cfg.postgresql is not None and cfg.postgresql.dsn.reveal() == DSN
    assert DSN_VAR not in os.environ
    with pytest.raises(ConfigError, match=f"^postgresql.dsn_env: environment variable "
                                          f"{DSN_VAR} unset"):
        pg(tmp_path, f'dsn_env = "{DSN_VAR}"\n')


def test_inline_dsn_warns_without_the_password(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        cfg = pg(tmp_path, f'dsn = "{DSN}"\n')
    assert cfg.postgresql is not None and cfg.postgresql.dsn.reveal() == DSN
    assert "postgresql.dsn holds a password inline" in caplog.text
    assert PASSWORD not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        pg(tmp_path, 'dsn = "host=/run/postgresql dbname=authority"\n')
    assert "inline" not in caplog.text


@pytest.mark.parametrize(("body", "setting", "problem"), [
    ("pool_size = 4\n", "postgresql.dsn", "give exactly one of dsn_file, dsn_env or dsn"),
    (f'dsn = "{DSN}"\ndsn_env = "X"\n', "postgresql.dsn", "give exactly one"),
    ('dsn_file = "f"\ndsn_env = "X"\n', "postgresql.dsn", "give exactly one"),
    ('dsn = ""\n', "postgresql.dsn", "empty"),
    ("dsn = 5\n", "postgresql.dsn", "must be a string"),
    ('dsn_file = "/nonexistent/dsn"\n', "postgresql.dsn_file", "cannot read"),
    (f'dsn = "{DSN}"\npassword = "x"\n', "postgresql.password", "unknown setting"),
    (f'dsn = "{DSN}"\npool_size = 0\n', "postgresql.pool_size", "must be positive"),
    (f'dsn = "{DSN}"\npool_size = "4"\n', "postgresql.pool_size", "must be a int"),
    (f'dsn = "{DSN}"\nstatement_timeout = 0\n', "postgresql.statement_timeout",
     "must be positive"),
    (f'dsn = "{DSN}"\nconnect_timeout = -1.0\n', "postgresql.connect_timeout",
     "must be positive"),
])
def test_bad_settings_are_named(tmp_path: Path, body: str, setting: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        pg(tmp_path, body)
    assert err.value.setting == setting
    assert problem in str(err.value)
    assert PASSWORD not in str(err.value)


def test_postgresql_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^postgresql: must be a table"):
        load_toml(tmp_path, 'postgresql = "host=x"\n')


@pytest.mark.parametrize("dsn", [
    "host=db password=se cret dbname",              # libpq: missing "=" after "cret"
    "host=db password='unterminated secret",
    "postgresql://ta:se%ZZcret@db/authority",
])
def test_a_malformed_dsn_is_refused_without_repeating_it(tmp_path: Path, dsn: str) -> None:
    (tmp_path / "dsn").write_text(dsn)
    with pytest.raises(ConfigError) as err:
        pg(tmp_path, f'dsn_file = "{tmp_path / "dsn"}"\n')
    assert str(err.value) == ("postgresql.dsn_file: not a libpq connection string (key=value "
                              "...) or postgresql:// URI (not shown: it may hold a password)")


def test_the_tpm_backend_is_refused_with_postgresql(tmp_path: Path) -> None:
    for head, flag in (('backend = "tpm"\n', None), ("", "tpm")):
        path = tmp_path / "authority.toml"
        path.write_text(f'{head}[postgresql]\ndsn = "host=/run/postgresql"\n')
        from authority.settings_loader import load_config

        with pytest.raises(ConfigError) as err:
            load_config(path, state_dir=tmp_path, backend=flag)
        assert err.value.setting == "postgresql"
        assert "a TPM binds its keys to one chip" in str(err.value)


def test_authority_open_refuses_tpm_with_postgresql_before_any_device(tmp_path: Path) -> None:
    """A Config built without the loader is refused too, before a TPM or the database is
    touched (nothing listens at this DSN)."""
    config = replace(Config(state_dir=tmp_path / "state", backend="tpm"),
                     postgresql=PostgresSettings(dsn=Secret(DSN)))
    with pytest.raises(ConfigError, match=r"^postgresql: cannot be used with backend"):
        Authority.open(config)
    assert not (tmp_path / "state" / "tpm").exists()


def test_the_example_table_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hsm-config/authority.example.toml's commented [postgresql] table, uncommented, loads."""
    text = (ROOT / "hsm-config" / "authority.example.toml").read_text()
    block = text[text.index("# [postgresql]"):].split("\n\n")[0]
    lines = [m.group(1) for m in re.finditer(r"^# (\[postgresql\]|\w+ = .*)$", block,
                                             re.MULTILINE)]
    assert lines[0] == "[postgresql]" and any(x.startswith("dsn_file") for x in lines)
    (tmp_path / "postgresql.dsn").write_text(DSN)
    toml = "\n".join(lines).replace('"/etc/ticket-authority/postgresql.dsn"',
                                    f'"{tmp_path / "postgresql.dsn"}"')
    cfg = load_toml(tmp_path, toml)
    assert cfg.postgresql == PostgresSettings(dsn=Secret(DSN))


# -- the password stays out of what a real database's failures produce --------------------------

def test_a_refused_password_is_not_repeated(postgres_server: PostgresServer,
                                            postgres_dsn: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from authority.store.postgres import PostgresStore

    wrong = f"wrong-{PASSWORD}"
    dsn = postgres_dsn.replace(postgres_server.password, wrong)
    with caplog.at_level(logging.DEBUG), pytest.raises(StartupError) as err:
        PostgresStore(PostgresSettings(dsn=Secret(dsn), connect_timeout=2))
    message = str(err.value)
    assert message.startswith(f"state store postgresql host={postgres_server.directory} "
                              "port=5432 dbname=t_")
    assert "password authentication failed" in message
    for text in (message, caplog.text):
        assert wrong not in text and PASSWORD not in text and dsn not in text


def test_an_unreachable_database_is_a_startup_error_without_secrets(tmp_path: Path) -> None:
    from authority.store.postgres import PostgresStore

    dsn = f"host={tmp_path} dbname=authority user=ta password={PASSWORD}"
    with pytest.raises(StartupError) as err:
        PostgresStore(PostgresSettings(dsn=Secret(dsn), connect_timeout=2))
    assert str(err.value).startswith(f"state store postgresql host={tmp_path} dbname=authority "
                                     "user=ta: ")
    assert PASSWORD not in str(err.value)


def test_a_database_gone_while_serving_is_unavailable_without_secrets(
        postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """The database is dropped under a running store: calls fail UNAVAILABLE (lost connection,
    then no connection within connect_timeout), and neither the errors nor the pool's log
    lines show the password."""
    from authority.store.postgres import PostgresStore

    name = postgres_server.create_database()
    store = PostgresStore(PostgresSettings(dsn=Secret(postgres_server.dsn(name)), pool_size=2,
                                           connect_timeout=1))
    try:
        assert store.consume_many([(bytes(16), int(START) + 60)], START) == [True]
        with caplog.at_level(logging.DEBUG):
            postgres_server.drop_database(name)
            errors = []
            for _ in range(2):
                with pytest.raises(DeviceUnavailable) as err:
                    store.consumed_count(START)
                errors.append(str(err.value))
        assert all(e.startswith("state store failed: ") for e in errors)
        assert "couldn't get a connection" in errors[-1]
        for text in (*errors, caplog.text):
            assert postgres_server.password not in text
    finally:
        store.close()


@pytest.mark.parametrize(("dsn", "secret"), [
    (f"host=db password={PASSWORD} dbname=a", PASSWORD),
    ("host=db password='two words' dbname=a", "two words"),
    ("postgresql://ta:p%40ss-w0rd@db/authority", "p@ss-w0rd"),
    ("postgresql://ta:p%40ss-w0rd@db/authority", "p%40ss-w0rd"),
    ("host=db sslpassword=keypass", "keypass"),
])
def test_scrub_hides_the_dsn_and_its_passwords(dsn: str, secret: str) -> None:
    from authority.store.postgres import scrub_secrets

    message = (f"failed: {dsn}; password={secret}; tried {secret} and "
               f"postgresql://u:{secret}@h/d")
    scrubbed = scrub_secrets(message, dsn)
    assert secret not in scrubbed
    assert "********" in scrubbed
    assert scrub_secrets("nothing secret here", dsn) == "nothing secret here"


def test_scrub_hides_a_short_password_as_a_word_only() -> None:
    from authority.store.postgres import scrub_secrets

    dsn = "host=/nonexistent dbname=x password=y"
    assert scrub_secrets('socket "/nonexistent/.s.PGSQL.5432": No such file or directory; '
                         "tried y", dsn) == ('socket "/nonexistent/.s.PGSQL.5432": No such '
                                             "file or directory; tried ********")


def test_a_transaction_left_idle_by_a_stopped_replica_is_ended_by_the_server(
        postgres_dsn: str) -> None:
    """A replica stopped (SIGSTOP, a hung host) inside a transaction must not hold its locks
    for ever: the server ends a transaction idle for 2 x statement_timeout + 1 s (before: the
    lock was held until the replica resumed; found by chaos replica-kill)."""
    import time

    import psycopg

    from authority.store.postgres import PostgresStore

    store = PostgresStore(PostgresSettings(dsn=Secret(postgres_dsn), pool_size=2,
                                           statement_timeout=0.5))
    try:
        with store._pool.connection() as stalled:
            stalled.execute("BEGIN")
            stalled.execute("LOCK TABLE audit IN EXCLUSIVE MODE")
            time.sleep(2.5)                  # idle in its transaction past 2 x 0.5 + 1 s
            with psycopg.connect(postgres_dsn, autocommit=True) as other:
                other.execute("SET lock_timeout = '1s'")
                other.execute("BEGIN")
                other.execute("LOCK TABLE audit IN EXCLUSIVE MODE")   # free again
                other.execute("ROLLBACK")
            with pytest.raises(psycopg.Error, match="idle-in-transaction timeout"):
                stalled.execute("SELECT 1")  # its session was ended
    finally:
        store.close()
