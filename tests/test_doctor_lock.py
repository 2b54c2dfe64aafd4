"""doctor's ``permissions.state_dir`` names the process holding the state directory's lock as
the kernel reports it (/proc/locks), the one reading doctor's TPM checks use too: a lock
released, whose file still holds the pid of a process that is alive, is no longer reported
as in use."""

from __future__ import annotations

import os
from pathlib import Path

from authority.doctor.files import check_state_dir, lock_holder
from authority.doctor.report import Status
from authority.statedir import LOCK_NAME, StateLock
from tests.conftest import make_config


def test_a_released_lock_is_not_reported_in_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = make_config(state)
    assert lock_holder(state) is None

    lock = StateLock.acquire(state)     # this process: it writes its pid in the file
    try:
        held = check_state_dir(config)
        assert lock_holder(state) == os.getpid()
        assert held.status == Status.OK and f"in use by process {os.getpid()}" in held.detail
    finally:
        lock.release()

    assert (state / LOCK_NAME).read_text().strip() == str(os.getpid())   # left behind
    released = check_state_dir(config)
    assert lock_holder(state) is None
    assert released.status == Status.OK and "in use" not in released.detail, released
