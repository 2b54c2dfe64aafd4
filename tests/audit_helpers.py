"""Helpers shared by the audit tests (the file chain, tests/test_audit.py; the PostgreSQL
chain, tests/test_audit_cluster.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import grpc
import pytest

from authority._proto.ticketauthority.v1 import admin_pb2
from tests.conftest import Harness


def run_together(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Wait until every writer process said ``ready``, tell them all ``go``, and check they
    all exit 0 (within 2 minutes); any left running is killed. Raises: AssertionError."""
    try:
        for proc in procs:   # all opened, all at the same head
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        assert [proc.wait(timeout=120) for proc in procs] == [0] * len(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def admin_actions_refused(h: Harness, old: bytes) -> list[str]:
    """Rotate, retire ``old``, revoke, bump an epoch: each must fail UNAVAILABLE saying the
    audit log cannot be written. Returns their messages. Raises: AssertionError."""
    revoke = admin_pb2.RevokeTicketsRequest(id_i=b"\x02\x00\x00\x00who", reason="test")
    messages = []
    for call in (lambda: h.admin.RotateKey(admin_pb2.RotateKeyRequest()),
                 lambda: h.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=old.hex())),
                 lambda: h.admin.RevokeTickets(revoke),
                 lambda: h.admin.BumpPolicyEpoch(
                     admin_pb2.BumpPolicyEpochRequest(realm="blue"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit log cannot be written" in err.value.details()
        messages.append(err.value.details())
    return messages
