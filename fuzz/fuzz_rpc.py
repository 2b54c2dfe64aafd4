"""Atheris harness: the RPC handlers' input side, without a device.

Arbitrary octets are decoded as each request message (as grpc does before a handler runs), then
go through what the handlers do before the device is called: the state conversion and
validation, batch limits and key-id parsing. Allowed outcomes: a value, protobuf's DecodeError
(the service answers INVALID_ARGUMENT, authority/service/interceptors.py) or an AuthorityError
whose status is INVALID_ARGUMENT. Anything else would be UNKNOWN on the wire: a crash here.
The device side is fuzzed over real gRPC by tests/test_fuzz_rpc.py (hypothesis).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
    from authority.errors import AuthorityError
    from authority.service import convert
    from authority.state import validate_state

MAX_BATCH = 1000


def _issue(request: authority_pb2.IssueTicketRequest, field: str = "state") -> None:
    validate_state(convert.state_from_proto(request, field), field)


def test_one_input(data: bytes) -> None:
    """One fuzz case; the first octet picks the message."""
    if not data:
        return
    which, body = data[0] % 4, data[1:]
    try:
        if which == 0:
            _issue(authority_pb2.IssueTicketRequest.FromString(body))
        elif which == 1:
            batch = authority_pb2.IssueTicketsRequest.FromString(body)
            convert.check_batch(len(batch.items), MAX_BATCH)
            for index, item in enumerate(batch.items):
                try:
                    _issue(item, f"items[{index}].state")
                except AuthorityError as exc:   # fails its own item only
                    assert exc.status == "INVALID_ARGUMENT", exc
                    assert exc.message.startswith(f"items[{index}].state"), exc.message
        elif which == 2:
            batch_r = authority_pb2.RedeemTicketsRequest.FromString(body)
            convert.check_batch(len(batch_r.items), MAX_BATCH)
        else:
            convert.key_id_from_text(admin_pb2.RetireKeyRequest.FromString(body).key_id)
    except DecodeError:
        pass
    except AuthorityError as exc:
        assert exc.status == "INVALID_ARGUMENT", exc


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
