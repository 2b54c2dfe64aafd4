"""Replicas for the scenarios on PostgreSQL (pg-failover, replica-kill): ``ticket-authority
serve`` processes with their own state directories, one embedded SoftHSM2 token and one
database (its DSN in a file), the short intervals of tests/test_cluster_e2e.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from authority._proto.ticketauthority.v1 import admin_pb2
from authority.bench.serveproc import CALL, ServeProcess
from authority.config import Pkcs11Settings

HEARTBEAT = 0.2        # cluster.heartbeat_interval
LEASE = 1.0            # cluster.lease_duration (and replica_timeout)
STALENESS = 3.0        # store.max_staleness
CONNECT_TIMEOUT = 2.0  # postgresql.connect_timeout (also the wait for a pooled connection)
PUBLISH_DELAY = 5      # keys.publish_delay unless ``keys`` says: a new key seals by then
APPLICATION = "ita-"   # + the replica's name: its connections' application_name


def settings(state: Path, token: Pkcs11Settings, dsn_file: Path, keys: str = "") -> str:
    """One replica's TOML: its state directory, the shared ``token`` (an embedded one:
    ``provision_embedded_token``), the database, short intervals; ``keys``: more ``[keys]``
    lines (``publish_delay = PUBLISH_DELAY`` unless given)."""
    assert token.softhsm2_conf is not None
    pin_file = token.softhsm2_conf.parent / "user.pin"
    keys = keys if "publish_delay" in keys else f"publish_delay = {PUBLISH_DELAY}\n" + keys
    return (f'state_dir = "{state}"\nbackend = "pkcs11"\n'
            '[server]\nlisten = "127.0.0.1:0"\nprocesses = 1\nmetrics_listen = ""\n'
            f'[pkcs11]\nmodule = "{token.module}"\ntoken_label = "{token.token_label}"\n'
            f'pin_file = "{pin_file}"\nsofthsm2_conf = "{token.softhsm2_conf}"\nsessions = 4\n'
            f'[postgresql]\ndsn_file = "{dsn_file}"\npool_size = 4\n'
            f"connect_timeout = {CONNECT_TIMEOUT}\n"
            f"[cluster]\nheartbeat_interval = {HEARTBEAT}\nreplica_timeout = {LEASE}\n"
            f"lease_duration = {LEASE}\n"
            f"[keys]\n{keys}"
            f"[store]\nmax_staleness = {STALENESS}\n")


@contextlib.contextmanager
def replicas(work: Path, dsn: str, names: tuple[str, ...] = ("a", "b", "c"),
             keys: str = "") -> Iterator[list[ServeProcess]]:
    """Started replicas ``names`` in ``work`` on database ``dsn`` (libpq key=value; each
    replica's connections named ``APPLICATION`` + its name), one after the other (as
    ``server.processes`` starts its own); every one SIGTERMed (SIGKILL after 30 s) on exit,
    whatever happened. Raises: AssertionError (one did not start: its log)."""
    from authority.backends.softhsm import provision_embedded_token

    token = provision_embedded_token(work / "hsm")
    started: list[ServeProcess] = []
    try:
        for name in names:
            dsn_file = work / f"{name}.dsn"
            dsn_file.touch(mode=0o600)
            dsn_file.write_text(f"{dsn} application_name={APPLICATION}{name}")
            started.append(ServeProcess(work, name, settings(work / name, token, dsn_file,
                                                             keys)))
            started[-1].serve()
        yield started
    finally:
        for server in started:
            server.stop()


def status(server: ServeProcess, timeout: float = CALL) -> admin_pb2.GetStatusResponse:
    """GetStatus of ``server``. Raises: grpc.RpcError."""
    reply: admin_pb2.GetStatusResponse = server.admin.GetStatus(admin_pb2.GetStatusRequest(),
                                                                timeout=timeout)
    return reply


def lease(server: ServeProcess) -> tuple[str, int]:
    """(holder, epoch) of the maintenance lease as ``server`` reports it; holder "" when it
    expired or was never taken. Raises: grpc.RpcError."""
    held = status(server).maintenance_lease
    return ("" if held.expired else str(held.holder)), int(held.epoch)
