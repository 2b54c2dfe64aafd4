"""Scenario 4 of ``ticket-authority chaos`` (issue 16): store faults on a single node (disk full
while serving, read-only and corrupted database at start); the quick run holds (0 wrong
answers, 0 acknowledged consumes lost, each fault reported naming the file, nothing reset)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from authority.chaos import run_one
from authority.chaos.core import table
from authority.errors import DeviceUnavailable
from authority.store.sqlite import SqliteStore
from tests.pkcs11_fixtures import requires_softhsm


@requires_softhsm
def test_the_quick_store_faults_scenario_holds() -> None:
    outcome = run_one("store-faults", quick=True)
    assert outcome.held, table([outcome])
    checked = {what for what, _ in outcome.checks}
    assert "corrupt a table's page: the file is left as it was" in checked
    if os.geteuid() == 0:   # CI: the disk-full part ran
        assert "disk full: the log names authority.db" in checked
        assert outcome.calls > 0 and outcome.figures["disk_failing_calls"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")
def test_a_full_disk_is_unavailable_naming_the_file(tmp_path: Path) -> None:
    """A write the full file system refuses is DeviceUnavailable naming the database file
    (before: 'state store failed: database or disk is full', no file named, in the log and
    in the reply); once space returns the same store writes again."""
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)], check=True)
    try:
        store = SqliteStore(fs / "authority.db")
        try:
            filler = fs / "filler"
            with filler.open("wb", buffering=0) as out:
                try:
                    while True:
                        out.write(b"\0" * 4096)
                except OSError:
                    pass
            with pytest.raises(DeviceUnavailable, match=r"^state store failed: ") as caught:
                store.consume_many([(os.urandom(16), 2**40) for _ in range(2000)], 0.0)
            assert str(fs / "authority.db") in caught.value.message
            filler.unlink()
            assert store.consume_many([(b"\1" * 16, 2**40)], 0.0) == [True]
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)
