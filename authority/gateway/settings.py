"""A gateway's settings: who it is, its pre-shared key, what it negotiates and which reading of
the resumed AUTH it speaks. Frozen and validated; ``repr`` never shows the key."""

from __future__ import annotations

from dataclasses import dataclass, field

from authority.ikev2.auth import READINGS, RFC5723
from authority.ikev2.bodies import ID_FIXED_LEN
from authority.ikev2.ecdh import DH_ECP_256
from authority.ikev2.proposals import Acceptable
from authority.ikev2.transforms import ENCR_AES_GCM_16

PRF_HMAC_SHA2_256 = 5
PRF_HMAC_SHA2_384 = 6
PRF_HMAC_SHA2_512 = 7
DEFAULT_ACCEPTABLE = Acceptable(
    encryption=((ENCR_AES_GCM_16, 256), (ENCR_AES_GCM_16, 128)),
    prfs=(PRF_HMAC_SHA2_256, PRF_HMAC_SHA2_384, PRF_HMAC_SHA2_512),
    dh_groups=(DH_ECP_256,))
MIN_PSK_LEN = 16


@dataclass(frozen=True)
class GatewaySettings:
    """``local_id`` is the IDr payload body the gateway sends (every gateway of a cluster
    answers as the same identity); ``psk`` the pre-shared key of its peers; ``resumed_auth`` the
    reading of the resumed IKE_AUTH's AUTH (``rfc5723``, the default, or ``message-only`` for
    initiators such as libreswan 5.2: docs/interop.md); ``ticket_lifetime`` in seconds (0: the
    authority's default); ``realm`` the realm tickets are bound to ("" none)."""

    local_id: bytes
    psk: bytes = field(repr=False)
    resumed_auth: str = RFC5723
    ticket_lifetime: int = 0
    realm: str = ""
    acceptable: Acceptable = DEFAULT_ACCEPTABLE

    def __post_init__(self) -> None:
        """Raises ValueError naming the field that is wrong."""
        if len(self.local_id) <= ID_FIXED_LEN:
            raise ValueError("local_id: an ID payload body (type, 3 reserved octets, data)")
        if len(self.psk) < MIN_PSK_LEN:
            raise ValueError(f"psk: at least {MIN_PSK_LEN} octets")
        if self.resumed_auth not in READINGS:
            raise ValueError(f"resumed_auth: one of {', '.join(READINGS)}, "
                             f"got {self.resumed_auth!r}")
        if not 0 <= self.ticket_lifetime < 2**32:
            raise ValueError("ticket_lifetime: 0 .. 2^32-1 seconds")
