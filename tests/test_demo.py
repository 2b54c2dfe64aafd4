"""The resumption demo, run in-process: real UDP on loopback, a real authority (embedded, or the
conftest Harness's), real IKE_SESSION_RESUME / IKE_AUTH octets."""

from __future__ import annotations

import socket

import pytest

from authority.client import RedeemResult, TicketClient
from authority.demo import DemoResult, main, run_demo
from authority.demo.gateway import Gateway
from authority.demo.initiator import Initiator
from authority.demo.narrator import Narrator
from authority.demo.sa import simulate_initial_exchange
from authority.demo.wire import decrypt_message, encrypt_message, random_spi
from authority.ikev2 import (
    PayloadError,
    TicketLtOpaque,
    decode_resume_request,
    decode_resume_response,
    ticket_from_notify,
)
from authority.ikev2.notify import decode_notify_payload
from authority.ikev2.wire import (
    FLAG_INITIATOR,
    IKE_AUTH,
    PAYLOAD_IDI,
    ZERO_SPI,
    RawPayload,
    decode_ike_header,
)
from tests.conftest import Harness

STEPS = ["[1] Initial exchange", "[2] Gateway A gets a ticket", "[3] Gateway A dies",
         "[4] Resumption on gateway B", "[5] Both sides derive", "[6] IKE_AUTH on the resumed SA",
         "[7] Replay"]


def _check_success(result: DemoResult, lines: list[str]) -> None:
    assert result.ok, "\n".join(lines)
    assert result.keys_match
    assert result.initiator_keys is not None and result.initiator_keys == result.responder_keys
    assert result.initiator_auth_verified and result.responder_auth_verified
    assert result.redeem_result is RedeemResult.OK
    assert result.consume_result is RedeemResult.OK
    assert result.replay_result is RedeemResult.REPLAYED and result.replay_nacked
    assert not result.dead_gateway_answered and not result.failure

    # what went over the wire decodes with the gateway kit
    _, notify = decode_notify_payload(result.lt_opaque_payload)
    assert ticket_from_notify(notify) == TicketLtOpaque(result.ticket_lifetime, result.ticket)
    request = decode_resume_request(result.resume_request)
    assert request.ticket == result.ticket
    header = decode_ike_header(result.resume_request[:28])
    assert (header.exchange_type, header.spi_r, header.message_id) == (38, ZERO_SPI, 0)
    response = decode_resume_response(result.resume_response)
    assert response.accepted and response.spi_i == request.spi_i

    # the printed story
    assert lines == result.lines
    text = "\n".join(lines)
    positions = [text.index(step) for step in STEPS]
    assert positions == sorted(positions)
    for expected in ("IKE_SESSION_RESUME request", "N(TICKET_LT_OPAQUE) payload",
                     "RedeemTicket(consume=false): OK", "ConsumeTicket", ": OK",
                     "RedeemTicket(consume=false): REPLAYED", "N(TICKET_NACK)",
                     "the seven keys are equal on both sides", "Result: OK",
                     "simulated", "AES-GCM-16"):
        assert expected in text, expected
    assert text.count(" verified") >= 2
    assert "NO " not in text and "FAILED" not in text
    keys = result.initiator_keys
    for secret in (keys.sk_d, keys.sk_pi, keys.sk_pr, keys.sk_ei, keys.sk_er):
        assert secret.hex() not in text  # keys are only ever shown shortened
    assert result.ticket.hex() not in text


def test_demo_with_its_own_authority() -> None:
    lines: list[str] = []
    result = run_demo(None, out=lines.append)
    assert result.embedded_authority
    assert result.authority_address.startswith("127.0.0.1:")
    _check_success(result, lines)


def test_demo_against_a_running_authority(pkcs11_harness: Harness) -> None:
    assert pkcs11_harness.running is not None
    lines: list[str] = []
    result = run_demo(pkcs11_harness.running.address, out=lines.append, lifetime=600)
    _check_success(result, lines)
    assert not result.embedded_authority
    assert result.ticket_lifetime == 600
    assert result.key_id == pkcs11_harness.authority.ring.primary_id.hex()
    authority = pkcs11_harness.authority
    assert authority.store.consumed_count(authority.clock.now()) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_demo_reports_an_unreachable_authority(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{_free_port()}"
    lines: list[str] = []
    result = run_demo(address, out=lines.append, timeout=0.3)
    assert not result.ok
    assert result.failure.startswith("AuthorityUnavailable")
    assert "Result: FAILED" in lines
    assert main(["--authority", address, "--timeout", "0.3"]) == 3
    assert "NO " in capsys.readouterr().out


def test_main_runs_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "Result: OK" in out and "[7] Replay" in out


def test_main_refuses_plaintext_beyond_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--authority", "192.0.2.10:50051"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_a_forged_ticket_is_nacked(pkcs11_harness: Harness) -> None:
    assert pkcs11_harness.running is not None
    lines: list[str] = []
    narrator = Narrator(lines.append)
    with TicketClient(pkcs11_harness.running.address) as client:
        gateway = Gateway("B", client, narrator)
        initiator = Initiator(simulate_initial_exchange(), narrator, timeout=3.0)
        gateway.start()
        try:
            genuine = client.issue(initiator.sa).ticket
            forged = genuine[:-1] + bytes([genuine[-1] ^ 1])
            initiator.ticket = TicketLtOpaque(60, forged)
            attempt = initiator.send(initiator.new_attempt(), gateway.address, "gateway B")
        finally:
            gateway.stop()
            initiator.close()
    assert attempt.decoded is not None and attempt.decoded.nacked
    assert attempt.decoded.spi_r == ZERO_SPI and attempt.decoded.nonce is None
    assert gateway.log.redeems == [RedeemResult.INVALID] and gateway.log.nacks_sent == 1
    assert not gateway.sessions
    assert any("RedeemTicket(consume=false): INVALID" in line for line in lines)


def test_sk_payload_round_trip_and_tamper() -> None:
    key = bytes(range(36))
    spi_i, spi_r = random_spi(), random_spi()
    inner = [RawPayload(PAYLOAD_IDI, False, b"\x02\x00\x00\x00gw.example")]
    message = encrypt_message(spi_i, spi_r, IKE_AUTH, FLAG_INITIATOR, 1, inner, key)
    header, payloads = decrypt_message(message, key)
    assert (header.spi_i, header.spi_r, header.exchange_type, header.message_id) == \
        (spi_i, spi_r, IKE_AUTH, 1)
    assert payloads == inner
    with pytest.raises(PayloadError, match="integrity"):
        decrypt_message(message[:-1] + bytes([message[-1] ^ 1]), key)
    with pytest.raises(PayloadError, match="integrity"):
        decrypt_message(message, bytes(36))
    tampered_header = message[:20] + bytes([message[20] ^ 1]) + message[21:]  # message id
    with pytest.raises(PayloadError):
        decrypt_message(tampered_header, key)
