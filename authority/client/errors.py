"""What the gateway-side client raises.

- ``AuthorityUnavailable``: the authority could not answer: UNAVAILABLE after the retries the
  call was allowed (see ``authority.client`` for which calls are retried), or a connection that
  could not be made. A gateway treats it like a refused ticket: N(TICKET_NACK), full exchange.
- ``AuthorityDeadlineExceeded`` (an ``AuthorityUnavailable``): the call's deadline passed;
  never retried.
- ``AuthorityRejected``: the authority refused the request itself (INVALID_ARGUMENT,
  RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNAUTHENTICATED, ...); never retried. ``code`` and
  ``details`` carry the status and the server's message (which starts with the field).
- ``PlaintextRefused`` (a ``ValueError``): a client without TLS was pointed at an address that is
  not loopback.

A bad *ticket* is never an exception: it is a redeem result (INVALID, EXPIRED, REPLAYED, ...).
"""

from __future__ import annotations

from typing import Any


class TicketClientError(Exception):
    """Base of the errors a ticket client raises for a failed call.

    ``code`` is the ``grpc.StatusCode`` of the last attempt, ``details`` its message,
    ``method`` the RPC name and ``attempts`` how many requests were sent (or tried to be)."""

    def __init__(self, method: str, code: Any, details: str, attempts: int = 1) -> None:
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts
        name = getattr(code, "name", str(code))
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{method}: {name}: {details}{tries}")


class AuthorityUnavailable(TicketClientError):
    """The authority could not be reached or could not serve the call (UNAVAILABLE), after the
    retries the call was allowed. ``maybe_sent`` is True when the last request may have reached
    the server (so a non-idempotent call was not retried)."""

    def __init__(self, method: str, code: Any, details: str, attempts: int = 1,
                 maybe_sent: bool = True) -> None:
        super().__init__(method, code, details, attempts)
        self.maybe_sent = maybe_sent


class AuthorityDeadlineExceeded(AuthorityUnavailable):
    """The call's deadline (the client's ``timeout``) passed before an answer came."""


class AuthorityRejected(TicketClientError):
    """The authority answered with an error status other than UNAVAILABLE or
    DEADLINE_EXCEEDED (typically INVALID_ARGUMENT, whose ``details`` name the field)."""


class PlaintextRefused(ValueError):
    """Plaintext gRPC was asked for towards an address that is not loopback."""
