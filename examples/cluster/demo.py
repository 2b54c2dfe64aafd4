"""The cluster example's demonstration (run by examples/cluster/run): a ticket issued on
replica A, redeemed on replica B, consumed there once the (imagined) resumed IKE_AUTH verified,
then presented to replica C: REPLAYED, as on every replica.

    python examples/cluster/demo.py A_ADDRESS B_ADDRESS C_ADDRESS

Exit status 0 when every answer is the expected one, 1 otherwise.
"""

from __future__ import annotations

import os
import sys

from authority.client import RedeemResult, TicketClient
from authority.state import ResumptionState


def made_up_sa() -> ResumptionState:
    return ResumptionState(
        id_i=b"\x03\x00\x00\x00alice@vpn.example.net", id_r=b"\x02\x00\x00\x00vpn.example.net",
        spi_i=os.urandom(8), spi_r=os.urandom(8), sk_d=os.urandom(32), encr_id=20,
        encr_key_bits=256, prf_id=5, integ_id=0, dh_group=19, auth_method=14)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python examples/cluster/demo.py A_ADDRESS B_ADDRESS C_ADDRESS",
              file=sys.stderr)
        return 2
    a, b, c = (TicketClient(address, timeout=5.0) for address in argv)
    with a, b, c:
        issued = a.issue(made_up_sa(), lifetime=600)
        print(f"issued on A ({argv[0]}): a ticket of {len(issued.ticket)} octets "
              f"under key {issued.key_id}")
        redeemed = b.redeem(issued.ticket)
        print(f"redeemed on B ({argv[1]}): {redeemed.result.name}")
        consumed = b.consume(redeemed.ticket_id) if redeemed.ok else redeemed.result
        print(f"consumed on B ({argv[1]}): {consumed.name}")
        replayed = c.redeem(issued.ticket)
        print(f"presented again on C ({argv[2]}): {replayed.result.name}")
    expected = (RedeemResult.OK, RedeemResult.OK, RedeemResult.REPLAYED)
    if (redeemed.result, consumed, replayed.result) != expected:
        print("unexpected answers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
