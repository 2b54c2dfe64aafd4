"""A device process: opens its own session on the token and seals / unseals batches for the
service, one request at a time, until the service closes the channel.

Started by ``DeviceProcesses`` as ``python -m authority.backends.processes.child FD`` with the
socket inherited as FD; the settings (PIN included) come as the first frame, never on the
command line or in the environment. SIGINT and SIGTERM are ignored: the service owns this
process's life and ends it by closing the channel (or killing it).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from authority.backends.base import KeyBackend
from authority.backends.processes.channel import Channel
from authority.backends.processes.wire import (
    DEVICE_UNAVAILABLE,
    KEY_NOT_FOUND,
    SEAL,
    STARTUP,
    WireError,
    decode_request,
    encode_failure,
    encode_results,
)
from authority.config import Pkcs11Settings, Secret
from authority.errors import DeviceUnavailable, KeyNotFound, StartupError

log = logging.getLogger("authority.backends.processes")


def main(argv: list[str]) -> int:
    """Serve one channel; 0 when the service closed it, 1 if the backend could not open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(argv[1])))
    try:
        hello = json.loads(channel.recv())
        logging.basicConfig(level=hello.get("log_level", "INFO"), stream=sys.stderr,
                            format=f"%(asctime)s device-process[{hello['index']}] "
                                   "%(levelname)s %(name)s: %(message)s")
        backend = _open(hello)
    except StartupError as exc:
        channel.send(encode_failure(STARTUP, str(exc)))
        return 1
    except (EOFError, OSError, ValueError, KeyError):
        return 1
    try:
        channel.send(encode_results([]))  # ready
        serve(channel, backend)
    finally:
        backend.close()
        channel.close()
    return 0


def hello_for(settings: Pkcs11Settings, log_level: str) -> dict[str, Any]:
    """The settings a device process opens its backend with (the first frame; ``_open`` reads
    it). The PIN stays a ``Secret`` until the message is written."""
    return {"module": str(settings.module), "token_label": settings.token_label,
            "pin": settings.pin, "session_timeout": settings.session_timeout,
            "softhsm2_conf": str(settings.softhsm2_conf or ""), "log_level": log_level}


def _open(hello: dict[str, Any]) -> KeyBackend:
    """The backend ``hello_for`` described (PKCS#11: one session, calls holding the GIL).
    Raises: StartupError; KeyError / ValueError for a malformed hello."""
    from authority.backends.pkcs11 import Pkcs11Backend

    conf = hello["softhsm2_conf"]
    return Pkcs11Backend.open(Pkcs11Settings(
        module=Path(hello["module"]), token_label=hello["token_label"], pin=Secret(hello["pin"]),
        sessions=1, session_timeout=float(hello["session_timeout"]),
        softhsm2_conf=Path(conf) if conf else None, release_gil=False))


def serve(channel: Channel, backend: KeyBackend) -> None:
    """Answer requests until the channel closes. Raises: OSError (channel broken)."""
    while True:
        try:
            payload = channel.recv()
        except EOFError:
            return
        channel.send(answer(backend, payload))


def answer(backend: KeyBackend, payload: bytes) -> bytes:
    """The reply to one request payload. Never raises."""
    try:
        op, items = decode_request(payload)
        if op == SEAL:
            return encode_results(backend.seal_many(items))
        return encode_results(backend.unseal_many(items))
    except KeyNotFound as exc:
        return encode_failure(KEY_NOT_FOUND, exc.key_id)
    except DeviceUnavailable as exc:
        return encode_failure(DEVICE_UNAVAILABLE, exc.message)
    except WireError as exc:
        return encode_failure(DEVICE_UNAVAILABLE, f"device process: bad request: {exc}")
    except Exception:
        log.exception("unexpected error in a device process")
        return encode_failure(DEVICE_UNAVAILABLE, "unexpected error in a device process "
                                                  "(see the server log)")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
