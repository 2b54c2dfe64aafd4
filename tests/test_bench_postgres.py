"""``ticket-authority bench --store postgresql`` with tiny settings, and the throwaway PostgreSQL
it starts (authority/devdb.py): one SQLite replica, one and two PostgreSQL replicas in the same
run, every figure under its JSON key as a sane number, the targets judged. A real SoftHSM2
token, real server subprocesses, a real PostgreSQL; no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authority import devdb
from authority.bench import main
from authority.bench.report import render
from authority.errors import StartupError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--duration", "0.4", "--storm-tickets", "400", "--concurrency", "4",
        "--batch-size", "50", "--json", "--no-progress"]
PREFIXES = ("pg_", "pg2_")
#: per configuration: the storm, batched redeem and unary redeem, rate and p99
FIGURES = ("storm_seconds", "storm_per_s", "batch_redeem_per_s", "batch_redeem_p99_ms",
           "unary_redeem_per_s", "unary_redeem_p99_ms", "redeem_p99_ms",
           "store_bytes_per_ticket")
RATIOS = ("pg_storm_ratio_sqlite", "pg2_storm_ratio_sqlite",
          "pg_unary_redeem_p99_ratio_sqlite", "pg2_unary_redeem_p99_ratio_sqlite",
          "pg_batch_redeem_ratio_sqlite", "pg2_batch_redeem_ratio_sqlite")
TARGETS = ("pg2_storm_vs_sqlite", "pg_unary_redeem_p99_vs_sqlite",
           "pg2_unary_redeem_p99_vs_sqlite")

needs_postgres = pytest.mark.skipif(devdb.unavailable() is not None,
                                    reason=str(devdb.unavailable()))


@pytest.fixture(scope="module")
def store_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One tiny ``--store postgresql`` run (the slow part, shared by the tests below) and its
    state directory."""
    if devdb.unavailable() is not None:
        pytest.skip(str(devdb.unavailable()))
    state = tmp_path_factory.mktemp("bench-pg") / "state"
    done = subprocess.run([sys.executable, "-m", "authority.bench", *TINY, "--state-dir",
                           str(state), "--store", "postgresql"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures, state


def test_every_configuration_has_its_figures(store_run: tuple[dict[str, Any], Path]) -> None:
    f, _ = store_run
    assert f["failures"] == 0 and not f["errors"]
    assert list(f["by_store"]) == ["sqlite", "pg", "pg2"]
    assert f["store"] == "sqlite" and f["pg_store"] == "postgresql"
    assert f["pg_server_processes"] == 1 and f["pg2_server_processes"] == 2
    for prefix in ("", *PREFIXES):
        for key in FIGURES:
            value = f[prefix + key]
            assert isinstance(value, int | float) and value > 0, prefix + key
        assert f[prefix + "storm_tickets"] == 400 and f[prefix + "storm_failures"] == 0
        assert f[prefix + "consumed_entries"] == 400
    assert f["unary_redeem_p99_ms"] == f["redeem_p99_ms"]
    assert f["pg_unary_redeem_p99_ms"] == f["pg_redeem_p99_ms"]
    offered = {s["same_load_offered_per_s"] for s in f["by_store"].values()}
    assert len(offered) == 1  # the same load offered to each server
    for prefix in ("", *PREFIXES):   # each server's unary rounds ran the one-session slices
        assert f[prefix + "unary_ceiling_per_s"] > 0, prefix
        assert f[prefix + "unary_redeem_ratio_ceiling"] > 0, prefix
    assert f["gateway_cpu_us_at_8"] is None and "--store" in f["gateway"]["notes"][0]


def test_ratios_and_targets_are_judged(store_run: tuple[dict[str, Any], Path]) -> None:
    f, _ = store_run
    for key in RATIOS:
        assert isinstance(f[key], float) and f[key] > 0, key
    assert f["pg2_storm_ratio_sqlite"] == pytest.approx(f["pg2_storm_per_s"] / f["storm_per_s"])
    assert f["pg_unary_redeem_p99_ratio_sqlite"] == pytest.approx(
        f["pg_redeem_p99_ms"] / f["redeem_p99_ms"])
    for name in TARGETS:
        assert f["targets"][name]["met"] in (True, False), name
        flag = name.replace("_vs_sqlite", "_target_met")
        assert f[flag] is f["targets"][name]["met"]


def test_database_cpu_is_measured_on_postgresql_only(
        store_run: tuple[dict[str, Any], Path]) -> None:
    stores = store_run[0]["by_store"]
    assert all(v is None for v in stores["sqlite"]["db_cpu_us_per_item"].values())
    for label in ("pg", "pg2"):   # /proc counts 10 ms ticks: a tiny run may show 0
        assert stores[label]["db_cpu_us_per_item"]["consume"] >= 0, label


def test_table_shows_the_stores_side_by_side(store_run: tuple[dict[str, Any], Path]) -> None:
    table = render(store_run[0])
    section = table.split("stores (")[1]
    for text in ("SQLite, 1 replica", "PostgreSQL, 1 replica", "PostgreSQL, 2 replicas",
                 "storm seconds", "batched redeem p99", "unary redeem p99",
                 "PostgreSQL CPU µs/item", "target: storm through 2 PostgreSQL replicas"):
        assert text in section


def test_the_dsn_files_are_removed(store_run: tuple[dict[str, Any], Path]) -> None:
    assert store_run[1].is_dir() and not list(store_run[1].rglob("*.dsn"))


@pytest.mark.parametrize("flags", [["--address", "127.0.0.1:1"], ["--backend", "tpm"],
                                   ["--server-processes", "1,2"], ["--server-mode", "both"]])
def test_flags_postgresql_cannot_go_with_are_refused(
        flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", "postgresql", "--no-progress", *flags]) == 2
    assert "--store: postgresql" in capsys.readouterr().err


def test_an_unknown_store_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--store", "mysql"])
    assert exit_.value.code == 2
    assert "sqlite, postgresql" in capsys.readouterr().err


@needs_postgres
def test_devdb_is_socket_only_asks_a_password_keeps_durability_and_cleans_up() -> None:
    import psycopg

    with devdb.DevPostgres.launch() as db:
        name = db.create_database()
        with psycopg.connect(db.dsn(name)) as conn:
            settings = {s: conn.execute(f"SHOW {s}").fetchone()[0]  # type: ignore[index]
                        for s in ("listen_addresses", "fsync", "synchronous_commit",
                                  "full_page_writes", "password_encryption")}
        assert settings == {"listen_addresses": "", "fsync": "on", "synchronous_commit": "on",
                            "full_page_writes": "on", "password_encryption": "scram-sha-256"}
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(db.dsn(name, password="wrong")).close()
        pid, directory = db.pid, db.directory
        assert pid is not None and db.password not in repr(db)
    assert not directory.exists()
    assert _gone(pid)


def _gone(pid: int) -> bool:
    """True when ``pid`` has exited (gone, or a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_devdb_without_binaries_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devdb, "find_binaries", lambda: None)
    with pytest.raises(StartupError, match="postgresql package"):
        devdb.DevPostgres.launch()
