"""Replicas for the cluster tests: ``Authority`` objects on ONE real SoftHSM2 token and one store
(a real PostgreSQL database, or one SQLite file as processes on one host share it), each with
its own ``Pkcs11Backend`` and its own store connection, loaded as ``Authority.open`` loads one
(without the state-directory lock and owner check, which are per directory)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from authority.app import Authority
from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.softhsm import provision_embedded_token
from authority.clock import Clock
from authority.config import ClusterSettings, Config, Pkcs11Settings, PostgresSettings, Secret
from authority.store.base import Store
from authority.store.sqlite import SqliteStore
from tests.conftest import make_config


class SharedToken:
    """One token and one store (``dsn``: a PostgreSQL database; None: a SQLite file) shared by
    replicas; ``close`` closes every replica loaded."""

    def __init__(self, tmp_path: Path, dsn: str | None, timing: ClusterSettings) -> None:
        self.tmp_path = tmp_path
        self.dsn = dsn
        self.timing = timing
        self.token: Pkcs11Settings = provision_embedded_token(tmp_path / "hsm")
        self.members: list[Authority] = []

    def open_store(self) -> Store:
        """A new connection to the shared store."""
        if self.dsn is None:
            return SqliteStore(self.tmp_path / "authority.db")
        from authority.store.postgres import PostgresStore

        return PostgresStore(PostgresSettings(dsn=Secret(self.dsn), pool_size=4))

    def replica_config(self, name: str | None = None, **keys: Any) -> Config:
        """The next replica's config (``keys``: KeyPolicy fields): its own state directory
        (``name``, else ``replica<N>``),
        sessions on the shared token, ``timing``, and the audit chain every replica shares (in
        the database, or one file)."""
        state_dir = self.tmp_path / (name or f"replica{len(self.members)}")
        config = replace(make_config(state_dir, "pkcs11", "threads", **keys),
                         pkcs11=replace(self.token, sessions=2), cluster=self.timing)
        if self.dsn is not None:
            return replace(config, postgresql=PostgresSettings(dsn=Secret(self.dsn)))
        return replace(config, audit_log=self.tmp_path / "audit.log")

    def load(self, config: Config, store: Store, clock: Clock) -> Authority:
        """A new replica of ``config`` on ``store``, loaded (registered, its first heartbeat
        written); closed by ``close`` even if loading it fails."""
        config.state_dir.mkdir(mode=0o700)
        assert config.pkcs11 is not None
        authority = Authority(config, Pkcs11Backend.open(config.pkcs11), store, clock)
        self.members.append(authority)
        authority.ring.load()
        authority.policy.load()
        return authority

    def close(self) -> None:
        for authority in self.members:
            authority.close()
