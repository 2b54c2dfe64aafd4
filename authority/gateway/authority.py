"""The gateway's calls to the ticket authority, each turned into what the IKE exchange needs:
a notify to send, a redeemed state or nothing. Every call is recorded as an event."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from authority.client import IssuedTicket, Redeemed, RedeemResult, TicketClientError
from authority.client.models import ticket_nack_notify
from authority.ikev2.notify import encode_notify_body
from authority.ikev2.wire import PAYLOAD_NOTIFY, RawPayload
from authority.state import ResumptionState

LOG = logging.getLogger("authority.gateway")
Record = Callable[[str, str], None]


class TicketService(Protocol):
    """What the gateway needs of ``authority.client.TicketClient``."""

    def issue(self, state: ResumptionState, lifetime: int = 0, *, realm: str = "",
              timeout: float | None = None) -> IssuedTicket: ...

    def redeem(self, ticket: bytes, consume: bool = False, *, realm: str = "",
               timeout: float | None = None) -> Redeemed: ...

    def consume(self, ticket_id: bytes, *, timeout: float | None = None) -> RedeemResult: ...


class AuthorityLink:
    """``client`` with the gateway's answers to each outcome; ``record(kind, detail)`` is told
    what happened."""

    def __init__(self, client: TicketService, record: Record, timeout: float = 2.0) -> None:
        self._client = client
        self._record = record
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gateway-authority")

    def close(self) -> None:
        """Wait for calls in flight and stop the worker threads. Never raises."""
        self._pool.shutdown(wait=True)

    def issue_soon(self, state: ResumptionState, lifetime: int, realm: str
                   ) -> Future[RawPayload]:
        """``issue`` on a worker thread, so that the gateway can wait for another call (the
        resumed IKE_AUTH's ConsumeTicket) at the same time. Never raises (the future holds
        what ``issue`` returns)."""
        return self._pool.submit(self.issue, state, lifetime, realm)

    def issue(self, state: ResumptionState, lifetime: int, realm: str) -> RawPayload:
        """N(TICKET_LT_OPAQUE) with a new ticket for ``state``, or N(TICKET_NACK) when the
        authority refuses or cannot be reached (RFC 5723 §4.3.1). Never raises."""
        try:
            issued = self._client.issue(state, lifetime, realm=realm, timeout=self._timeout)
        except TicketClientError as exc:
            self._record("issue-failed", str(exc))
            return RawPayload(PAYLOAD_NOTIFY, False, encode_notify_body(ticket_nack_notify()))
        self._record("ticket-issued", f"{len(issued.ticket)} octets, key {issued.key_id}, "
                                      f"lifetime {issued.lifetime} s")
        return RawPayload(PAYLOAD_NOTIFY, False, encode_notify_body(issued.notify()))

    def redeem(self, ticket: bytes, realm: str) -> Redeemed | None:
        """The redeemed ticket when the authority says OK; None for any other result or when it
        cannot be reached (the gateway answers N(TICKET_NACK)). Never raises."""
        try:
            redeemed = self._client.redeem(ticket, realm=realm, timeout=self._timeout)
        except TicketClientError as exc:
            self._record("redeem-failed", str(exc))
            return None
        self._record("redeem", redeemed.result.name)
        return redeemed if redeemed.ok and redeemed.state is not None else None

    def consume(self, ticket_id: bytes) -> RedeemResult | None:
        """The authority's answer to ConsumeTicket; None when it cannot be reached. Never
        raises."""
        try:
            result = self._client.consume(ticket_id, timeout=self._timeout)
        except TicketClientError as exc:
            self._record("consume-failed", str(exc))
            return None
        self._record("consume", result.name)
        return result
