"""A device process: opens its own session on the token (PKCS#11) or the TPM connection, and
answers the service's requests until the service closes the channel.

A PKCS#11 device process seals / unseals batches, one request at a time. The TPM process owns
the TPM for the whole service and answers every backend call; it reads requests ahead and runs
up to ``depth`` of them at once on its backend, so the TPM worker can group queued jobs by key,
and writes the replies in request order.

Started (by ``DeviceProcesses`` or ``RemoteBackend``, through ``fleet.py``) as
``python -m authority.backends.processes.child FD`` with the socket inherited as FD; the settings
(PIN or TPM owner auth included) come as the first frame, never on the command line or in the
environment. SIGINT and SIGTERM are ignored: the service owns this
process's life and ends it by closing the channel (or killing it).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from authority.backends.base import KeyBackend
from authority.backends.processes.channel import Channel
from authority.backends.processes.wire import (
    CREATE_KEY,
    DESCRIBE,
    DESTROY_KEY,
    DEVICE_UNAVAILABLE,
    FAILED_PRECONDITION,
    KEY_NOT_FOUND,
    LIST_KEYS,
    SEAL,
    STARTUP,
    UNSEAL,
    WireError,
    decode_request,
    encode_failure,
    encode_flags,
    encode_info,
    encode_invalid_argument,
    encode_results,
)
from authority.config import Pkcs11Settings, Secret, TpmSettings
from authority.errors import (
    DeviceUnavailable,
    FailedPrecondition,
    InvalidArgument,
    InvalidTicket,
    KeyNotFound,
    StartupError,
)
from authority.logs import setup as setup_logs

log = logging.getLogger("authority.backends.processes")


def main(argv: list[str]) -> int:
    """Serve one channel; 0 when the service closed it, 1 if the backend could not open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(argv[1])))
    try:
        hello = json.loads(channel.recv())
        setup_logs(hello.get("log_level", "INFO"), hello.get("log_format", "text"),
                   prefix=f"device-process[{hello['index']}] ")
        backend = _open(hello)
    except StartupError as exc:
        channel.send(encode_failure(STARTUP, str(exc)))
        return 1
    except (EOFError, OSError, ValueError, KeyError, TypeError):
        return 1
    try:
        channel.send(encode_results([]))  # ready
        serve(channel, backend, int(hello.get("depth", 1)))
    finally:
        backend.close()
        channel.close()
    return 0


def hello_for(settings: Pkcs11Settings, log_level: str,
              log_format: str = "text") -> dict[str, Any]:
    """The settings a device process opens its backend with (the first frame; ``_open`` reads
    it), and how it logs (authority/logs.py). The PIN stays a ``Secret`` until the message
    is written."""
    return {"backend": "pkcs11", "module": str(settings.module),
            "token_label": settings.token_label, "pin": settings.pin,
            "session_timeout": settings.session_timeout,
            "softhsm2_conf": str(settings.softhsm2_conf or ""),
            "per_node_keys": settings.per_node_keys, "log_level": log_level,
            "log_format": log_format}


def tpm_hello_for(settings: TpmSettings, tcti: str, tpm_dir: Path, log_level: str,
                  depth: int, log_format: str = "text") -> dict[str, Any]:
    """The settings the TPM process opens the TPM at ``tcti`` with (``_open`` reads them);
    ``depth``: requests it runs at once. The owner auth stays a ``Secret`` until sent."""
    return {"backend": "tpm", "tcti": tcti, "tpm_dir": str(tpm_dir),
            "key_dir": None if settings.key_dir is None else str(settings.key_dir),
            "owner_auth": settings.owner_auth, "parent": settings.parent,
            "retries": settings.retries, "queue_size": settings.queue_size,
            "call_timeout": settings.call_timeout, "log_level": log_level, "depth": depth,
            "log_format": log_format}


def _open(hello: dict[str, Any]) -> KeyBackend:
    """The backend ``hello_for`` (PKCS#11: one session, calls holding the GIL) or
    ``tpm_hello_for`` described. Raises: StartupError; KeyError / ValueError for a malformed
    hello."""
    if hello["backend"] == "tpm":
        return _open_tpm(hello)
    from authority.backends.pkcs11 import Pkcs11Backend

    conf = hello["softhsm2_conf"]
    return Pkcs11Backend.open(Pkcs11Settings(
        module=Path(hello["module"]), token_label=hello["token_label"], pin=Secret(hello["pin"]),
        sessions=1, session_timeout=float(hello["session_timeout"]),
        softhsm2_conf=Path(conf) if conf else None, release_gil=False,
        per_node_keys=bool(hello.get("per_node_keys", False))))


def _open_tpm(hello: dict[str, Any]) -> KeyBackend:
    """The TPM backend on the TPM the service reaches (its embedded swtpm stays the
    service's). Raises: StartupError; KeyError / ValueError / TypeError for a malformed
    hello."""
    from authority.backends.tpm import open_tpm_backend

    parent, key_dir = hello["parent"], hello["key_dir"]
    settings = TpmSettings(  # key_dir None: open_tpm_backend's default under tpm_dir
        tcti=str(hello["tcti"]), key_dir=None if key_dir is None else Path(key_dir),
        owner_auth=Secret(hello["owner_auth"]), parent=None if parent is None else int(parent),
        retries=int(hello["retries"]), queue_size=int(hello["queue_size"]),
        call_timeout=float(hello["call_timeout"]))
    return open_tpm_backend(settings, Path(hello["tpm_dir"]), queue_size=settings.queue_size,
                            call_timeout=settings.call_timeout)


def serve(channel: Channel, backend: KeyBackend, depth: int = 1) -> None:
    """Answer requests until the channel closes; ``depth`` > 1 runs that many at once.
    Raises: OSError (channel broken)."""
    if depth > 1:
        _serve_pipelined(channel, backend, depth)
        return
    while True:
        try:
            payload = channel.recv()
        except EOFError:
            return
        channel.send(answer(backend, payload))


def _serve_pipelined(channel: Channel, backend: KeyBackend, depth: int) -> None:
    """Read requests ahead, run up to ``depth`` at once, reply in request order (a writer
    thread waits for each answer in turn). Raises: OSError (channel broken)."""
    answers: queue.Queue[Future[bytes] | None] = queue.Queue(maxsize=depth)
    failed: list[OSError] = []

    def write() -> None:
        while (future := answers.get()) is not None:
            reply = future.result()
            if failed:
                continue  # keep draining so the reader never blocks on a full queue
            try:
                channel.send(reply)
            except OSError as exc:  # the service is gone: stop reading too
                failed.append(exc)
                channel.close()

    writer = threading.Thread(target=write, name="replies", daemon=True)
    writer.start()
    with ThreadPoolExecutor(depth, thread_name_prefix="request") as pool:
        try:
            while True:
                payload = channel.recv()
                answers.put(pool.submit(answer, backend, payload))
        except (EOFError, OSError):
            pass
        finally:
            answers.put(None)
            writer.join()
    if failed:
        raise failed[0]


def answer(backend: KeyBackend, payload: bytes) -> bytes:
    """The reply to one request payload. Never raises."""
    try:
        op, items = decode_request(payload)
        return encode_results(_run(backend, op, items))
    except KeyNotFound as exc:
        return encode_failure(KEY_NOT_FOUND, exc.key_id)
    except DeviceUnavailable as exc:
        return encode_failure(DEVICE_UNAVAILABLE, exc.message)
    except InvalidArgument as exc:
        return encode_invalid_argument(exc)
    except FailedPrecondition as exc:
        return encode_failure(FAILED_PRECONDITION, exc.message)
    except WireError as exc:
        return encode_failure(DEVICE_UNAVAILABLE, f"device process: bad request: {exc}")
    except Exception:
        log.exception("unexpected error in a device process")
        return encode_failure(DEVICE_UNAVAILABLE, "unexpected error in a device process "
                                                  "(see the server log)")


def _run(backend: KeyBackend, op: int, items: Sequence[tuple[bytes, bytes, bytes]]
         ) -> Sequence[bytes | InvalidTicket]:
    """The results of one decoded request (see wire.py for each operation's results).
    Raises: what the backend raises; WireError (a key operation without exactly one item)."""
    if op == SEAL:
        return backend.seal_many(items)
    if op == UNSEAL:
        return backend.unseal_many(items)
    if op == LIST_KEYS:
        return sorted(backend.list_keys())
    if op == DESCRIBE:
        return [encode_info(backend.describe())]
    if len(items) != 1:
        raise WireError(f"operation {op} takes one key id, got {len(items)} items")
    key_id = items[0][0]
    if op == CREATE_KEY:
        backend.create_key(key_id)
        return []
    if op == DESTROY_KEY:
        backend.destroy_key(key_id)
        return []
    return [encode_flags(backend.key_attributes(key_id))]  # KEY_ATTRIBUTES


if __name__ == "__main__":
    sys.exit(main(sys.argv))
