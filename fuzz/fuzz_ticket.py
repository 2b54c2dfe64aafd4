"""Atheris harness: the ticket parser, the IKEv2 payload decoders and the gateway kit's
responder on arbitrary octets.

Every input must end in a value or in the documented rejection (InvalidTicket for tickets,
PayloadError / UnknownTransformError, both ValueError, for IKEv2; the responder's ``handle``
never raises); anything else is a crash.

    python fuzz/fuzz_ticket.py -runs=20000 -rss_limit_mb=1024   # tests/test_fuzz_atheris.py
    python fuzz/fuzz_ticket.py -max_total_time=600 corpus/      # a longer local run
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

with atheris.instrument_imports():
    from authority.errors import InvalidTicket
    from authority.gateway import Engine, GatewaySettings
    from authority.ikev2 import ecdh, notify, payloads, proposals, wire
    from authority.ticket_format import decode_contents, parse_ticket


class _Unreachable:
    """No authority: a fuzz input that reaches one is answered as if it were down."""

    def issue(self, *_: object, **__: object) -> object:
        raise AssertionError("an arbitrary datagram reached the authority")

    redeem = consume = issue


ENGINE = Engine(GatewaySettings(local_id=b"\x02\x00\x00\x00gateway.example",
                                psk=b"fuzz-psk-0123456789abcdef"), _Unreachable())  # type: ignore[arg-type]
_ACCEPT = ENGINE.settings.acceptable


def test_one_input(data: bytes) -> None:
    """One fuzz case; the first octet picks the decoder."""
    if not data:
        return
    which, body = data[0] % 8, data[1:]
    try:
        if which == 0:
            parsed = parse_ticket(body)
            assert parsed.header + parsed.sealed == body
        elif which == 1:
            contents = decode_contents(body)
            assert len(contents.ticket_id) == 16
        elif which == 2:
            wire.decode_message(body)
        elif which == 3:
            payloads.decode_resume_request(body)
        elif which == 4:
            payloads.decode_resume_response(body)
        elif which == 6:
            proposals.choose_ike_suite(proposals.decode_sa_body(body), _ACCEPT)
            ecdh.decode_ke_body(body)
        elif which == 7:
            reply = ENGINE.handle(body, ("192.0.2.1", 500))
            assert reply is None or len(reply) >= wire.IKE_HEADER_LEN
        else:
            notify.decode_notify_body(body)
            notify.decode_nonce_payload(body)
    except (InvalidTicket, ValueError):
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
