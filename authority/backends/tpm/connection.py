"""One tpm2-pytss ESAPI connection and the one way TPM calls are made through it.

Nothing here is thread-safe and nothing needs to be: the connection belongs to the device of the
backend's one worker thread.

Every TPM call goes through :meth:`Connection.call`: TPM_RC_RETRY / YIELDED / TESTING are
resubmitted ``retries`` times with a short backoff, every other failure is translated once
(``_errors.translate``), and a lost TCTI connection or a failed TSS stack marks the connection for
a reconnect (flushing transient objects left behind) before the next operation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-untyped, unused-ignore]
from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
    ESYS_TR,
    TPM2_CAP,
    TPM2_SU,
)

from authority.backends.tpm._errors import (
    Ctx,
    Kind,
    Phase,
    TpmError,
    TpmStartupError,
    translate,
)
from authority.config import Secret

__all__ = ["Connection"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF_FIRST: Final = 0.005
_BACKOFF_MAX: Final = 0.25
_TRANSIENT_FIRST: Final = 0x80000000
_RECONNECT_FIRST: Final = 0.01    # seconds between the first two reconnection attempts,
_RECONNECT_MAX: Final = 0.25      # doubling up to this
_STILL_DOWN_EVERY: Final = 30.0   # seconds between "still unreachable" warnings


class Connection:
    """The ESAPI context (``esapi``, None while closed) and the device's counters."""

    def __init__(self, tcti: str, owner_auth: Secret, retries: int) -> None:
        self.tcti = tcti
        self._owner_auth = owner_auth
        self._retries = retries
        self.esapi: Any = None
        self.needs_reconnect = False
        self._outage: _Outage | None = None   # since the first reconnection attempt
        self.counters: dict[str, int] = {
            "blob_loads": 0, "context_loads": 0, "evictions": 0, "resyncs": 0, "reconnects": 0,
            "retries": 0, "keys_refused": 0,
        }

    def call(self, what: str, fn: Callable[..., T], *args: Any,
             phase: Phase = Phase.OPERATION, saved_context: bool = False) -> T:
        """Run one tpm2-pytss call, resubmitting on RETRY/YIELDED/TESTING.

        Raises: TpmError (serving) or TpmStartupError (start-up), made by ``translate``.
        """
        attempt = 0
        while True:
            try:
                return fn(*args)
            except TSS2_Exception as exc:
                err = translate(exc, Ctx(phase, what, self.tcti, saved_context))
                if err.kind is Kind.BUSY and attempt < self._retries:
                    time.sleep(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** attempt))
                    attempt += 1
                    self.counters["retries"] += 1
                    continue
                if err.kind in (Kind.UNREACHABLE, Kind.CLIENT):
                    self.needs_reconnect = True
                raise err from exc

    def connect(self, phase: Phase) -> None:
        """Open the TCTI and ESAPI; send TPM2_Startup if the TPM was never started.

        Raises: TpmStartupError (CONNECT phase) or TpmError.
        """
        self.esapi = self.call("loading the TCTI", ESAPI, self.tcti, phase=phase)
        if self._owner_auth.reveal():
            self.call("setting the owner authorisation", self.esapi.tr_set_auth,
                      ESYS_TR.OWNER, self._owner_auth.reveal(), phase=phase)
        try:
            self.call("probing the TPM", self.esapi.get_random, 8, phase=phase)
        except (TpmError, TpmStartupError) as err:
            if err.kind is not Kind.INITIALIZE:
                raise
            log.info("the TPM at %s was not started; sending TPM2_Startup(CLEAR)", self.tcti)
            self.call("TPM2_Startup", self.esapi.startup, TPM2_SU.CLEAR, phase=phase)
        self.needs_reconnect = False

    def close(self, failure: str = "closing the TPM connection: %s",
              level: int = logging.WARNING) -> None:
        """Close the ESAPI context, if open; never raises (a failure is logged at ``level``)."""
        old, self.esapi = self.esapi, None
        if old is None:
            return
        try:
            old.close()
        except TSS2_Exception as exc:
            log.log(level, failure, translate(exc, Ctx(
                Phase.OPERATION, "closing the connection", self.tcti)))

    def reconnect(self) -> None:
        """After a lost connection: a fresh ESAPI context, stale transients flushed.

        The first attempt is made at once; after a failed one the next waits
        ``_RECONNECT_FIRST`` seconds, doubling up to ``_RECONNECT_MAX`` (a TPM back is found
        within that), and operations meanwhile fail at once without touching the TSS stack (no
        lines per call in the log from it). One warning when the outage starts, one every
        ``_STILL_DOWN_EVERY`` seconds while it lasts, one when the TPM answers again.
        Raises: TpmError (the TPM is still unreachable, or not tried again yet).
        """
        now = time.monotonic()
        outage = self._outage
        if outage is None:
            outage = self._outage = _Outage(now)
            log.warning("reconnecting to the TPM at %s", self.tcti)
        elif now < outage.next_attempt:
            raise TpmError(f"the TPM at {self.tcti} is unreachable (tried again at most "
                           f"every {_RECONNECT_MAX:g} s)", Kind.UNREACHABLE, 0)
        outage.next_attempt = now + min(_RECONNECT_MAX, _RECONNECT_FIRST * 2 ** outage.attempts)
        outage.attempts += 1
        self.counters["reconnects"] += 1
        self.close("closing the old connection: %s", logging.DEBUG)
        try:
            self.connect(Phase.OPERATION)
            self.flush_stale(Phase.OPERATION)
        except TpmError as err:
            self.needs_reconnect = True
            if now >= outage.next_warning:
                outage.next_warning = now + _STILL_DOWN_EVERY
                log.warning("the TPM at %s is unreachable for %.1f s (%d attempts): %s",
                            self.tcti, now - outage.since, outage.attempts, err.message)
            raise
        self._outage = None
        log.warning("reconnected to the TPM at %s after %.2f s (%d attempts)", self.tcti,
                    time.monotonic() - outage.since, outage.attempts)

    def flush_quietly(self, handle: Any) -> None:
        """Flush an object; if the TPM no longer has it, just forget the ESYS_TR. Never raises."""
        try:
            self.call("flushing an object", self.esapi.flush_context, handle)
        except TpmError:
            try:
                self.call("forgetting an object", self.esapi.tr_close, handle)
            except TpmError as err:
                log.debug("forgetting a TPM object: %s", err)

    def flush_stale(self, phase: Phase) -> int:
        """Flush transient objects left in the TPM by a killed client; return how many.

        Without a resource manager they stay loaded and fill the few slots. (Behind a resource
        manager, such as /dev/tpmrm0, we see only our own, so there is nothing to flush.)
        Raises: TpmError / TpmStartupError.
        """
        handles = self._transient_handles(phase)
        for handle in handles:
            tr = self.call("flushing a stale object", self.esapi.tr_from_tpmpublic, handle,
                           phase=phase)
            self.call("flushing a stale object", self.esapi.flush_context, tr, phase=phase)
        if handles:
            log.warning("flushed %d transient object(s) left in the TPM by an earlier client: %s",
                        len(handles), ", ".join(f"0x{h:08x}" for h in handles))
        return len(handles)

    def _transient_handles(self, phase: Phase) -> list[int]:
        """Loaded transient object handles, copied to ints while the capability result is
        alive (its handle list points into it). Raises: TpmError / TpmStartupError."""
        _more, data = self.call("listing transient handles", self.esapi.get_capability,
                                TPM2_CAP.HANDLES, _TRANSIENT_FIRST, 256, phase=phase)
        handles = [int(h) for h in data.data.handles]
        return [h for h in handles if h >> 24 == _TRANSIENT_FIRST >> 24]


class _Outage:
    """A lost connection being re-established: since when, how often tried, when next."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.attempts = 0
        self.next_attempt = since
        self.next_warning = since + _STILL_DOWN_EVERY
