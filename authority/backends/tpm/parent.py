"""The parent of the ticket keys: a configured persistent storage key, or our own storage primary.

Our primary is recreated from a fixed template (:func:`templates.primary_template`), so the same
owner seed always yields the same key and no persistent handle is needed. It is kept as a saved
context and flushed as soon as children are loaded; a refused saved context (the TPM was reset)
is dropped and the primary is created again.
"""

from __future__ import annotations

import logging
from typing import Any

from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
    ESYS_TR,
    TPMA_OBJECT,
)

from authority.backends.tpm._errors import Kind, Phase, TpmError
from authority.backends.tpm.connection import Connection
from authority.backends.tpm.templates import primary_template
from authority.errors import StartupError

__all__ = ["Parent"]

log = logging.getLogger(__name__)


class Parent:
    """Opens and releases the parent handle; keeps our primary's saved context (``ctx``)."""

    def __init__(self, conn: Connection, persistent: int | None) -> None:
        self._conn = conn
        self._persistent = persistent   # a persistent storage key, or None: our own ECC primary
        self._ctx: Any = None           # TPMS_CONTEXT of the primary

    def prepare(self) -> None:
        """At start-up: create the primary and keep its saved context, or check the persistent
        parent.

        Raises: StartupError (TpmStartupError) naming tpm.owner_auth, tpm.tcti or tpm.parent.
        """
        if self._persistent is not None:
            self._check_persistent(self._persistent)
            return
        conn = self._conn
        primary = self._create(Phase.STARTUP)
        self._ctx = conn.call("saving the storage primary's context", conn.esapi.context_save,
                              primary, phase=Phase.STARTUP)
        conn.call("flushing the storage primary", conn.esapi.flush_context, primary,
                  phase=Phase.STARTUP)

    def forget(self) -> None:
        """Drop the primary's saved context (the TPM no longer has it)."""
        self._ctx = None

    def open(self) -> Any:
        """The parent of the ticket keys: the persistent parent if configured, else the storage
        primary, loaded (from its saved context, or recreated). Release with :meth:`release`.

        Raises: TpmError.
        """
        conn = self._conn
        if self._persistent is not None:
            return conn.call("opening the persistent parent", conn.esapi.tr_from_tpmpublic,
                             self._persistent)
        if self._ctx is not None:
            try:
                return conn.call("loading the storage primary", conn.esapi.context_load,
                                 self._ctx, saved_context=True)
            except TpmError as err:
                if err.kind is not Kind.STALE:
                    raise
                log.info("the storage primary's saved context was refused; recreating it")
                self._ctx = None
        handle = self._create(Phase.OPERATION)
        try:
            self._ctx = conn.call("saving the storage primary's context",
                                  conn.esapi.context_save, handle)
        except BaseException:
            conn.flush_quietly(handle)
            raise
        return handle

    def release(self, handle: Any) -> None:
        """Flush our transient primary; only forget the ESYS handle of a persistent parent."""
        if self._persistent is None:
            self._conn.flush_quietly(handle)
            return
        try:
            self._conn.call("forgetting the persistent parent", self._conn.esapi.tr_close,
                            handle)
        except TpmError as err:
            log.debug("forgetting the persistent parent: %s", err)

    def _create(self, phase: Phase) -> Any:
        """TPM2_CreatePrimary of the storage key (deterministic from the owner seed).

        Raises: TpmStartupError naming tpm.owner_auth if refused; TpmError while serving.
        """
        conn = self._conn
        handle, _public, _data, _digest, _ticket = conn.call(
            "creating the storage primary key", conn.esapi.create_primary, None,
            primary_template(), ESYS_TR.OWNER, phase=phase)
        return handle

    def _check_persistent(self, persistent: int) -> None:
        """The configured persistent parent exists and is a storage key (restricted decrypt).

        Raises: StartupError naming tpm.parent.
        """
        conn = self._conn
        where = f"tpm.parent: 0x{persistent:08x}"
        try:
            handle = conn.call("opening the persistent parent", conn.esapi.tr_from_tpmpublic,
                               persistent, phase=Phase.STARTUP)
            public, _name, _qualified = conn.call("reading the persistent parent",
                                                  conn.esapi.read_public, handle,
                                                  phase=Phase.STARTUP)
        except StartupError as err:
            raise StartupError(f"{where}: no usable persistent object ({err})") from err
        attrs = int(public.publicArea.objectAttributes)
        needed = int(TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
        if attrs & needed != needed:
            raise StartupError(f"{where}: not a storage key (needs restricted and decrypt)")
        self.release(handle)
