"""A gateway on a UDP socket: a thread that reads datagrams, gives each to the ``Engine`` and
sends its response back to the sender. ``stop`` makes the gateway die (its SAs with it), which
is what a failover test needs."""

from __future__ import annotations

import socket
import threading

from authority.gateway.authority import TicketService
from authority.gateway.engine import Engine
from authority.gateway.settings import GatewaySettings

MAX_DATAGRAM = 65535


class Responder:
    """Answers IKE requests arriving on ``sock`` (a bound UDP socket, which it takes over)."""

    def __init__(self, settings: GatewaySettings, client: TicketService, sock: socket.socket,
                 name: str = "gateway") -> None:
        self.engine = Engine(settings, client)
        self.name = name
        self._sock = sock
        self._sock.settimeout(0.05)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The address the gateway answers on."""
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def events(self) -> list[tuple[str, str]]:
        """What the gateway did, in order: (kind, detail)."""
        return list(self.engine.events)

    def start(self) -> Responder:
        """Start answering. Returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the socket. Never raises."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sock.close()
        self.engine.authority.close()

    def __enter__(self) -> Responder:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._sock.recvfrom(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.engine.handle(data, (peer[0], peer[1]))
            if reply is not None:
                try:
                    self._sock.sendto(reply, peer)
                except OSError as exc:
                    self.engine.record("send-failed", str(exc))
