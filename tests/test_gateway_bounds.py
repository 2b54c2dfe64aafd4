"""What a flood of datagrams leaves in the gateway kit's engine: nothing grows with it.

A long atheris run of fuzz/fuzz_ticket.py (58 million inputs) grew to 952 MB: every datagram
the engine drops was appended to ``Engine.events`` for good (and logged at INFO), so anyone
who can send UDP to a gateway could grow its memory and its log without bound. The events are
now the most recent ``MAX_EVENTS``; a dropped datagram is logged at DEBUG."""

from __future__ import annotations

import logging
import os

import pytest

from authority.gateway import Engine, GatewaySettings
from authority.gateway.engine import MAX_EVENTS


class _NoAuthority:
    def issue(self, *_: object, **__: object) -> object:
        raise AssertionError("a malformed datagram reached the authority")

    redeem = consume = issue


def _engine() -> Engine:
    return Engine(GatewaySettings(local_id=b"\x02\x00\x00\x00gateway.example",
                                  psk=b"bounds-psk-0123456789abcdef"),
                  _NoAuthority())  # type: ignore[arg-type]


def test_events_keep_the_most_recent_and_memory_does_not_follow_the_flood(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine()
    caplog.set_level(logging.INFO, "authority.gateway")
    for n in range(3 * MAX_EVENTS):
        assert engine.handle(os.urandom(8) + n.to_bytes(4, "big"), ("192.0.2.9", 500)) is None
    assert len(engine.events) == MAX_EVENTS
    kind, detail = engine.events[-1]
    assert kind == "dropped" and detail.startswith("from 192.0.2.9:500: IKE header")
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]
    assert engine.sas == {} and not engine.half_open


def test_a_dropped_datagram_is_still_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine()
    caplog.set_level(logging.DEBUG, "authority.gateway")
    engine.handle(b"\x00" * 8, ("192.0.2.9", 500))
    assert [r for r in caplog.records
            if r.levelno == logging.DEBUG and "dropped" in r.getMessage()]
