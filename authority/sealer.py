"""Issue and redeem tickets: the ticket format, the key ring and the backend, in that order.

Redeem checks, cheapest first (RFC 5723 section 9 / notes section 6):
syntax -> key id known (an unknown one makes the key ring re-read the store once per request,
rate-limited: a key another replica just made; if the store cannot be reached, the item is
UNAVAILABLE rather than INVALID: only the store could say the key does not exist) and in its
window (no device call) -> one device unseal -> plaintext
syntax -> expiry -> realm (another realm's ticket is INVALID) -> revocations and the realm's
policy epoch (in memory) -> consumed set. EXPIRED, REVOKED and REPLAYED are only reported for
authentic tickets; a redeem that fails changes nothing.
"""

from __future__ import annotations

import enum
import hmac
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from authority.backends.base import KeyBackend
from authority.clock import Clock
from authority.config import TicketPolicy
from authority.counters import Counters
from authority.errors import (
    AuthorityError,
    DeviceUnavailable,
    InvalidArgument,
    InvalidTicket,
    KeyNotFound,
)
from authority.keyring import KeyRing
from authority.outage import UNCHECKED
from authority.policy import Policy, check_realm
from authority.state import ResumptionState, validate_state
from authority.steps import DeviceCall, Plan, run
from authority.store.base import Store
from authority.ticket_format import (
    MAX_TICKET_LEN,
    TICKET_ID_LEN,
    ParsedTicket,
    TicketContents,
    assemble_ticket,
    decode_contents,
    encode_contents,
    encode_header,
    parse_ticket,
    sealed_ticket_len,
)

log = logging.getLogger(__name__)

#: octets of a consume handle's tag
HANDLE_TAG_LEN = 16
#: The handle a redeem returns and a gateway passes to ConsumeTicket: ticket id (16) | expiry
#: (8, big-endian seconds) | tag (16): HMAC-SHA256 under the store's handle key, truncated.
TICKET_HANDLE_LEN = TICKET_ID_LEN + 8 + HANDLE_TAG_LEN
_HANDLE_LABEL = b"ike-ticket-authority consume handle v1\x00"


class RedeemStatus(enum.IntEnum):
    """Outcome of a redeem; values match the proto's RedeemResult."""

    OK = 1
    INVALID = 2
    EXPIRED = 3
    REPLAYED = 4
    REVOKED = 5


#: the Counters name of each outcome (computed once: Enum.name is a slow property)
_COUNTER_NAMES = {status: f"redeem.{status.name.lower()}" for status in RedeemStatus}
#: the counter of redeems answered UNAVAILABLE because their key id is unknown here and the
#: store could not be reached to look for it
UNKNOWN_KEY_UNAVAILABLE = "redeem.unknown_key_unavailable"
#: where a consume comes from: a ConsumeTicket(s) handle, or a RedeemTicket(s) /
#: RedeemTicketStream item with consume=true; each item is one consume
CONSUME_VIAS = ("consume", "redeem")
#: why a consume failed: the store failed or could not be reached, or the policy copy is past
#: ``store.max_staleness`` (DeviceUnavailable: answered UNAVAILABLE); anything else (UNKNOWN)
CONSUME_FAILURE_CAUSES = ("unavailable", "error")


def consume_attempts(via: str) -> str:
    """The Counters name of the consumes from ``via`` the authority set out to record: a
    handle of ConsumeTicket(s) that is authentic and not expired; a ticket redeemed with
    consume=true that is authentic, not expired and of the gateway's realm (a client's own
    errors are no attempt: a refused handle is INVALID_ARGUMENT, a bad ticket its redeem
    result)."""
    return f"consume.attempts.{via}"


def consume_failures(via: str, cause: str) -> str:
    """The Counters name of the consume attempts from ``via`` that failed for ``cause``
    (``CONSUME_FAILURE_CAUSES``): answered with an error, nothing acknowledged."""
    return f"consume.failures.{via}.{cause}"


_ATTEMPTS = {via: consume_attempts(via) for via in CONSUME_VIAS}
_FAILURES = {(via, cause): consume_failures(via, cause)
             for via in CONSUME_VIAS for cause in CONSUME_FAILURE_CAUSES}


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
    reissue: bool = False  # OK under a key that no longer seals: hand the client a new ticket
    handle: bytes = b""    # the authenticated handle for ConsumeTicket (empty unless OK)


def make_handle(key: bytes, ticket_id: bytes, expires_at: int) -> bytes:
    """The consume handle of an authentic ticket: id | expiry | tag under ``key``."""
    body = ticket_id + expires_at.to_bytes(8, "big")
    return body + _handle_tag(key, body)


def open_handle(key: bytes, handle: bytes, field: str = "ticket_id") -> tuple[bytes, int]:
    """The (ticket id, expiry) of a handle ``make_handle`` made under ``key``.

    Raises: InvalidArgument naming ``field`` for a wrong length or a tag that fails.
    """
    if len(handle) != TICKET_HANDLE_LEN:
        raise InvalidArgument(field, f"must be the {TICKET_HANDLE_LEN}-octet handle "
                                     f"returned by RedeemTicket, got {len(handle)}")
    body, tag = handle[:-HANDLE_TAG_LEN], handle[-HANDLE_TAG_LEN:]
    if not hmac.compare_digest(tag, _handle_tag(key, body)):
        raise InvalidArgument(field, "not a handle returned by RedeemTicket")
    return body[:TICKET_ID_LEN], int.from_bytes(body[TICKET_ID_LEN:], "big")


def _handle_tag(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, _HANDLE_LABEL + body, "sha256")[:HANDLE_TAG_LEN]


class Sealer:
    """The ticket domain service; thread-safe. Single calls are batches of one."""

    def __init__(self, ring: KeyRing, backend: KeyBackend, store: Store, policy: TicketPolicy,
                 clock: Clock, counters: Counters, rules: Policy | None = None) -> None:
        self._ring = ring
        self._rules = rules if rules is not None else Policy(store, clock, policy.max_lifetime)
        self._backend = backend
        self._store = store
        self._policy = policy
        self._clock = clock
        self._counters = counters
        self._handle_secret: bytes | None = None  # the store's handle key, read on first use
        self._lookup_failed_at = -math.inf  # when a consumed-set lookup last failed (monotonic)

    def grant_lifetime(self, requested: int) -> int:
        """0 means the default; anything longer than the maximum is clamped."""
        if requested == 0:
            return self._policy.default_lifetime
        return min(requested, self._policy.max_lifetime)

    # -- issue -----------------------------------------------------------------------------------

    def issue(self, state: ResumptionState, lifetime: int = 0, realm: str = "") -> IssuedTicket:
        """Seal ``state`` into a new ticket of ``realm`` under the sealing key.

        Raises: InvalidArgument (a state field, realm), DeviceUnavailable, ResourceExhausted.
        """
        result = self.issue_many([(state, lifetime)], field=lambda _: "state",
                                 realms=[realm])[0]
        if isinstance(result, InvalidArgument):
            raise result
        return result

    def issue_many(self, items: Sequence[tuple[ResumptionState, int]],
                   field: Callable[[int], str] = lambda i: f"items[{i}].state",
                   realms: Sequence[str] | None = None,
                   ) -> list[IssuedTicket | InvalidArgument]:
        """Seal many states (with requested lifetimes) in one device session, in order.

        ``realms`` (parallel to ``items``; default: the default realm "") names each ticket's
        realm; the ticket also carries the realm's current policy epoch.
        A state or realm that fails validation yields its InvalidArgument; the others are sealed.
        Raises: DeviceUnavailable (also when the device lost the sealing key: the key ring
        then makes a new one for the next call), ResourceExhausted (for the whole batch).
        """
        return run(self.issue_plan(items, field, realms), self._backend)

    def issue_plan(self, items: Sequence[tuple[ResumptionState, int]],
                   field: Callable[[int], str] = lambda i: f"items[{i}].state",
                   realms: Sequence[str] | None = None,
                   ) -> Plan[list[IssuedTicket | InvalidArgument]]:
        """``issue_many`` as a plan (authority/steps.py): yields the one seal_many call.
        Raises: as ``issue_many``."""
        out: list[IssuedTicket | InvalidArgument | None] = [None] * len(items)
        jobs: list[tuple[int, bytes, bytes, bytes, TicketContents]] = []
        now = math.floor(self._clock.now())
        version = self._backend.format_version
        for index, (state, lifetime) in enumerate(items):
            realm = realms[index] if realms is not None else ""
            try:
                contents, plain = self._prepare(state, lifetime, realm, field(index), now,
                                                version)
            except InvalidArgument as exc:
                out[index] = exc
                continue
            key_id = self._ring.sealing_key()
            jobs.append((index, key_id, encode_header(key_id, version), plain, contents))
        try:
            sealed = (yield DeviceCall(True, [(k, h, plain) for _, k, h, plain, _ in jobs])
                      ) if jobs else []
        except KeyNotFound as exc:   # the sealing key is gone from the device: UNAVAILABLE,
            raise self._ring.sealing_key_lost(exc.key_id) from exc  # and a new key for the next
        for (index, key_id, header, _, contents), body in zip(jobs, sealed, strict=True):
            out[index] = IssuedTicket(assemble_ticket(header, body), key_id, contents.issued_at,
                                      contents.expires_at,
                                      contents.expires_at - contents.issued_at)
        self._counters.inc("issued", len(jobs))
        return [r for r in out if r is not None]

    def _prepare(self, state: ResumptionState, lifetime: int, realm: str, field: str, now: int,
                 version: int) -> tuple[TicketContents, bytes]:
        """Validate one item and encode its plaintext, checking that the ticket it makes under
        format ``version`` fits the format's cap (before anything is sealed).

        Raises: InvalidArgument naming a field of ``field`` (the state), its ``realm`` sibling,
        or ``field`` itself when the sealed ticket would be too long.
        """
        validate_state(state, prefix=field)
        check_realm(realm, _sibling(field, "realm"))
        granted = self.grant_lifetime(lifetime)
        contents = TicketContents(secrets.token_bytes(TICKET_ID_LEN), now, now + granted,
                                  state, realm=realm, policy_epoch=self._rules.epoch(realm))
        plain = encode_contents(contents)
        size = sealed_ticket_len(version, len(plain))
        if size > MAX_TICKET_LEN:
            raise InvalidArgument(field, f"sealed ticket would be {size} octets, more than the "
                                         f"{MAX_TICKET_LEN} the ticket format allows with this "
                                         f"backend; shorten id_i, id_r, gateway_data or the "
                                         f"realm")
        return contents, plain

    # -- redeem ----------------------------------------------------------------------------------

    def redeem(self, ticket: bytes, consume: bool = False, realm: str = "") -> Redemption:
        """Check a ticket presented to a gateway of ``realm`` and return its state if it may be
        resumed.

        Returns INVALID for anything malformed, foreign, tampered, under a destroyed key or of
        another realm. Raises: InvalidArgument (empty ticket), DeviceUnavailable (also: a key
        id unknown here while the store cannot be reached to look for it).
        """
        result = self.redeem_many([(ticket, consume)], field=lambda _: "ticket",
                                  realms=[realm])[0]
        if isinstance(result, AuthorityError):
            raise result
        return result

    def redeem_many(self, items: Sequence[tuple[bytes, bool]],
                    field: Callable[[int], str] = lambda i: f"items[{i}].ticket",
                    realms: Sequence[str] | None = None,
                    ) -> list[Redemption | AuthorityError]:
        """Redeem many (ticket, consume) items with one device session and one store query.

        ``realms`` (parallel to ``items``; default "") is the realm of the gateway presenting
        each ticket: a ticket of another realm is INVALID.

        An empty ticket yields InvalidArgument; a ticket under a key id the key ring does not
        know, even after re-reading it, while the store cannot be reached yields
        DeviceUnavailable (that item alone: only the store could say whether another replica
        made the key); every other item yields a Redemption.
        Raises: DeviceUnavailable (for the whole batch).
        """
        return run(self.redeem_plan(items, field, realms), self._backend)

    def redeem_plan(self, items: Sequence[tuple[bytes, bool]],
                    field: Callable[[int], str] = lambda i: f"items[{i}].ticket",
                    realms: Sequence[str] | None = None,
                    ) -> Plan[list[Redemption | AuthorityError]]:
        """``redeem_many`` as a plan (authority/steps.py): yields the one unseal_many call.
        Raises: as ``redeem_many``."""
        out: list[Redemption | AuthorityError | None] = [None] * len(items)
        well_formed: list[tuple[int, ParsedTicket]] = []
        for index, (ticket, _) in enumerate(items):
            if not ticket:
                out[index] = InvalidArgument(field(index), "required")
                continue
            try:
                well_formed.append((index, parse_ticket(ticket)))
            except InvalidTicket as exc:
                out[index] = self._invalid("malformed", exc)
        unsettled = self._unsettled_keys(well_formed)
        pending: list[tuple[int, ParsedTicket]] = []
        for index, parsed in well_formed:
            if parsed.key_id in unsettled:
                out[index] = self._unsettled(field(index))
                continue
            try:
                self._ring.check_opens(parsed.key_id)  # no device call for a refused key
            except InvalidTicket as exc:
                out[index] = self._invalid("key", exc)
                continue
            pending.append((index, parsed))
        opened = (yield DeviceCall(False, [(p.key_id, p.header, p.sealed)
                                           for _, p in pending])) if pending else []
        authentic: list[tuple[int, bytes, TicketContents]] = []
        for (index, parsed), plain in zip(pending, opened, strict=True):
            if isinstance(plain, KeyNotFound):   # the ring says it opens: the device is at fault
                out[index] = self._key_not_in_device(parsed.key_id)
                continue
            if isinstance(plain, InvalidTicket):  # the device refused: tampered or foreign
                out[index] = self._invalid("auth", plain)
                continue
            try:
                authentic.append((index, parsed.key_id, decode_contents(plain)))
            except InvalidTicket as exc:
                out[index] = self._invalid("plaintext", exc)
        for index, result in self._check_live(authentic, items, realms):
            out[index] = result
        return [r for r in out if r is not None]

    def _unsettled_keys(self, well_formed: list[tuple[int, ParsedTicket]]) -> set[bytes]:
        """The key ids among ``well_formed`` the key ring does not know, even after its re-read
        (a key made on another replica: at most once per request), if that re-read could not
        reach the store or the store is known out of reach; else none (an id unknown to a ring
        the store could confirm is INVALID). Never raises."""
        unknown = {p.key_id for _, p in well_formed if not self._ring.knows(p.key_id)}
        if not unknown:
            return unknown
        confirmed = self._ring.reread_unknown()
        unknown = {key_id for key_id in unknown if not self._ring.knows(key_id)}
        return unknown if unknown and (not confirmed or self._store_out_of_reach()) else set()

    def _store_out_of_reach(self) -> bool:
        """Whether this replica knows the store to be out of reach now, without asking it
        (no store call more than the ring's one re-read): the store marked itself down
        (PostgreSQL: a call -- the ring's re-read among them -- found the database
        unreachable; cleared once it answers again), a consumed-set lookup failed since the
        policy copy was last confirmed, or the copy is past ``store.max_staleness``."""
        rules = self._rules
        return (self._store.down_since is not None
                or self._lookup_failed_at > rules.confirmed_at or not rules.fresh())

    def _unsettled(self, field: str) -> DeviceUnavailable:
        log.debug("redeem: unknown key id and the state store unreachable: UNAVAILABLE")
        self._counters.inc(UNKNOWN_KEY_UNAVAILABLE)
        return DeviceUnavailable(f"{field}: its key id is not known to this replica and the "
                                 "state store cannot be reached to look for it (it may be a "
                                 "key another replica made); retry")

    def _check_live(self, authentic: list[tuple[int, bytes, TicketContents]],
                    items: Sequence[tuple[bytes, bool]], realms: Sequence[str] | None,
                    ) -> list[tuple[int, Redemption]]:
        """Expiry and realm, then revocation and the consumed set (``_settle``). The items
        with consume=true that pass expiry and realm are consume attempts; if the rest fails
        (the store, or the policy copy past its staleness bound), they are consume failures.

        Raises: DeviceUnavailable (the store; a stale policy copy), for the whole batch.
        """
        now = self._clock.now()
        results: list[tuple[int, Redemption]] = []
        current: list[tuple[int, bytes, TicketContents]] = []
        consumes = 0
        for i, k, c in authentic:
            if now >= c.expires_at:
                results.append((i, Redemption(RedeemStatus.EXPIRED, None, k)))
            elif c.realm != (realms[i] if realms is not None else ""):
                self._invalid("realm", InvalidTicket(f"ticket of realm {c.realm!r}"))
                results.append((i, Redemption(RedeemStatus.INVALID)))
            else:
                current.append((i, k, c))
                consumes += items[i][1]
        if consumes:
            self._counters.inc(_ATTEMPTS["redeem"], consumes)
        try:
            self._settle(current, items, now, results)
        except Exception as exc:
            self._consume_failed("redeem", consumes, exc)
            raise
        counts = Counter(result.status for _, result in results)
        counts.pop(RedeemStatus.INVALID, None)  # counted by _invalid
        for status, count in counts.items():
            self._counters.inc(_COUNTER_NAMES[status], count)
        return results

    def _settle(self, current: list[tuple[int, bytes, TicketContents]],
                items: Sequence[tuple[bytes, bool]], now: float,
                results: list[tuple[int, Redemption]]) -> None:
        """Revocation, then the consumed set (one query for the lookups, one transaction for
        the consumes): each item's result appended to ``results``.

        Raises: DeviceUnavailable (the store; a stale policy copy).
        """
        live: list[tuple[int, bytes, TicketContents]] = []
        for i, k, c in current:
            if self._rules.is_revoked(c):
                results.append((i, Redemption(RedeemStatus.REVOKED, None, k)))
            else:
                live.append((i, k, c))
        primary = self._ring.primary_id
        lookups = [c.ticket_id for i, _, c in live if not items[i][1]]
        consumed = self._consumed_among(lookups, now)
        to_consume = [(i, k, c) for i, k, c in live if items[i][1]]
        fresh = self._store.consume_many([(c.ticket_id, c.expires_at) for _, _, c in to_consume],
                                         now)
        is_fresh = {i: new for (i, _, _), new in zip(to_consume, fresh, strict=True)}
        handle_key = self.handle_key() if live else b""
        for i, key_id, contents in live:
            if is_fresh.get(i, contents.ticket_id not in consumed):
                handle = make_handle(handle_key, contents.ticket_id, contents.expires_at)
                results.append((i, Redemption(RedeemStatus.OK, contents, key_id,
                                              key_id != primary, handle)))
            else:
                results.append((i, Redemption(RedeemStatus.REPLAYED, None, key_id)))

    def _consume_failed(self, via: str, count: int, exc: Exception) -> None:
        """``count`` consume attempts from ``via`` failed with ``exc``: counted by cause.
        Never raises."""
        if count:
            cause = "unavailable" if isinstance(exc, DeviceUnavailable) else "error"
            self._counters.inc(_FAILURES[via, cause], count)

    def _consumed_among(self, ticket_ids: list[bytes], now: float) -> set[bytes]:
        """The ids among ``ticket_ids`` the store has consumed; while it cannot be reached (a
        lookup failed since the policy copy was last confirmed) and the copy is fresh, none,
        without asking it, counted (``redeem.consumed_unchecked``; why this is safe:
        authority/outage.py).

        Raises: DeviceUnavailable (the store fails and the staleness bound is not enforced,
        or the copy is stale).
        """
        if not ticket_ids:
            return set()
        rules = self._rules
        if self._lookup_failed_at <= rules.confirmed_at:
            try:
                return self._store.consumed_among(ticket_ids, now)
            except DeviceUnavailable as exc:
                if not rules.enforcing:
                    raise
                self._lookup_failed_at = time.monotonic()
                log.warning("redeems without consume answer from the cached revocations for "
                            "at most store.max_staleness (%s s), unchecked against the "
                            "consumed set: %s", rules.max_staleness, exc.message)
        if not rules.fresh():
            raise rules.stale_error()
        self._counters.inc(UNCHECKED, len(ticket_ids))
        return set()

    def handle_key(self) -> bytes:
        """The store's consume-handle key (made by the store on first use; read once and
        kept: ``Authority.open`` reads it, so redeems need no store call for it).
        Raises: DeviceUnavailable."""
        key = self._handle_secret
        if key is None:
            key = self._handle_secret = self._store.handle_key()
        return key

    def _key_not_in_device(self, key_id: bytes) -> DeviceUnavailable:
        """A ticket under a key the key ring says opens, which the device did not find (its
        token unreadable, or the key lost): UNAVAILABLE, never INVALID, since the ticket may
        well be valid; the heartbeat lists the device and the ring reconciles (a key really
        gone becomes MISSING, and then its tickets are INVALID at ``check_opens``). Never
        raises."""
        self._counters.inc("redeem.key_not_in_device")
        log.warning("redeem: key %s is in the key ring but the device did not find it",
                    key_id.hex())
        return DeviceUnavailable(f"key {key_id.hex()} is in the key ring but the device did "
                                 "not find it; retry")

    def _invalid(self, stage: str, exc: InvalidTicket) -> Redemption:
        log.debug("redeem: invalid ticket (%s): %s", stage, exc.cause)
        self._counters.inc("redeem.invalid")
        self._counters.inc(f"redeem.invalid.{stage}")
        return Redemption(RedeemStatus.INVALID)

    # -- consume ---------------------------------------------------------------------------------

    def consume(self, handle: bytes) -> RedeemStatus:
        """Mark the ticket behind a redeem's handle as used: OK the first time, REPLAYED after.

        Only a handle an OK redeem returned is taken (its tag is checked under the store's
        handle key), so a gateway cannot store entries for tickets it never presented. The
        entry lives until the ticket's expiry, capped at the retention bound of tickets issued
        by now (``Policy.retention``).
        Raises: InvalidArgument naming ``ticket_id`` (malformed or not authentic: nothing is
        stored), DeviceUnavailable (store down).
        """
        result = self.consume_many([handle], field=lambda _: "ticket_id")[0]
        if isinstance(result, InvalidArgument):
            raise result
        return result

    def consume_many(self, handles: Sequence[bytes],
                     field: Callable[[int], str] = lambda i: f"items[{i}].ticket_id",
                     ) -> list[RedeemStatus | InvalidArgument]:
        """:meth:`consume` for many handles, in order, in one store transaction: a handle
        that is malformed or not authentic yields its InvalidArgument (naming ``field(i)``)
        and stores nothing; the others are OK, REPLAYED (also a handle repeated within the
        batch, after its first) or EXPIRED. The handles sent to the store are consume
        attempts (``consume_attempts("consume")``), failures by cause if the store fails.

        Raises: DeviceUnavailable (store down: for the whole batch, nothing acknowledged).
        """
        out: list[RedeemStatus | InvalidArgument | None] = [None] * len(handles)
        entries: list[tuple[int, bytes, int]] = []
        key = self.handle_key() if handles else b""
        now = self._clock.now()
        retention = math.ceil(self._rules.retention(now)) if handles else 0
        for index, handle in enumerate(handles):
            try:
                ticket_id, expires_at = open_handle(key, handle, field(index))
            except InvalidArgument as exc:
                self._counters.inc("consume_refused")
                out[index] = exc
                continue
            if now >= expires_at:
                out[index] = RedeemStatus.EXPIRED
                continue
            entries.append((index, ticket_id, min(expires_at, retention)))
        if entries:
            self._counters.inc(_ATTEMPTS["consume"], len(entries))
        try:
            fresh = self._store.consume_many([(t, e) for _, t, e in entries], now)
        except Exception as exc:
            self._consume_failed("consume", len(entries), exc)
            raise
        for (index, _, _), new in zip(entries, fresh, strict=True):
            self._counters.inc("consumed" if new else "consume_replayed")
            out[index] = RedeemStatus.OK if new else RedeemStatus.REPLAYED
        return [r for r in out if r is not None]


def _sibling(field: str, name: str) -> str:
    """``items[3].state`` -> ``items[3].realm``; ``state`` -> ``realm``."""
    head, dot, _ = field.rpartition(".")
    return f"{head}{dot}{name}"
