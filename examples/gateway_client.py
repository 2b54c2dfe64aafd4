"""How a gateway uses the ticket authority client (run a server first: ``scripts/run``).

    python examples/gateway_client.py [--authority 127.0.0.1:50051]

Issues a ticket for a made-up SA, prints the N(TICKET_LT_OPAQUE) payload the gateway would put
in its IKE_AUTH response, then does what a second gateway does on IKE_SESSION_RESUME: redeem,
and consume once the resumed IKE_AUTH verified. Any refusal, and an unreachable authority,
become N(TICKET_NACK): the client falls back to a full IKE_SA_INIT.
"""

from __future__ import annotations

import argparse
import os

from authority.client import (
    AuthorityRejected,
    AuthorityUnavailable,
    TicketClient,
    ticket_nack_payload,
)
from authority.state import ResumptionState


def made_up_sa() -> ResumptionState:
    return ResumptionState(
        id_i=b"\x03\x00\x00\x00alice@vpn.example.net", id_r=b"\x02\x00\x00\x00vpn.example.net",
        spi_i=os.urandom(8), spi_r=os.urandom(8), sk_d=os.urandom(32), encr_id=20,
        encr_key_bits=256, prf_id=5, integ_id=0, dh_group=19, auth_method=14)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authority", default="127.0.0.1:50051")
    args = parser.parse_args()
    with TicketClient(args.authority, timeout=1.0, retries=3) as client:
        try:
            issued = client.issue(made_up_sa(), lifetime=3600)
        except AuthorityUnavailable as exc:
            print(f"authority unavailable ({exc}): answer N(TICKET_NACK) "
                  f"{ticket_nack_payload().hex()}")
            return 1
        except AuthorityRejected as exc:
            print(f"request refused: {exc.code.name}: {exc.details}")
            return 1
        print(f"ticket: {len(issued.ticket)} octets, key {issued.key_id}, "
              f"lifetime {issued.lifetime} s")
        print(f"N(TICKET_LT_OPAQUE) for the IKE_AUTH response: {issued.notify_payload().hex()}")

        # ... later, on another gateway, an IKE_SESSION_RESUME arrives carrying the ticket:
        redeemed = client.redeem(issued.ticket)
        if not redeemed.ok:
            print(f"{redeemed.result.name}: answer N(TICKET_NACK) {redeemed.nack_payload().hex()}")
            return 1
        print(f"redeemed: IDi {redeemed.state.id_i[4:].decode() if redeemed.state else '?'}; "
              f"answer HDR + Nr, derive the keys, verify the resumed IKE_AUTH, then:")
        print(f"consume: {client.consume(redeemed.ticket_id).name}")
        print(f"a second redeem of the same ticket: {client.redeem(issued.ticket).result.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
