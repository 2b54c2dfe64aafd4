"""The gateway's protocol engine: one datagram in, at most one datagram out. It keeps the SAs,
answers a retransmitted request with the response it sent before (RFC 7296 §2.1), and drops
what it cannot parse. No sockets here (``responder`` has them)."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, KeysView

from authority.gateway.authority import AuthorityLink, TicketService
from authority.gateway.initial import answer_auth, answer_sa_init
from authority.gateway.messages import (
    NO_ADDITIONAL_SAS,
    Refusal,
    encrypted_reply,
    notify_payload,
)
from authority.gateway.resumed import answer_resume, answer_resumed_auth
from authority.gateway.session import IkeSa
from authority.gateway.settings import GatewaySettings
from authority.ikev2.errors import PayloadError
from authority.ikev2.sk import decrypt_message
from authority.ikev2.wire import (
    CREATE_CHILD_SA,
    IKE_AUTH,
    IKE_HEADER_LEN,
    IKE_SA_INIT,
    IKE_SESSION_RESUME,
    INFORMATIONAL,
    PAYLOAD_DELETE,
    ZERO_SPI,
    IkeHeader,
    decode_ike_header,
    decode_message,
)

LOG = logging.getLogger("authority.gateway")
Address = tuple[str, int]
SaKey = tuple[bytes, bytes]
#: SAs waiting for their IKE_AUTH kept at most (and first requests remembered for
#: retransmissions): beyond it the oldest is forgotten
MAX_HALF_OPEN = 1024
#: events kept (the most recent): a flood of datagrams must not grow the engine
MAX_EVENTS = 4096


class Engine:
    """Answers IKE_SA_INIT, IKE_AUTH, IKE_SESSION_RESUME and INFORMATIONAL requests for
    ``settings``; ``events`` lists (kind, detail) of what happened, the most recent
    ``MAX_EVENTS``, for operators and tests.

    ``sas`` holds every SA by (SPIi, SPIr); the half-open ones (not yet through IKE_AUTH) are
    also in an index of their own, oldest first, so that bounding them costs O(1) per new SA
    whatever the number of established SAs."""

    def __init__(self, settings: GatewaySettings, client: TicketService,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        self.events: deque[tuple[str, str]] = deque(maxlen=MAX_EVENTS)
        self._on_event = on_event
        self.authority = AuthorityLink(client, self.record)
        self.sas: dict[SaKey, IkeSa] = {}
        self._half_open: OrderedDict[SaKey, None] = OrderedDict()   # oldest first
        self._first: OrderedDict[tuple[bytes, Address], tuple[bytes, bytes]] = OrderedDict()

    @property
    def half_open(self) -> KeysView[SaKey]:
        """The keys of the SAs waiting for their IKE_AUTH, oldest first (a live view)."""
        return self._half_open.keys()

    def record(self, kind: str, detail: str) -> None:
        """Note an event (and log it: a dropped datagram at DEBUG, as anyone can send them).
        Never raises."""
        self.events.append((kind, detail))
        LOG.log(logging.DEBUG if kind == "dropped" else logging.INFO, "gateway %s: %s", kind,
                detail)
        if self._on_event is not None:
            self._on_event(kind, detail)

    def handle(self, data: bytes, peer: Address) -> bytes | None:
        """The response to one datagram, or None to send nothing. Never raises: what cannot be
        parsed or answered is dropped and recorded."""
        try:
            return self._handle(data, peer)
        except (PayloadError, ValueError) as exc:  # PayloadError and transform errors alike
            self.record("dropped", f"from {peer[0]}:{peer[1]}: {exc}")
        except Refusal as exc:
            self.record("refused", str(exc))
            return exc.reply
        except Exception as exc:  # a defect must not stop the gateway: drop, log, go on
            LOG.exception("gateway: datagram from %s:%s dropped", *peer)
            self.record("error", f"{type(exc).__name__}: {exc}")
        return None

    def _handle(self, data: bytes, peer: Address) -> bytes | None:
        header = decode_ike_header(data[:IKE_HEADER_LEN])
        if header.response:
            return None
        if header.spi_r == ZERO_SPI and header.message_id == 0:
            return self._first_exchange(data, header, peer)
        sa = self.sas.get((header.spi_i, header.spi_r))
        if sa is None:
            raise PayloadError(f"no IKE SA {header.spi_i.hex()}/{header.spi_r.hex()}")
        if sa.last_response and header.message_id == sa.last_message_id:
            self.record("retransmit", f"message {header.message_id} answered again")
            return sa.last_response
        if header.message_id != sa.last_message_id + 1:
            raise PayloadError(f"message id {header.message_id} out of window")
        reply = self._exchange(sa, data, header)
        sa.last_message_id, sa.last_response = header.message_id, reply
        return reply

    def _first_exchange(self, data: bytes, header: IkeHeader, peer: Address) -> bytes | None:
        key = (header.spi_i, peer)
        seen = self._first.get(key)
        if seen is not None and seen[0] == data:
            self.record("retransmit", "first request answered again")
            return seen[1]
        if header.exchange_type == IKE_SA_INIT:
            _, payloads = decode_message(data)
            sa, reply = answer_sa_init(self.settings, data, header, payloads)
            self.record("ike-sa-init", "answered" if sa else "refused (proposal or KE group)")
        elif header.exchange_type == IKE_SESSION_RESUME:
            sa, reply = answer_resume(self.settings, self.authority, data)
            self.record("session-resume", "resumed" if sa else "TICKET_NACK")
        else:
            raise PayloadError(f"exchange {header.exchange_type} with no SA")
        if len(self._first) >= MAX_HALF_OPEN:
            self._first.popitem(last=False)
        self._first[key] = (data, reply)
        if sa is not None:
            self._add_half_open(sa)
        return reply

    def _add_half_open(self, sa: IkeSa) -> None:
        """Hold a new SA waiting for its IKE_AUTH, forgetting the oldest waiting ones beyond
        MAX_HALF_OPEN (a peer sending only IKE_SA_INIT or IKE_SESSION_RESUME requests cannot
        grow the table without bound; established SAs are never forgotten). O(1). Never
        raises."""
        while len(self._half_open) >= MAX_HALF_OPEN:
            oldest, _ = self._half_open.popitem(last=False)
            self.sas.pop(oldest, None)
        key = (sa.spi_i, sa.spi_r)
        self._half_open.pop(key, None)      # a (random) SPI pair seen again: now the newest
        self._half_open[key] = None
        self.sas[key] = sa

    def _forget(self, key: SaKey) -> None:
        """Drop an SA (refused or deleted) from the table and the half-open index. Never
        raises."""
        self.sas.pop(key, None)
        self._half_open.pop(key, None)

    def _exchange(self, sa: IkeSa, data: bytes, header: IkeHeader) -> bytes:
        if header.exchange_type == IKE_AUTH and not sa.established:
            key = (sa.spi_i, sa.spi_r)
            try:
                return self._authenticate(sa, data, header)
            except Refusal:
                self._forget(key)
                raise
            finally:
                if sa.established:             # through IKE_AUTH: no longer half-open
                    self._half_open.pop(key, None)
        if header.exchange_type == INFORMATIONAL and sa.established:
            return self._informational(sa, data, header)
        if header.exchange_type == CREATE_CHILD_SA and sa.established:
            decrypt_message(data, sa.keys.sk_ei)      # only a request that opens is answered
            self.record("create-child-sa", "refused: NO_ADDITIONAL_SAS (IKE SAs only)")
            return encrypted_reply(sa, header, [notify_payload(NO_ADDITIONAL_SAS)])
        raise PayloadError(f"exchange {header.exchange_type} not answered in this state")

    def _authenticate(self, sa: IkeSa, data: bytes, header: IkeHeader) -> bytes:
        if sa.resumed is None:
            reply = answer_auth(self.settings, self.authority, sa, data, header)
            self.record("ike-auth", "initiator authenticated with the pre-shared key")
        else:
            reply = answer_resumed_auth(self.settings, self.authority, sa, data, header)
            self.record("resumed-auth", f"resumed AUTH verified ({self.settings.resumed_auth})")
        return reply

    def _informational(self, sa: IkeSa, data: bytes, header: IkeHeader) -> bytes:
        _, inner = decrypt_message(data, sa.keys.sk_ei)
        if any(p.payload_type == PAYLOAD_DELETE for p in inner):
            self._forget((sa.spi_i, sa.spi_r))
            self.record("delete", f"IKE SA {sa.spi_i.hex()}/{sa.spi_r.hex()} deleted")
        return encrypted_reply(sa, header, [])
