"""Several server processes on one machine (``server.processes`` > 1): ``serve`` becomes the
supervisor of N replica processes listening on one port.

Each replica (authority/service/replica.py) is a whole server: its own Authority (device
sessions, key ring, maintenance loop, replica id: authority/cluster.py), sharing the state with
the others exactly as replicas on several machines do -- the state directory's SQLite database
(WAL; a write waits for another process's: authority/store/sqlite.py) or the PostgreSQL
database -- and the device (the embedded SoftHSM2 token's files, or the configured token). The
kernel spreads new connections over the replicas' listening sockets (SO_REUSEPORT on one
host:port); a connection, and every call on it, stays with one replica.

The supervisor

- takes the state directory's lock and hands it to each replica (authority/statedir.py), so a
  second, independent ``serve`` on that directory is still refused;
- starts replica 0 on ``server.listen`` (port 0: a free port) and waits until it serves (the
  first start provisions the embedded token and the first key), then the others, one at a
  time, on the port replica 0 bound; likewise a HOST:PORT ``server.admin_listen``; a
  ``unix:PATH`` admin listener is replica 0's, replica i's is ``unix:PATH.i``;
- gives replica i the metrics port ``server.metrics_listen``'s port + i (port 0: a free port
  each): each replica's metrics are its own, a Prometheus target of its own;
- restarts a replica that exits, after 0.5 s, doubling up to 30 s while it keeps failing (the
  delay is reset once one has run for 30 s);
- watches that each serving replica is alive: a replica sends a heartbeat byte on the socket
  pair every ``server.replica_watchdog`` / 5 seconds, from a thread of its own and only while
  its event loop answers (a callback it schedules there runs: it does not queue behind calls,
  which the loop interleaves); one silent for ``server.replica_watchdog`` seconds (hung,
  SIGSTOPped, its loop stuck) gets SIGTERM, SIGKILL ``WATCHDOG_GRACE`` seconds later, and is
  restarted as one that exited;
- forwards SIGHUP (TLS reload) to the serving replicas; a replica still starting gets it once
  it serves (before it has a handler, SIGHUP would kill it, and the start with it); on SIGTERM
  or SIGINT sends them SIGTERM (each drains for ``server.grace_seconds``), waits, and exits once
  they have stopped;
- writes server.json: the address, its own pid, the admin address and the replicas (index,
  pid, replica id, metrics port, admin address);
- under systemd (``Type=notify``: authority/sdnotify.py) sends READY=1 once every replica
  serves, a STATUS= line when one is lost or back, STOPPING=1 when it begins to stop them. It
  alone speaks (``NotifyAccess=main``): the replicas do not inherit ``$NOTIFY_SOCKET``.

A replica whose supervisor is gone (killed) sees its end of their socket pair close, and stops.
The settings (secrets included) reach a replica over that socket pair, never on its command
line or in its environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any, Final

from authority.backends.processes.channel import Channel
from authority.backends.processes.process import spawn_child
from authority.config import Config
from authority.errors import DeviceUnavailable, StartupError
from authority.sdnotify import Notifier
from authority.statedir import StateLock

log = logging.getLogger(__name__)

#: ``server.processes = "auto"``: one process. Measured on 2 cores (docs/benchmarks.md,
#: "Replicas on one machine"): two replicas (batches inline) ran the storm 1.2-2.3x faster and
#: batches mostly faster, for clients with several connections (one connection reaches one
#: replica), but unary calls no faster for sure, +15 % server CPU per unary call, and 1.4x the
#: memory (172-178 MB in the storm: over its 150 MB target). Not measured on more cores.
AUTO_PROCESSES: Final = 1
START_TIMEOUT: Final = 120.0   # seconds a replica may take to serve (the first provisions)
BACKOFF_FIRST: Final = 0.5     # seconds before restarting a replica that exited
BACKOFF_MAX: Final = 30.0
STABLE: Final = 30.0           # seconds a replica must run for its restart delay to reset
STOP_MARGIN: Final = 15.0      # seconds past server.grace_seconds before SIGKILL
POLL: Final = 0.1              # seconds between looks at the replicas
WATCHDOG_GRACE: Final = 2.0    # seconds between the watchdog's SIGTERM and its SIGKILL
BEATS: Final = 5               # heartbeats a replica sends per server.replica_watchdog


def server_processes(config: Config) -> int:
    """How many server processes ``serve`` runs: ``server.processes``, ``auto`` resolved to
    ``AUTO_PROCESSES`` (the TPM: 1). Never raises for a validated config."""
    setting = config.server.processes
    if setting == "auto" or config.backend == "tpm":
        return 1 if config.backend == "tpm" else AUTO_PROCESSES
    return int(setting)


def replica_watchdog(config: Config) -> float:
    """Seconds a serving replica may go without a heartbeat: ``server.replica_watchdog``, or
    for ``auto`` 3 x ``cluster.replica_timeout`` (by then its peers have long counted it
    gone), and never less than twice the longest a PostgreSQL call may block its loop
    (connect + statement timeouts). Never raises for a validated config."""
    setting = config.server.replica_watchdog
    if setting != "auto":
        return float(setting)
    seconds = 3 * config.cluster.replica_timeout
    if config.postgresql is not None:
        store = config.postgresql
        seconds = max(seconds, 2 * (store.connect_timeout + store.statement_timeout))
    return seconds


def reuse_port(config: Config) -> int:
    """``grpc.so_reuseport`` of this process's listeners: 1 when it is one of several
    replicas on one port (the supervisor gives each an explicit count above 1), else 0
    (another server on the port is refused; ``auto`` never shares). Never raises."""
    processes = config.server.processes
    return int(isinstance(processes, int) and processes > 1)


def metrics_listens(config: Config) -> list[str]:
    """The metrics address of each replica: ``server.metrics_listen``'s port + index (port
    0: each its own free port); none when metrics are off. Never raises for a validated
    config."""
    listen = config.server.metrics_listen
    count = server_processes(config)
    if not listen:
        return []
    host, _, port = listen.rpartition(":")
    return [f"{host}:{int(port) + i if int(port) else 0}" for i in range(count)]


def replica_device_processes(config: Config, cpus: int) -> int | str:
    """``server.device_processes`` of each replica: as set, but ``auto`` splits the CPUs
    among the replicas -- CPUs // replicas device processes each (at most what one process
    would run) when that is 2 or more, else 0 (batches inline). Measured on 2 cores
    (docs/benchmarks.md): 2 replicas with batches inline redeemed batches and the storm
    faster than 2 replicas with 2 device processes each (6 busy processes on 2 cores). Never
    raises for a validated config."""
    from authority.app import server_mode

    setting = config.server.device_processes
    count = server_processes(config)
    if setting != "auto" or count <= 1:
        return setting
    if config.backend != "pkcs11" or server_mode(config) != "aio":
        return 0                      # as ``auto`` for one process (authority/app.py)
    share = cpus // count
    return min(share, 4) if share >= 2 else 0


def _cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def replica_config(config: Config, index: int, port: int | None = None,
                   admin_port: int | None = None) -> Config:
    """Replica ``index``'s settings: the count of processes resolved, its device processes
    (``replica_device_processes``), ``server.listen`` on
    ``port`` (the one replica 0 bound; None: as configured), the admin listener likewise
    (``unix:PATH``: replica 0's, else ``PATH.index``), its own metrics port. Never raises for
    a validated config."""
    server = config.server
    changes: dict[str, Any] = {"processes": server_processes(config),   # auto resolved
                               "device_processes": replica_device_processes(config, _cpus()),
                               "replica_watchdog": replica_watchdog(config)}
    if port is not None:
        changes["listen"] = f"{server.listen.rpartition(':')[0]}:{port}"
    admin = server.admin_listen
    if admin.startswith("unix:") and index:
        changes["admin_listen"] = f"{admin}.{index}"
    elif admin and not admin.startswith("unix:") and admin_port is not None:
        changes["admin_listen"] = f"{admin.rpartition(':')[0]}:{admin_port}"
    if server.metrics_listen:
        changes["metrics_listen"] = metrics_listens(config)[index]
    return replace(config, server=replace(server, **changes))


def receive_hello(link: socket.socket) -> dict[str, Any]:
    """What the supervisor sends a replica first, one frame on their socket pair (framed as
    the device processes' channel is: authority/backends/processes/channel.py): its settings,
    index and lock descriptor. Only its own supervisor holds the other end of this socket
    pair, so the pickle comes from the process that started us. Raises: OSError, EOFError,
    WireError."""
    hello: dict[str, Any] = pickle.loads(Channel(link).recv())  # noqa: S301
    return hello


@dataclass
class _Slot:
    """One replica's place: the process now in it, and its restart schedule."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    link: socket.socket | None = None
    info: dict[str, Any] | None = None   # its ready message (pid, replica id, ports...)
    started: float = 0.0                 # monotonic time of the last start
    failures: int = 0                    # exits in a row, each less than STABLE after start
    due: float = 0.0                     # monotonic time of the next start
    hangups: int = 0                     # the supervisor's SIGHUP count when it started
    beat: float = 0.0                    # monotonic time of its last sign of life
    condemned: float | None = None       # monotonic time the watchdog sent it SIGTERM

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts, watches, restarts and stops the replicas of one ``serve``."""

    def __init__(self, config: Config, lock: StateLock,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        self._lock = lock
        self._slots = [_Slot(i) for i in range(server_processes(config))]
        self._port: int | None = None         # the shared port, once replica 0 bound it
        self._admin_port: int | None = None
        self._address: str | None = None      # replica 0's addresses, once it served
        self._admin_address: str | None = None
        self._watchdog = replica_watchdog(config)
        self._hangups = 0                     # SIGHUPs received
        self.stopping = threading.Event()

    @property
    def replicas(self) -> list[dict[str, Any]]:
        """The ready messages of the replicas serving now."""
        return [slot.info for slot in self._slots if slot.info is not None]

    def start(self) -> None:
        """Start the replicas one after the other, replica 0 first.

        Raises: StartupError, DeviceUnavailable (a replica could not start; those started
        are still running: call ``stop``)."""
        for slot in self._slots:
            if self.stopping.is_set():
                return
            error = self._launch(slot)
            if error is not None:
                raise error

    def run(self) -> None:
        """Watch the replicas until ``stopping`` is set: restart those that exit."""
        while not self.stopping.wait(POLL):
            for slot in self._slots:
                if not self.stopping.is_set():
                    self._tend(slot)

    def forward(self, signum: int) -> None:
        """Send ``signum`` to every live replica. Never raises."""
        for slot in self._slots:
            if slot.proc is not None and slot.alive:
                slot.proc.send_signal(signum)

    def hangup(self) -> None:
        """SIGHUP to every serving replica; one still starting gets it once it serves
        (``_launch``). Never raises."""
        self._hangups += 1
        for slot in self._slots:
            if slot.proc is not None and slot.info is not None and slot.alive:
                slot.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM to every replica; wait for them to drain (SIGKILL after
        ``server.grace_seconds`` + 15 s). Never raises."""
        self.stopping.set()
        self.forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.grace_seconds + STOP_MARGIN
        for slot in self._slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("replica %d (pid %d) did not stop in time: killed", slot.index,
                            slot.proc.pid)
                slot.proc.kill()
                slot.proc.wait()
            self._discard(slot)

    def _tend(self, slot: _Slot) -> None:
        """Restart ``slot`` when its replica has exited and its delay has passed."""
        if slot.proc is not None:
            status = slot.proc.poll()
            if status is None:
                self._check_alive(slot)
                return
            self._lost(slot, f"replica {slot.index} (pid {slot.proc.pid}) exited with "
                             f"status {status}")
        if time.monotonic() < slot.due:
            return
        error = self._launch(slot)
        if error is not None:
            self._lost(slot, f"replica {slot.index} did not start: {error}")
        elif not self.stopping.is_set():
            self.write_server_file()
            self.notifier.status(self.serving_line())

    def _check_alive(self, slot: _Slot) -> None:
        """The watchdog: note the serving replica's heartbeats; SIGTERM it once silent for
        ``server.replica_watchdog`` seconds, SIGKILL it ``WATCHDOG_GRACE`` seconds later (its
        exit is then seen as any other)."""
        if slot.proc is None or slot.link is None or slot.info is None:
            return
        now = time.monotonic()
        if _heard(slot.link):
            slot.beat = now
        if slot.condemned is not None:
            if now - slot.condemned >= WATCHDOG_GRACE:
                slot.proc.kill()
            return
        if now - slot.beat > self._watchdog:
            log.warning("replica %d (pid %d) gave no sign of life for %.1f s "
                        "(server.replica_watchdog %g s): stopping it (SIGKILL in %g s)",
                        slot.index, slot.proc.pid, now - slot.beat, self._watchdog,
                        WATCHDOG_GRACE)
            slot.proc.terminate()
            slot.condemned = now

    def _lost(self, slot: _Slot, why: str) -> None:
        """Forget the slot's process and schedule its restart with backoff."""
        now = time.monotonic()
        if now - slot.started >= STABLE:
            slot.failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** slot.failures)
        slot.failures += 1
        slot.due = now + delay
        self._discard(slot)
        log.warning("%s; restarting it in %.1f s", why, delay)
        if not self.stopping.is_set():
            self.write_server_file()
            self.notifier.status(f"{self.serving_line()}; replica {slot.index} restarting in "
                                 f"{delay:.1f} s")

    def _discard(self, slot: _Slot) -> None:
        """Kill the slot's process if it still runs, reap it, close the socket pair."""
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.kill()
            slot.proc.wait()
        if slot.link is not None:
            slot.link.close()
        slot.proc, slot.link, slot.info, slot.condemned = None, None, None, None

    def _launch(self, slot: _Slot) -> StartupError | DeviceUnavailable | None:
        """Start the slot's replica and wait until it serves; the error if it did not (its
        process is then gone)."""
        config = replica_config(self.config, slot.index, self._port, self._admin_port)
        lock_fd = self._lock.fileno()
        slot.hangups = self._hangups
        try:
            slot.proc, link = spawn_child("authority.service.replica", (lock_fd,),
                                          process_group=0)
        except OSError as exc:
            return StartupError(f"server.processes: cannot start replica {slot.index}: "
                                f"{exc.strerror}")
        slot.link, slot.started = link, time.monotonic()
        with contextlib.suppress(OSError):   # it exited at once: said below
            Channel(link).send(pickle.dumps({"config": config, "index": slot.index,
                                             "lock_fd": lock_fd}))
        message = _await_message(link, START_TIMEOUT, self.stopping)
        if message is not None and "error" not in message:
            slot.info, slot.beat = message, time.monotonic()
            if self._hangups != slot.hangups and slot.proc is not None:   # SIGHUP meanwhile
                slot.proc.send_signal(signal.SIGHUP)
            if slot.index == 0 and self._address is None:
                self._port = int(message["port"])
                self._admin_port = message.get("admin_port")
                self._address = str(message["address"])
                self._admin_address = message.get("admin_address")
            log.info("replica %d serving: pid %d, replica id %s", slot.index, message["pid"],
                     message["replica_id"])
            return None
        if message is None and self.stopping.is_set():
            return None   # still starting: ``stop`` sends it SIGTERM and waits for it
        return self._failed(slot, message)

    def _failed(self, slot: _Slot, message: dict[str, Any] | None
                ) -> StartupError | DeviceUnavailable | None:
        """The error of a replica that did not start (None when stopping meanwhile); its
        process is gone afterwards."""
        assert slot.proc is not None
        pid = slot.proc.pid
        try:
            status: int | None = slot.proc.wait(5)
        except subprocess.TimeoutExpired:
            status = None
        self._discard(slot)
        if self.stopping.is_set():
            return None
        if message is not None:
            text = f"replica {slot.index}: {message['error']}"
            return DeviceUnavailable(text) if message.get("status") == 3 else StartupError(text)
        if status is None:
            return StartupError(f"server.processes: replica {slot.index} (pid {pid}) did not "
                                f"serve within {START_TIMEOUT:.0f} s: killed")
        return StartupError(f"server.processes: replica {slot.index} (pid {pid}) exited with "
                            f"status {status} before serving (its log is above)")

    def serving_line(self) -> str:
        """The STATUS= line: where it serves, how many of its replicas serve now."""
        return (f"serving on {self._address}: {len(self.replicas)} of {len(self._slots)} "
                f"replicas")

    def write_server_file(self) -> None:
        """server.json: the address and admin address (replica 0's, the same for every
        replica but a Unix admin socket), our pid, the replicas serving now. Logs (does not
        raise) when it cannot be written."""
        from authority.service.server import SERVER_FILE, _write_server_file

        if self._address is None:
            return
        replicas = [{"index": s.index, "pid": s.info["pid"], "replica_id": s.info["replica_id"],
                     "metrics_port": s.info.get("metrics_port"),
                     "admin_address": s.info.get("admin_address")}
                    for s in self._slots if s.info is not None]
        try:
            _write_server_file(self.config.state_dir / SERVER_FILE, self._address,
                               self._admin_address, replicas)
        except OSError as exc:
            log.error("cannot write %s: %s", SERVER_FILE, exc.strerror)


def _heard(link: socket.socket) -> bool:
    """Whether the replica sent anything (heartbeats) since we last looked; reads it all
    without waiting. Never raises."""
    heard = False
    while True:
        try:
            chunk = link.recv(4096, socket.MSG_DONTWAIT)
        except OSError:      # nothing more now (BlockingIOError), or the socket failed
            return heard
        if not chunk:        # the replica closed its end: its exit is seen by poll
            return heard
        heard = True


def _await_message(link: socket.socket, timeout: float,
                   stopping: threading.Event) -> dict[str, Any] | None:
    """The replica's one JSON line (ready, or its start-up error); None if it closed the
    socket (exited), ``timeout`` passed or ``stopping`` was set."""
    deadline = time.monotonic() + timeout
    data = b""
    link.settimeout(POLL)
    while b"\n" not in data:
        if stopping.is_set() or time.monotonic() > deadline:
            return None
        try:
            chunk = link.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    link.settimeout(None)
    message: dict[str, Any] = json.loads(data.partition(b"\n")[0])
    return message


def supervise(config: Config) -> int:
    """``serve`` with ``server.processes`` > 1: lock the state directory, start the replicas,
    print the banner, keep them running until SIGTERM or SIGINT, stop them; returns 0.

    Raises: StartupError (the state directory is in use, a replica could not start: the
    others are stopped), DeviceUnavailable.
    """
    from authority.app import prepare_state_dir

    notifier = Notifier.claim()   # before any replica starts: they must not inherit it
    prepare_state_dir(config.state_dir)
    lock = StateLock.acquire(config.state_dir)
    supervisor = Supervisor(config, lock, notifier)
    restore = _install_signals(supervisor)
    try:
        try:
            supervisor.start()
        except BaseException:
            supervisor.stop()
            raise
        if not supervisor.stopping.is_set():
            supervisor.write_server_file()
            _announce(config, supervisor.replicas)
            notifier.ready(supervisor.serving_line())
            supervisor.run()
        notifier.stopping(f"stopping the replicas (server.grace_seconds "
                          f"{config.server.grace_seconds:g})")
        supervisor.stop()
    finally:
        restore()
        _remove_server_file(config)
        lock.release()
    log.info("stopped")
    return 0


def _remove_server_file(config: Config) -> None:
    from authority.service.server import SERVER_FILE

    (config.state_dir / SERVER_FILE).unlink(missing_ok=True)


def _install_signals(supervisor: Supervisor) -> Callable[[], None]:
    """SIGTERM and SIGINT stop the replicas; SIGHUP is forwarded to them (``hangup``): it
    never stops the service. Returns what puts
    the previous handlers back."""

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping the replicas", signal.Signals(signum).name)
        supervisor.stopping.set()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        log.info("received SIGHUP: forwarded to the replicas")
        supervisor.hangup()

    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_hangup}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def _announce(config: Config, replicas: list[dict[str, Any]]) -> None:
    """The banner of one ``serve`` (authority/service/server.py), for N replicas."""
    from authority.service.server import Banner, announce, mode_line

    first = replicas[0]
    pids = ", ".join(str(r["pid"]) for r in replicas)
    announce(config, Banner(
        str(first["address"]), first.get("admin_address"), str(first["device"]),
        str(first["sealing"]),
        [int(r["metrics_port"]) for r in replicas if r.get("metrics_port")],
        f"{len(replicas)} processes on one port (SO_REUSEPORT), pids {pids}; each "
        f"{mode_line(replica_config(config, 0))}"))


