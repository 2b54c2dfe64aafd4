"""Running one device operation so that a restarted TPM or a lost connection does not fail it.

TPM_RC_RETRY / YIELDED / TESTING are resubmitted ``retries`` times with a short backoff (by
:meth:`Connection.call`). A handle or saved context the TPM no longer knows (it was restarted)
drops every loaded object and the operation runs once more from the blobs; out of object memory
evicts our LRU and runs once more; a lost TCTI connection reconnects (flushing transient objects
left behind) before the next operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, TypeVar

from tpm2_pytss.constants import TPM2_SU  # type: ignore[import-untyped, unused-ignore]

from authority.backends.tpm._errors import Kind, TpmError
from authority.backends.tpm.connection import Connection
from authority.backends.tpm.keycache import KeyCache

__all__ = ["recovering"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_RECOVERIES: Final = 2


def recovering(conn: Connection, keys: KeyCache, op: Callable[[], T]) -> T:
    """Run ``op``; after a stale handle, TPM restart or full object memory, recover and run
    it again (at most twice). Raises: what ``op`` raises."""
    if conn.needs_reconnect:
        keys.reset(flush=False)
        conn.reconnect()
    attempt = 0
    while True:
        try:
            return op()
        except TpmError as err:
            if attempt >= _RECOVERIES:
                raise
            attempt += 1
            if err.kind in (Kind.STALE, Kind.INITIALIZE):
                _resync(conn, keys, err)
            elif err.kind is Kind.MEMORY:
                log.warning("TPM object memory full; flushing our %d loaded key(s)",
                            keys.loaded_count)
                keys.drop_loaded(flush=True)
            else:
                raise


def _resync(conn: Connection, keys: KeyCache, err: TpmError) -> None:
    """The TPM lost our objects (restart/reset): start over from the blobs.

    Raises: TpmError (TPM2_Startup failed other than with "already started").
    """
    conn.counters["resyncs"] += 1
    log.warning("%s; reloading TPM objects from the key blobs", err.message)
    if err.kind is Kind.INITIALIZE:
        try:
            conn.call("TPM2_Startup", conn.esapi.startup, TPM2_SU.CLEAR)
        except TpmError as again:
            if again.kind is not Kind.INITIALIZE:  # already started meanwhile: fine
                raise
    keys.reset(flush=True)
