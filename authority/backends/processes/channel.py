"""One end of the socket between the service and a device process: whole frames in and out."""

from __future__ import annotations

import contextlib
import socket

from authority.backends.processes.wire import frame, frame_length


class Channel:
    """Sends and receives framed payloads on a connected stream socket. Not thread-safe: one
    request and its reply at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, payload: bytes) -> None:
        """Raises: OSError (peer gone, timeout), WireError (payload too large)."""
        self.sock.sendall(frame(payload))

    def recv(self) -> bytes:
        """The next payload. Raises: EOFError (peer closed between frames), OSError (timeout,
        peer gone), WireError (a bad length)."""
        prefix = self._exactly(4, eof_ok=True)
        return self._exactly(frame_length(prefix), eof_ok=False)

    def _exactly(self, size: int, eof_ok: bool) -> bytes:
        chunks: list[bytes] = []
        left = size
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                if eof_ok and left == size:
                    raise EOFError("peer closed the channel")
                raise ConnectionResetError("peer closed the channel inside a frame")
            chunks.append(chunk)
            left -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Close the socket (the peer reads EOF). Never raises."""
        with contextlib.suppress(OSError):
            self.sock.close()
