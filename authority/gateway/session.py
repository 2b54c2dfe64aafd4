"""What the gateway holds for one IKE SA between its exchanges."""

from __future__ import annotations

from dataclasses import dataclass

from authority.ikev2.keys import SaKeys
from authority.ikev2.proposals import IkeSuite
from authority.state import ResumptionState


@dataclass
class IkeSa:
    """An IKE SA as the responder sees it. ``first_request``/``first_response`` are the
    IKE_SA_INIT or IKE_SESSION_RESUME messages AUTH signs; ``resumed`` is the redeemed state
    when the SA was resumed, with the ``ticket_id`` to consume. ``repr`` shows no key."""

    spi_i: bytes
    spi_r: bytes
    ni: bytes
    nr: bytes
    first_request: bytes
    first_response: bytes
    suite: IkeSuite
    keys: SaKeys
    resumed: ResumptionState | None = None
    ticket_id: bytes = b""
    peer_id: bytes = b""
    established: bool = False
    last_message_id: int = 0
    last_response: bytes = b""

    def __repr__(self) -> str:
        kind = "resumed" if self.resumed is not None else "initial"
        return (f"IkeSa({self.spi_i.hex()}/{self.spi_r.hex()}, {kind}, "
                f"established={self.established})")
