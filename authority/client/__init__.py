"""The gateway-side client of the ticket authority: ``TicketClient`` (blocking) and
``AsyncTicketClient`` (asyncio), with the same methods::

    with TicketClient("127.0.0.1:50051") as client:                 # plaintext: loopback only
        issued = client.issue(state, lifetime=3600)                 # -> IssuedTicket
        sk_payloads += issued.notify_payload()                       # N(TICKET_LT_OPAQUE) octets
        ...
        redeemed = client.redeem(ticket)                            # -> Redeemed
        if not redeemed.ok:
            reply_notify = redeemed.nack_payload()                   # N(TICKET_NACK) octets
        ...                                                          # resumed IKE_AUTH verified:
        client.consume(redeemed.ticket_id)                           # -> RedeemResult.OK

    TicketClient("authority.example.net:50051",
                 tls=ClientTls(ca_file="ca.pem", cert_file="gw.pem", key_file="gw.key"))

Deadlines: ``timeout`` (default 2 s) bounds each method call, retries and backoff included.
Retries (``retries``, default 3; ``Backoff``: 50 ms base, x2, full jitter, capped at 1 s) apply to
UNAVAILABLE only, and only where repeating is safe:

- ``issue``, ``issue_many``, ``redeem``/``redeem_many`` without consume: idempotent, retried on
  any UNAVAILABLE.
- ``redeem(consume=True)``, ``redeem_many(consume=True)``, ``consume``: retried only when the
  connection could not be made. Before sending, the client makes sure the channel is connected
  (READY, else a health-check probe must get through), so a failure there means nothing was
  sent. Once the request went out, UNAVAILABLE is final: a repeat that reached the authority
  twice would report the caller's own ticket as REPLAYED.
- INVALID_ARGUMENT, DEADLINE_EXCEEDED and every other status: never retried.

Coalescing (``coalesce_window``, default 0.0005 s; 0 turns it off): concurrent ``issue``,
``redeem`` and ``consume`` calls on one client (threads sharing a ``TicketClient``, tasks
sharing an ``AsyncTicketClient``) are merged into IssueTickets / RedeemTickets / ConsumeTickets
while a call of the same kind (issue, redeem, redeem with consume, consume) is in flight, each
merged call waiting at most the window; a lone call goes out at once as the unary call. Each
caller still gets exactly its own result or its own exception (a per-item error as the unary
call's), under its own deadline and the retry rule above; a task cancelled while it waits gets
CancelledError, the others are unaffected. A server without ConsumeTickets (an older release)
makes consumes go alone. See ``authority/client/coalesce.py``.

Errors: ``AuthorityUnavailable`` (after the retries; ``AuthorityDeadlineExceeded`` is a kind of
it), ``AuthorityRejected`` (``code``, ``details``), ``PlaintextRefused`` at construction. A gateway
answers N(TICKET_NACK) (``ticket_nack_payload()``) when the authority is unavailable.
"""

from __future__ import annotations

from authority.client.aio import AsyncTicketClient
from authority.client.errors import (
    AuthorityDeadlineExceeded,
    AuthorityRejected,
    AuthorityUnavailable,
    PlaintextRefused,
    TicketClientError,
)
from authority.client.models import (
    IssuedTicket,
    ItemError,
    Redeemed,
    RedeemResult,
    StateLike,
    ticket_nack_notify,
    ticket_nack_payload,
)
from authority.client.sync import TicketClient
from authority.client.transport import Backoff, ClientTls, is_loopback

__all__ = [
    "AsyncTicketClient", "AuthorityDeadlineExceeded", "AuthorityRejected",
    "AuthorityUnavailable", "Backoff", "ClientTls", "IssuedTicket", "ItemError",
    "PlaintextRefused", "RedeemResult", "Redeemed", "StateLike", "TicketClient",
    "TicketClientError", "is_loopback", "ticket_nack_notify", "ticket_nack_payload",
]
