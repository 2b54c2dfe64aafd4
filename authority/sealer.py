"""Issue and redeem tickets: the ticket format, the key ring and the backend, in that order.

Redeem checks, cheapest first (RFC 5723 section 9 / notes section 6):
syntax -> key id known and in its window (no device call) -> one device unseal -> plaintext
syntax -> expiry -> consumed set. EXPIRED and REPLAYED are only reported for authentic tickets.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
from dataclasses import dataclass

from authority.backends.base import KeyBackend
from authority.clock import Clock
from authority.config import TicketPolicy
from authority.counters import Counters
from authority.errors import InvalidArgument, InvalidTicket
from authority.keyring import KeyRing
from authority.state import ResumptionState, validate_state
from authority.store.base import Store
from authority.ticket_format import (
    TICKET_ID_LEN,
    TicketContents,
    assemble_ticket,
    decode_contents,
    encode_contents,
    encode_header,
    parse_ticket,
)

log = logging.getLogger(__name__)

#: The handle a gateway passes to ConsumeTicket: ticket id (16) | expiry (8, big-endian seconds).
TICKET_HANDLE_LEN = TICKET_ID_LEN + 8


class RedeemStatus(enum.IntEnum):
    """Outcome of a redeem; values match the proto's RedeemResult."""

    OK = 1
    INVALID = 2
    EXPIRED = 3
    REPLAYED = 4
    REVOKED = 5


@dataclass(frozen=True)
class IssuedTicket:
    """A sealed ticket and what the gateway tells the client about it."""

    ticket: bytes
    key_id: bytes
    issued_at: int
    expires_at: int
    lifetime: int

    @property
    def lt_opaque(self) -> bytes:
        """N(TICKET_LT_OPAQUE) notify data: lifetime (4 octets, big-endian) then the ticket."""
        return self.lifetime.to_bytes(4, "big") + self.ticket


@dataclass(frozen=True)
class Redemption:
    """Result of a redeem; ``contents`` is set only for OK."""

    status: RedeemStatus
    contents: TicketContents | None = None
    key_id: bytes | None = None

    @property
    def handle(self) -> bytes:
        """The opaque ticket id for ConsumeTicket (empty unless OK)."""
        if self.contents is None:
            return b""
        return self.contents.ticket_id + self.contents.expires_at.to_bytes(8, "big")


class Sealer:
    """The ticket domain service; thread-safe."""

    def __init__(self, ring: KeyRing, backend: KeyBackend, store: Store, policy: TicketPolicy,
                 clock: Clock, counters: Counters) -> None:
        self._ring = ring
        self._backend = backend
        self._store = store
        self._policy = policy
        self._clock = clock
        self._counters = counters

    def grant_lifetime(self, requested: int) -> int:
        """0 means the default; anything longer than the maximum is clamped."""
        if requested == 0:
            return self._policy.default_lifetime
        return min(requested, self._policy.max_lifetime)

    def issue(self, state: ResumptionState, lifetime: int = 0) -> IssuedTicket:
        """Seal ``state`` into a new ticket under the sealing key.

        Raises: InvalidArgument (a state field), DeviceUnavailable, ResourceExhausted.
        """
        validate_state(state)
        granted = self.grant_lifetime(lifetime)
        now = math.floor(self._clock.now())
        contents = TicketContents(secrets.token_bytes(TICKET_ID_LEN), now, now + granted, state)
        key_id = self._ring.sealing_key()
        header = encode_header(key_id, self._backend.format_version)
        sealed = self._backend.seal(key_id, header, encode_contents(contents))
        self._counters.inc("issued")
        return IssuedTicket(assemble_ticket(header, sealed), key_id, now, now + granted, granted)

    def redeem(self, ticket: bytes, consume: bool = False) -> Redemption:
        """Check a ticket and return its state if it may be resumed.

        Returns INVALID for anything malformed, foreign, tampered or under a destroyed key.
        Raises: InvalidArgument (empty ticket), DeviceUnavailable (device or store down).
        """
        if not ticket:
            raise InvalidArgument("ticket", "required")
        stage = "malformed"
        try:
            parsed = parse_ticket(ticket)
            stage = "key"          # unknown, destroyed or out-of-window key: no device call
            self._ring.check_opens(parsed.key_id)
            stage = "auth"         # the device refused: tampered, foreign or wrong key
            plaintext = self._backend.unseal(parsed.key_id, parsed.header, parsed.sealed)
            stage = "plaintext"
            contents = decode_contents(plaintext)
        except InvalidTicket as exc:
            log.debug("redeem: invalid ticket (%s): %s", stage, exc.cause)
            return self._count(Redemption(RedeemStatus.INVALID), f"invalid.{stage}")
        status = self._check_live(contents, consume)
        return self._count(Redemption(status, contents if status == RedeemStatus.OK else None,
                                      parsed.key_id), None)

    def _check_live(self, contents: TicketContents, consume: bool) -> RedeemStatus:
        now = self._clock.now()
        if now >= contents.expires_at:
            return RedeemStatus.EXPIRED
        if consume:
            fresh = self._store.consume(contents.ticket_id, contents.expires_at, now)
            return RedeemStatus.OK if fresh else RedeemStatus.REPLAYED
        if self._store.is_consumed(contents.ticket_id, now):
            return RedeemStatus.REPLAYED
        return RedeemStatus.OK

    def consume(self, handle: bytes) -> RedeemStatus:
        """Mark the ticket behind a redeem's handle as used: OK the first time, REPLAYED after.

        The entry lives until the ticket's expiry, capped at now + the maximum lifetime.
        Raises: InvalidArgument (malformed handle), DeviceUnavailable (store down).
        """
        if len(handle) != TICKET_HANDLE_LEN:
            raise InvalidArgument("ticket_id", f"must be the {TICKET_HANDLE_LEN}-octet id "
                                               f"returned by RedeemTicket, got {len(handle)}")
        ticket_id, expires_at = handle[:TICKET_ID_LEN], int.from_bytes(handle[TICKET_ID_LEN:])
        now = self._clock.now()
        if now >= expires_at:
            return RedeemStatus.EXPIRED
        expires_at = min(expires_at, math.ceil(now) + self._policy.max_lifetime)
        fresh = self._store.consume(ticket_id, expires_at, now)
        self._counters.inc("consumed" if fresh else "consume_replayed")
        return RedeemStatus.OK if fresh else RedeemStatus.REPLAYED

    def _count(self, result: Redemption, detail: str | None) -> Redemption:
        self._counters.inc(f"redeem.{result.status.name.lower()}")
        if detail:
            self._counters.inc(f"redeem.{detail}")
        return result
