"""RotateKey's ``previous_key`` is the key that rotation replaced (issue 13): two rotations one
after the other in the same instant (a manual clock that does not move: the demoted keys stop
sealing at the same time) each name the key they demoted, never the one before it. On a real
SoftHSM2 token, over both stores (the domain call), and over real gRPC (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authority._proto.ticketauthority.v1 import admin_pb2
from authority.app import Authority
from authority.clock import ManualClock
from authority.config import ClusterSettings
from authority.keys import KeyState
from tests.conftest import START, Harness
from tests.pkcs11_fixtures import requires_softhsm
from tests.postgres_fixtures import (  # noqa: F401
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.replica_fixtures import SharedToken

pytestmark = requires_softhsm

TIMING = ClusterSettings(heartbeat_interval=1.0, replica_timeout=5.0, lease_duration=5.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def alone(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Authority]:
    """One replica (alone: a rotation seals at once) on a manual clock that never moves."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    token = SharedToken(tmp_path, dsn, TIMING)
    try:
        yield token.load(token.replica_config(), token.open_store(), ManualClock(START))
    finally:
        token.close()


def test_each_rotation_names_the_key_it_replaced(alone: Authority) -> None:
    ring = alone.ring
    sealing = ring.primary_id
    for _ in range(3):
        new, previous = ring.rotate(reason="operator")
        assert new.state == KeyState.ACTIVE and new.key_id == ring.primary_id
        assert previous is not None
        assert previous.key_id == sealing, "previous_key names another key than the one replaced"
        assert previous.state == KeyState.DECRYPT_ONLY
        sealing = new.key_id


def test_rotate_key_reply_names_the_key_it_replaced(pkcs11_harness: Harness) -> None:
    admin = pkcs11_harness.admin
    sealing = admin.GetStatus(admin_pb2.GetStatusRequest()).sealing_key_id
    for _ in range(3):   # the harness's manual clock does not move between them
        reply = admin.RotateKey(admin_pb2.RotateKeyRequest())
        assert reply.HasField("previous_key")
        assert reply.previous_key.key_id == sealing
        assert reply.previous_key.state == admin_pb2.KEY_STATE_DECRYPT_ONLY
        assert reply.new_key.state == admin_pb2.KEY_STATE_ACTIVE
        sealing = reply.new_key.key_id
