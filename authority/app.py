"""The composition root: open the device, the store and the key ring, and keep them maintained."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from authority.audit import AuditLog, AuditSink
from authority.backends.base import KeyBackend
from authority.clock import Clock, SteadyClock
from authority.cluster import MAINTENANCE, Lease, ReplicaIdentity
from authority.cluster_members import ClusterMembers
from authority.config import Config, Pkcs11Settings
from authority.counters import Counters
from authority.errors import AuthorityError, ConfigError, InvalidTicket, StartupError
from authority.keyring import KeyRing
from authority.keyring.core import wrapping_backend
from authority.logs import note_replica
from authority.metrics import InstrumentedBackend, Metrics
from authority.outage import PolicyWatch
from authority.policy import Policy
from authority.sealer import Sealer
from authority.serving import DeviceHealth, ServingState
from authority.statedir import StateLock, check_backend, claim
from authority.store.base import Store
from authority.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: seconds after its last heartbeat a replica's record is dropped from the store (it stays
#: listed, not live, until then)
REPLICA_FORGET = 24 * 3600.0


def prepare_state_dir(path: Path) -> None:
    """Create the state directory with mode 0700 (or check an existing one is a directory).

    Raises: StartupError.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"state_dir: cannot create {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK):
        raise StartupError(f"state_dir: {path} is not writable")


def open_store(config: Config) -> Store:
    """The configured state store: the PostgreSQL database of ``[postgresql]`` (shared by
    replicas), else the embedded SQLite file STATE_DIR/authority.db.

    Raises: ConfigError (``[postgresql]`` with the TPM backend), StartupError.
    """
    if config.postgresql is None:
        from authority.service.supervisor import server_processes

        return SqliteStore(config.state_dir / "authority.db", config.store_synchronous,
                           sole_writer=server_processes(config) == 1)
    from authority.settings_loader import check_shared_backend
    from authority.store.postgres import PostgresStore

    check_shared_backend(config)
    return PostgresStore(config.postgresql)


def open_audit(config: Config, store: Store, now: Callable[[], float]) -> AuditSink:
    """Where the audit chain is kept: with ``[postgresql]``, the database's audit table, one
    chain for every replica (authority/audit_pg.py); else the file ``audit_log`` (default
    STATE_DIR/audit.log), one chain for every process appending to it.

    Raises: ConfigError (``audit_log`` set with ``[postgresql]``), StartupError.
    """
    if config.postgresql is None:
        return AuditLog(config.audit_log or config.state_dir / "audit.log", now)
    if config.audit_log is not None:
        raise ConfigError("audit_log", "not used with [postgresql]: the audit chain is kept in "
                                       "the database (check it with 'ticket-authority audit "
                                       "verify --config FILE'); remove audit_log")
    from authority.audit_pg import AuditTable, PostgresAuditLog

    if not isinstance(store, AuditTable):
        raise StartupError("audit: [postgresql] is set but the store keeps no audit table")
    return PostgresAuditLog(store, now)


def pkcs11_settings(config: Config) -> Pkcs11Settings:
    """The configured token, or the embedded SoftHSM2 token (provisioned on first use).

    Raises: StartupError.
    """
    if config.pkcs11 is not None:
        return config.pkcs11
    from authority.backends.softhsm import provision_embedded_token

    return provision_embedded_token(config.state_dir / "hsm")


def open_backend(config: Config) -> KeyBackend:
    """Open the configured key backend. Raises: StartupError."""
    if config.backend == "tpm":
        if device_processes(config):
            from authority.backends.tpm.process import open_tpm_process

            return open_tpm_process(config.tpm, config.state_dir / "tpm", config.log_level,
                                    config.log_format)
        from authority.backends.tpm import open_tpm_backend

        return open_tpm_backend(config.tpm, config.state_dir / "tpm",
                                queue_size=config.tpm.queue_size,
                                call_timeout=config.tpm.call_timeout)
    from authority.backends.pkcs11 import Pkcs11Backend

    settings = replace(pkcs11_settings(config), per_node_keys=config.cluster.per_node_tokens)
    if inline_device_calls(config):  # one loop thread makes every call: keep the GIL
        settings = replace(settings, release_gil=False)
    local = Pkcs11Backend.open(settings)
    count = device_processes(config)
    if count == 0:
        return local
    from authority.backends.processes.child import hello_for
    from authority.backends.processes.pool import DeviceProcesses

    try:
        return DeviceProcesses(local, hello_for(settings, config.log_level, config.log_format),
                               count,
                               asynchronous=server_mode(config) == "aio",
                               wait=settings.session_timeout).start()
    except BaseException:
        local.close()
        raise


def device_processes(config: Config) -> int:
    """How many device processes run (``server.device_processes``; ``auto``: for PKCS#11 one
    per CPU, at most 4, running batches on the aio server when there are 2 CPUs or more; for
    the TPM none: measured no faster, and slower unary calls, docs/benchmarks.md). Never
    raises for a validated config."""
    setting = config.server.device_processes
    if config.backend == "tpm":
        return 0 if setting == "auto" else int(setting)
    if setting == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return min(cpus, 4) if cpus >= 2 and server_mode(config) == "aio" else 0
    return int(setting)


def server_mode(config: Config) -> str:
    """``aio`` or ``threads``: ``server.mode``, with ``auto`` resolved to the faster server for
    the backend as measured (docs/benchmarks.md: aio for pkcs11, threads for tpm). Never
    raises."""
    if config.server.mode == "auto":
        return "aio" if config.backend == "pkcs11" else "threads"
    return config.server.mode


def inline_device_calls(config: Config) -> bool:
    """Whether the aio server runs ticket calls in its loop (``server.device_calls``; ``auto``:
    for the PKCS#11 backend). Never raises."""
    if server_mode(config) != "aio":
        return False
    if config.server.device_calls == "auto":
        return config.backend == "pkcs11"
    return config.server.device_calls == "inline"


#: the additional data of the device probe's seal (never a ticket's header)
PROBE_AAD = b"ticket-authority device probe"


class Authority:
    """Everything below the gRPC layer, wired together for one process: one replica of the
    authorities sharing its store (authority/cluster.py)."""

    def __init__(self, config: Config, backend: KeyBackend, store: Store,
                 clock: Clock) -> None:
        self.config = config
        self.metrics = Metrics()
        self.serving = ServingState()   # the store's part and the device's (health)
        self.backend = InstrumentedBackend(backend, self.metrics, DeviceHealth(
            lambda up: self.serving.set("device", up)))
        self.store = store
        self.clock = clock
        self.counters = Counters()
        self.started_at = clock.now()
        self.audit: AuditSink = open_audit(config, store, clock.now)
        self.replica = ReplicaIdentity.new(clock)
        note_replica(self.replica.replica_id)   # named in every log line from now on
        wrapper = wrapping_backend(config.cluster, backend)
        self.ring = KeyRing(self.backend, store, config.keys, config.tickets, clock,
                            audit=self.audit.record, cluster=config.cluster,
                            replica=self.replica, wrapper=wrapper)
        self.lease = Lease(store, MAINTENANCE, self.replica.replica_id, clock,
                           config.cluster.lease_duration)
        self.policy = Policy(store, clock, config.tickets.max_lifetime,
                             audit=self.audit.record)
        # the sealer's redeems survive a store outage for store.max_staleness (authority/outage.py)
        self.sealer = Sealer(self.ring, self.backend, store, config.tickets, clock,
                             self.counters, self.policy)
        self.watch = PolicyWatch(store, self.policy, config.cluster.heartbeat_interval,
                                 config.store.max_staleness, on_recovered=self._wake_up)
        self.watch.add_listener(lambda up: self.serving.set("store", up))
        self.members = None if wrapper is None else ClusterMembers(
            config, store, self.ring, wrapper, clock, self.audit.record)
        self.metrics.watch(self)
        self._stop = threading.Event()
        self._wake = threading.Event()   # set: the heartbeat loop runs at once
        self._thread: threading.Thread | None = None
        self._lock: StateLock | None = None   # held from ``open`` until ``close``

    @classmethod
    def open(cls, config: Config, clock: Clock | None = None) -> Authority:
        """Lock the state directory (one authority per directory), check it belongs to this
        backend and device (authority/statedir.py), open device and store, load the key ring
        (creating the first key if needed).

        Raises: StartupError (another process holds the state directory, it belongs to another
        backend or device, the store cannot be opened, ...), ConfigError (``[postgresql]``
        with the TPM backend), DeviceUnavailable.
        """
        prepare_state_dir(config.state_dir)
        lock = StateLock.acquire(config.state_dir)
        with contextlib.ExitStack() as undo:   # on failure, close what was opened
            undo.callback(lock.release)
            store = open_store(config)
            undo.callback(store.close)
            check_backend(store, config)
            backend = open_backend(config)
            undo.callback(backend.close)
            claim(store, config, backend)
            authority = cls(config, backend, store, clock or SteadyClock())
            undo.pop_all()
        authority._lock = lock
        try:
            authority._forget_predecessors()
            if authority.members is not None:
                authority.members.check_member()
                authority.members.tick()
            authority.ring.load()
            authority.policy.load()
            authority.sealer.handle_key()   # kept: redeems need no store call for it
        except Exception:
            authority.close()
            raise
        return authority

    def _forget_predecessors(self) -> None:
        """One process on the embedded SQLite store (``server.processes`` 1) holds the state
        directory's lock alone, so any other replica the store records is a process that died
        without leaving (kill -9, a power cut): drop its record and let the maintenance lease
        it may hold expire now. Otherwise the restart counts it live for
        ``cluster.replica_timeout`` (a rotation then is PENDING, the old key sealing on) and
        waits ``cluster.lease_duration`` for the lease. Raises: DeviceUnavailable."""
        from authority.service.supervisor import server_processes

        if self.config.postgresql is not None or server_processes(self.config) != 1:
            return
        for record in self.store.load_replicas():
            if record.replica_id == self.replica.replica_id:
                continue
            self.store.release_lease(MAINTENANCE, record.replica_id)
            self.store.remove_replica(record.replica_id)
            log.info("replica %s (pid %d) died without leaving: forgotten", record.replica_id,
                     record.pid)

    def heartbeat(self) -> bool:
        """What every replica does each ``cluster.heartbeat_interval``: sync the key ring with
        the store (authority/keyring/publish.py ``KeyRing.sync``), then take or renew the
        maintenance lease. Returns whether this replica holds the lease.

        Raises: AuthorityError from the device or store.
        """
        self._probe_device()
        self._membership()
        self.ring.sync()
        return self.lease.hold() is not None

    def _probe_device(self) -> None:
        """While the device counts as down (its calls failed, or did not find keys the ring
        has, for a while), or no call showed it working for a heartbeat interval (an idle
        replica must notice a lost device too): one real operation, a seal of nothing under a
        key that opens tickets (a listing is not enough: SoftHSM2 lists the keys it cached
        while its token files are gone); if it fails while down, have the backend read the
        token afresh (a module whose re-initialisation failed is initialised again) and try
        once more. The outcome feeds the device's health. At most one seal per heartbeat,
        outside the seal budget (random 96-bit nonces: negligible against it). Never raises."""
        health = self.backend.health
        if not health.down and health.idle_for() < self.config.cluster.heartbeat_interval:
            return
        keys = sorted(self.ring.opening_ids())
        if not keys:
            return
        for attempt in range(2 if health.down else 1):
            try:
                if attempt:
                    self.backend.refresh()
                self.backend.seal(keys[0], PROBE_AAD, b"")
                return             # counted a success by the instrumented backend
            except (AuthorityError, InvalidTicket) as exc:   # KeyNotFound is an InvalidTicket
                log.debug("the device is still down: %s", exc)

    def _membership(self) -> None:
        """Per-node tokens: a KEK delivered to this node is unwrapped before the ring is
        synced (a key wrapped under it may be waiting). Raises: AuthorityError."""
        if self.members is not None:
            self.members.tick()

    def maintain(self) -> None:
        """One maintenance pass: a heartbeat, then, on the lease holder only, the periodic work
        (scheduled rotation, key destruction, CREATING sweeps, publication; every key ring
        write fenced by the lease's epoch) and the purges (consumed set, revocations, replicas
        silent for ``REPLICA_FORGET``).

        Raises: AuthorityError from the device or store (the loop logs and retries);
        StaleFence if another replica took the lease meanwhile.
        """
        self._probe_device()
        self._membership()
        self.ring.sync()
        fence = self.lease.hold()
        if fence is None:
            return
        self.ring.maintain(fence)
        now = self.clock.now()
        purged = self.store.purge_expired(now)
        if purged:
            log.debug("purged %d expired consumed-ticket entries", purged)
        revocations = self.policy.purge()
        if revocations:
            log.debug("purged %d expired revocations", revocations)
        self.store.purge_replicas(now - REPLICA_FORGET)
        if self.members is not None:
            self.store.purge_join_requests(now)

    def start_maintenance(self) -> None:
        """Heartbeat every ``cluster.heartbeat_interval`` seconds and run ``maintain`` every
        ``keys.maintenance_interval`` seconds, in a daemon thread; keep the revocations and
        epochs current and enforce ``store.max_staleness`` on them (``PolicyWatch``, two more
        daemon threads)."""
        self.watch.start()
        self._thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)
        self._thread.start()

    def on_serving_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(serving)`` when the replica stops or starts serving redeems: not
        serving once its revocations and epochs were last confirmed current more than
        ``store.max_staleness`` seconds ago (the store out of reach; only while maintenance
        runs), or once its device calls have failed for ``serving.DEVICE_DOWN_AFTER`` seconds
        without a success (the heartbeat lists the device's keys every
        ``cluster.heartbeat_interval``, so a device back is seen within one); serving again
        when both are. Called from a background thread."""
        self.serving.add_listener(listener)

    def _wake_up(self) -> None:
        """The store answers again: heartbeat now (the key ring confirmed, the lease renewed)
        rather than at the next interval."""
        self._wake.set()

    def _loop(self) -> None:
        due = time.monotonic() + self.config.keys.maintenance_interval
        failing = False
        while True:
            self._wake.wait(self.config.cluster.heartbeat_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            work = time.monotonic() >= due
            what = "maintenance" if work else "heartbeat"
            try:
                if work:
                    due = time.monotonic() + self.config.keys.maintenance_interval
                    self.maintain()
                else:
                    self.heartbeat()
            except AuthorityError as exc:
                self.counters.inc(f"{what}_errors")
                # the first failure of a run at ERROR; the same every second after, at DEBUG
                log.log(logging.DEBUG if failing else logging.ERROR,
                        "%s failed, will retry: %s", what, exc)
                failing = True
                continue
            except Exception:
                self.counters.inc(f"{what}_errors")
                log.exception("%s failed unexpectedly, will retry", what)
                failing = True
                continue
            if failing:
                log.warning("%s succeeded again", what)
            failing = False

    def stop_maintenance(self) -> None:
        """Stop the heartbeats, maintenance and the policy watch (waits for a pass in
        progress); the lease is kept until it expires (``close`` releases it)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.watch.stop()

    def close(self) -> None:
        """Stop maintenance, leave the replicas (the lease released, this replica no longer
        live), close the store and the device."""
        self.stop_maintenance()
        for leave in (self.lease.release, self.ring.leave):
            try:
                leave()
            except AuthorityError as exc:
                log.warning("could not leave the replicas cleanly: %s", exc)
        self.store.close()
        self.backend.close()
        self.audit.close()
        if self._lock is not None:
            self._lock.release()
