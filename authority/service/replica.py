"""One replica process of a supervisor (authority/service/supervisor.py, ``server.processes``
> 1): a whole server on the port its replicas share.

Started as ``python -m authority.service.replica FD``, FD being its end of a socket pair with
the supervisor. It reads its settings from there (one frame: settings, index, the descriptor of
the state directory's lock, which it inherited), opens its authority under that lock, starts
serving, and answers with one JSON line: ready (pid, replica id, addresses, ports, device,
sealing key) or the error that stopped it (exit status 2 for a setting or start-up error, 3 for
the device, as ``serve``). It then serves until SIGTERM or SIGINT (drain for
``server.grace_seconds``), or until the supervisor is gone (its end of the socket pair closed);
SIGHUP re-reads the TLS credentials (before the settings arrived: ignored). While it serves it
sends the supervisor a heartbeat byte every ``server.replica_watchdog`` / 5 seconds from a
thread of its own, each only once its event loop (aio) ran the callback the previous beat
scheduled there, so a hung process or a stuck loop falls silent and the supervisor replaces it,
while a busy one keeps beating (the loop runs that callback between calls, not after them).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from authority.config import Config
from authority.errors import ConfigError, DeviceUnavailable, StartupError
from authority.logs import setup as setup_logs

log = logging.getLogger("authority.service.replica")  # also when run as __main__


def main(argv: list[str]) -> int:
    """Run the replica whose socket pair end is ``argv[0]``; returns the exit status.
    Raises: OSError, EOFError (the supervisor went away before sending the settings),
    WireError (not a frame)."""
    from authority.service.supervisor import receive_hello

    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # until its handler: never a reason to die
    link = socket.socket(fileno=int(argv[0]))
    hello = receive_hello(link)
    config: Config = hello["config"]
    index = int(hello["index"])
    setup_logs(config.log_level, config.log_format, prefix=f"replica {index}: ")
    stop = threading.Event()
    running_tls: list[Any] = []
    _install_signals(stop, running_tls)
    try:
        from authority.service.server import build_server
        from authority.statedir import adopt

        adopt(int(hello["lock_fd"]))
        running = build_server(config)
    except (ConfigError, StartupError) as exc:
        _tell(link, {"error": str(exc), "status": 2})
        return 2
    except DeviceUnavailable as exc:
        _tell(link, {"error": f"device unavailable: {exc}", "status": 3})
        return 3
    running_tls.append(running.tls)
    try:
        running.authority.start_maintenance()
        _tell(link, _ready(running))
        threading.Thread(target=_watch, args=(link, stop), name="supervisor-watch",
                         daemon=True).start()
        threading.Thread(target=_heartbeat, args=(link, stop, _beat_interval(config),
                                                  _loop_answers(running)),
                         name="supervisor-heartbeat", daemon=True).start()
        from authority.service.server import settle_heap

        settle_heap()
        stop.wait()
    finally:
        running.stop(config.server.grace_seconds)
        log.info("stopped")
    return 0


def _ready(running: Any) -> dict[str, Any]:
    """The ready message: who this replica is and where it listens."""
    authority = running.authority
    info = authority.backend.describe()
    primary = authority.ring.primary_id
    admin = running.admin_address
    admin_port = None
    if admin is not None and not admin.startswith("unix:"):
        admin_port = int(admin.rpartition(":")[2])
    return {"pid": os.getpid(), "replica_id": authority.replica.replica_id,
            "address": running.address, "port": running.port, "admin_address": admin,
            "admin_port": admin_port, "metrics_port": running.metrics_port,
            "device": f"{info.backend}: {info.token}",
            "sealing": primary.hex() if primary else "-"}


def _tell(link: socket.socket, message: dict[str, Any]) -> None:
    """Send one JSON line to the supervisor. Never raises (a gone supervisor is seen by
    ``_watch``)."""
    try:
        link.sendall(json.dumps(message).encode() + b"\n")
    except OSError as exc:
        log.warning("cannot reach the supervisor: %s", exc)


def _watch(link: socket.socket, stop: threading.Event) -> None:
    """Stop when the supervisor's end of the socket pair closes (it exited, or was
    killed)."""
    try:
        while link.recv(64):
            pass
    except OSError:
        pass
    if not stop.is_set():
        log.warning("the supervisor is gone: stopping")
        stop.set()


def _beat_interval(config: Config) -> float:
    """Seconds between heartbeats: a fifth of the supervisor's watchdog bound."""
    from authority.service.supervisor import BEATS, replica_watchdog

    return replica_watchdog(config) / BEATS


def _loop_answers(running: Any) -> Callable[[], bool]:
    """What tells whether the server's event loop ran the callback it scheduled there the
    previous time (and schedules the next): always True on the thread-pool server, which has
    no loop. Never raises."""
    aio = running.aio
    if aio is None:
        return lambda: True
    loop = aio.loop.loop
    answered = threading.Event()
    answered.set()

    def answers() -> bool:
        if not answered.is_set():
            return False
        answered.clear()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:   # the loop is closed: stopping
            return False
        return True

    return answers


def _heartbeat(link: socket.socket, stop: threading.Event, interval: float,
               alive: Callable[[], bool]) -> None:
    """Send the supervisor one byte every ``interval`` seconds while ``alive()`` (the loop
    answered), until ``stop`` or the supervisor is gone."""
    while not stop.wait(interval):
        if not alive():
            log.warning("the event loop did not run a callback within %.1f s", interval)
            continue
        try:
            link.sendall(b".")
        except OSError:
            return


def _install_signals(stop: threading.Event, tls: list[Any]) -> None:
    """SIGTERM and SIGINT drain and stop; SIGHUP re-reads the TLS credentials."""

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        if tls and tls[0] is not None:
            log.info("received SIGHUP: TLS credentials are re-read at the next handshake")
            tls[0].reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
