"""The systemd notification protocol (sd_notify(3)), spoken by ``serve`` under ``Type=notify``
(packaging/systemd/ticket-authority.service): READY=1 once it serves, STOPPING=1 when its drain
begins, STATUS= a line for ``systemctl status``.

The service manager names a datagram socket in ``$NOTIFY_SOCKET``: a path ("/run/systemd/
notify") or an abstract name ("@..."). :meth:`Notifier.claim` takes the variable out of the
environment, so the processes ``serve`` starts (replicas, device processes, the embedded swtpm)
neither inherit nor use it: only the main process speaks, which is what ``NotifyAccess=main``
lets through. No dependency: a Unix datagram socket from the standard library.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

log = logging.getLogger(__name__)

ENVIRONMENT: Final = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value: a path as it is, an abstract name
    ("@name") as bytes with a leading NUL; None for anything else (empty, relative, a "vsock:"
    address this module does not speak). Never raises."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """Sends notifications to the service manager; a no-op when none asked for them."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address

    @classmethod
    def claim(cls) -> Notifier:
        """The notifier of this process: ``$NOTIFY_SOCKET``'s address, the variable removed
        from the environment (children must not speak for the service). Logs a warning for a
        value it cannot use. Never raises."""
        value = os.environ.pop(ENVIRONMENT, "")
        address = socket_address(value)
        if value and address is None:
            log.warning("%s=%r is not a socket path or abstract name: systemd is not told "
                        "when the service is ready", ENVIRONMENT, value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.address is not None

    def ready(self, status: str) -> None:
        """READY=1 with a status line: the service serves. Never raises."""
        self.send(f"READY=1\nSTATUS={_one_line(status)}")

    def stopping(self, status: str) -> None:
        """STOPPING=1 with a status line: the service is stopping (its drain began). Never
        raises."""
        self.send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        """STATUS=: a line ``systemctl status`` shows. Never raises."""
        self.send(f"STATUS={_one_line(status)}")

    def send(self, message: str) -> bool:
        """Send ``message`` (newline-separated VARIABLE=value assignments) in one datagram;
        whether it was sent. A failure is logged, never raised: the service keeps serving
        whether or not its manager hears."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager (%s): %s", ENVIRONMENT,
                        exc.strerror or exc)
            return False
        return True


def _one_line(text: str) -> str:
    """``text`` with line breaks replaced: one STATUS= assignment per line."""
    return " ".join(text.splitlines())
