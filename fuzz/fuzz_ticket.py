"""Atheris harness: the ticket parser and the IKEv2 payload decoders on arbitrary octets.

Every input must end in a value or in the documented rejection (InvalidTicket for tickets,
PayloadError / UnknownTransformError, both ValueError, for IKEv2); anything else is a crash.

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
    from authority.ikev2 import notify, payloads, wire
    from authority.ticket_format import decode_contents, parse_ticket


def test_one_input(data: bytes) -> None:
    """One fuzz case; the first octet picks the decoder."""
    if not data:
        return
    which, body = data[0] % 6, data[1:]
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
