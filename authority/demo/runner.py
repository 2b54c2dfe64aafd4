"""The resumption demo: an initiator and two gateways speak real IKE_SESSION_RESUME and
IKE_AUTH octets over UDP on 127.0.0.1, with the ticket authority in between.

1. The initiator and gateway A hold an IKE SA (the initial exchange is simulated: both get the
   same SPIs, transforms, IDs and a random SK_d).
2. A seals the SA's state at the authority (IssueTicket) and sends the client
   N(TICKET_LT_OPAQUE).
3. A dies; the client's resume request to it goes unanswered.
4. The client sends HDR(38, new SPIi, SPIr 0), Ni, N(TICKET_OPAQUE) to gateway B, which redeems
   the ticket (consume=false) and answers HDR(new SPIr), Nr.
5. Both derive the resumed SA's keys (RFC 5723 §5.1) from SK_d_old, the nonces and the new SPIs.
6. IKE_AUTH on the resumed SA, SK payload sealed with AES-GCM under SK_ei / SK_er: B verifies the
   client's AUTH, consumes the ticket (ConsumeTicket), answers with its AUTH; the client verifies.
7. The same ticket presented again is refused: B's redeem says REPLAYED, B sends N(TICKET_NACK).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from authority.client import (
    AuthorityUnavailable,
    ClientTls,
    RedeemResult,
    TicketClient,
    TicketClientError,
)
from authority.demo.gateway import Gateway
from authority.demo.initiator import Initiator
from authority.demo.narrator import Narrator
from authority.demo.sa import InitialSa, name, simulate_initial_exchange
from authority.demo.wire import describe_id, short
from authority.ikev2 import PayloadError, SaKeys

DEAD_GATEWAY_WAIT = 0.3


@dataclass
class DemoResult:
    """What happened, for tests and for the exit status. ``lines`` is the printed output."""

    authority_address: str = ""
    embedded_authority: bool = False
    gateway_a: str = ""
    gateway_b: str = ""
    ticket: bytes = b""
    ticket_lifetime: int = 0
    key_id: str = ""
    lt_opaque_payload: bytes = b""
    dead_gateway_answered: bool = False
    resume_request: bytes = b""
    resume_response: bytes = b""
    resume_accepted: bool = False
    redeem_result: RedeemResult | None = None
    initiator_keys: SaKeys | None = None
    responder_keys: SaKeys | None = None
    initiator_auth_verified: bool = False   # gateway B verified the initiator's AUTH
    responder_auth_verified: bool = False   # the initiator verified gateway B's AUTH
    consume_result: RedeemResult | None = None
    replay_result: RedeemResult | None = None  # gateway B's redeem of the replayed ticket
    replay_nacked: bool = False
    failure: str = ""
    error: Exception | None = field(default=None, repr=False)
    lines: list[str] = field(default_factory=list)

    @property
    def keys_match(self) -> bool:
        """Both sides derived the same seven keys."""
        return self.initiator_keys is not None and self.initiator_keys == self.responder_keys

    @property
    def ok(self) -> bool:
        """Everything the demo shows happened as RFC 5723 and the authority promise."""
        return (not self.failure and not self.dead_gateway_answered and self.resume_accepted
                and self.redeem_result is RedeemResult.OK and self.keys_match
                and self.initiator_auth_verified and self.responder_auth_verified
                and self.consume_result is RedeemResult.OK
                and self.replay_result is RedeemResult.REPLAYED and self.replay_nacked)


@contextlib.contextmanager
def embedded_authority(backend: str = "pkcs11") -> Iterator[tuple[str, str]]:
    """A ticket authority in this process: a temporary state directory with its own embedded
    SoftHSM2 token (or swtpm), listening on 127.0.0.1 on a free port, logging WARNING and
    above only (its INFO lines would interleave with the demo's narration). Yields (address,
    description); stops it and deletes the directory on exit.

    Raises ConfigError, StartupError, DeviceUnavailable if it cannot start."""
    from authority.service.server import build_server
    from authority.settings_loader import load_config

    with tempfile.TemporaryDirectory(prefix="ticket-authority-demo-") as tmp:
        config = load_config(state_dir=Path(tmp) / "state", listen="127.0.0.1:0",
                             metrics_listen="", backend=backend, log_level="WARNING")
        running = build_server(config)
        try:
            info = running.authority.backend.describe()
            yield running.address, f"{info.backend}: {info.token}"
        finally:
            running.stop(grace=0.5)


def run_demo(authority_address: str | None = None, out: Callable[[str], None] = print, *,
             tls: ClientTls | None = None, backend: str = "pkcs11", lifetime: int = 3600,
             timeout: float = 3.0) -> DemoResult:
    """Run the demo, printing each step through ``out``; with no ``authority_address`` an
    embedded authority is started (and stopped) for it. ``tls`` is used towards a given
    address; ``timeout`` bounds each authority call and each wait for a datagram.

    Raises ConfigError, StartupError, DeviceUnavailable when the embedded authority cannot start;
    PlaintextRefused for plaintext to a non-loopback address. A failure along the way (the
    authority unreachable, a message that does not verify) is recorded in ``failure`` and the
    result's checks, not raised."""
    narrator = Narrator(out)
    result = DemoResult(lines=narrator.lines)
    with contextlib.ExitStack() as stack:
        if authority_address is None:
            address, description = stack.enter_context(embedded_authority(backend))
            result.embedded_authority = True
            where = f"(embedded, {description})"
        else:
            address, where = authority_address, "(given)"
        result.authority_address = address
        client_a = stack.enter_context(TicketClient(address, tls, timeout=timeout))
        client_b = stack.enter_context(TicketClient(address, tls, timeout=timeout))
        gateway_a = Gateway("A", client_a, narrator)
        stack.callback(gateway_a.stop)
        gateway_b = Gateway("B", client_b, narrator)
        stack.callback(gateway_b.stop)
        sa = simulate_initial_exchange()
        initiator = Initiator(sa, narrator, timeout)
        stack.callback(initiator.close)
        result.gateway_a = f"{gateway_a.address[0]}:{gateway_a.address[1]}"
        result.gateway_b = f"{gateway_b.address[0]}:{gateway_b.address[1]}"
        narrator.emit("IKEv2 session resumption (RFC 5723) through the ticket authority")
        narrator.say("authority", f"{address} {where}")
        narrator.say("gateway A", f"udp {result.gateway_a}")
        narrator.say("gateway B", f"udp {result.gateway_b}")
        narrator.say("initiator", f"udp {initiator.address[0]}:{initiator.address[1]}")
        gateway_a.start()
        gateway_b.start()
        try:
            _story(narrator, result, sa, initiator, gateway_a, gateway_b, lifetime)
        except (TicketClientError, PayloadError, ValueError) as exc:
            result.failure = f"{type(exc).__name__}: {exc}"
            result.error = exc
            narrator.emit(f"stopped: {result.failure}")
        _summary(narrator, result)
    return result


def _story(narrator: Narrator, result: DemoResult, sa: InitialSa, initiator: Initiator,
           gateway_a: Gateway, gateway_b: Gateway, lifetime: int) -> None:
    """Steps 1 to 7 (see the module docstring); fills ``result``.

    Raises TicketClientError (the authority), PayloadError / ValueError (bad messages)."""
    say, more = narrator.say, narrator.more
    narrator.step("Initial exchange, initiator <-> gateway A (simulated: IKE_SA_INIT and "
                  "IKE_AUTH are not sent)")
    say("initiator, gateway A", f"IKE SA SPIi {sa.spi_i.hex()}, SPIr {sa.spi_r.hex()}")
    more(f"{name('encr', sa.encr_id)}/{sa.encr_key_bits}, {name('prf', sa.prf_id)}, "
         f"integrity {name('integ', sa.integ_id)}, DH {name('dh', sa.dh_group)}")
    more(f"authenticated by {name('auth', sa.auth_method)}")
    more(f"IDi {describe_id(sa.id_i)}")
    more(f"IDr {describe_id(sa.id_r)}: every gateway of the cluster answers as it")
    more(f"SK_d {short(sa.sk_d, size=True)}, random, the PRF's key length")
    say("initiator", "asked for a ticket with N(TICKET_REQUEST) in its IKE_AUTH request")

    narrator.step("Gateway A gets a ticket from the authority and hands it to the client")
    issued = gateway_a.issue_ticket(sa, initiator.address, lifetime)
    result.ticket, result.ticket_lifetime = issued.ticket, issued.lifetime
    result.key_id, result.lt_opaque_payload = issued.key_id, issued.notify_payload()
    ticket = initiator.receive_ticket()
    if ticket.ticket != issued.ticket or ticket.lifetime != issued.lifetime:
        raise PayloadError("the ticket the client decoded is not the one A was issued")

    narrator.step("Gateway A dies")
    gateway_a.stop()
    say("gateway A", "stopped: socket closed, its copy of the SA is gone")
    attempt = initiator.new_attempt()
    initiator.send(attempt, gateway_a.address, "gateway A", wait=DEAD_GATEWAY_WAIT)
    result.dead_gateway_answered = attempt.response is not None
    say("initiator", f"no answer from gateway A within {DEAD_GATEWAY_WAIT} s: "
                     f"tries gateway B with the same request"
        if attempt.response is None else "gateway A answered although it is dead?!")

    narrator.step("Resumption on gateway B: IKE_SESSION_RESUME over UDP, ticket redeemed at "
                  "the authority")
    initiator.send(attempt, gateway_b.address, "gateway B")
    result.resume_request = attempt.request
    result.resume_response = attempt.response or b""
    result.redeem_result = gateway_b.log.redeems[0] if gateway_b.log.redeems else None
    decoded = attempt.decoded
    if decoded is None or not decoded.accepted:
        raise PayloadError("gateway B did not resume the session")
    result.resume_accepted = True
    say("initiator", f"accepted: SPIr {decoded.spi_r.hex()}, "
                     f"Nr {short(decoded.nonce or b'')}")

    narrator.step("Both sides derive the resumed SA's keys (RFC 5723 section 5.1)")
    more('SKEYSEED = prf(SK_d_old, "Resumption" | Ni | Nr)')
    more("{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}")
    more("    = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)")
    result.initiator_keys = initiator.derive(attempt)
    resumed = gateway_b.sessions.get((attempt.spi_i, decoded.spi_r))
    result.responder_keys = resumed.keys if resumed is not None else None
    say("check", "the seven keys are equal on both sides" if result.keys_match
        else "the keys DIFFER")

    narrator.step("IKE_AUTH on the resumed SA (real SK payload: AES-GCM-16 with SK_ei / SK_er, "
                  "RFC 5282)")
    outcome = initiator.authenticate(attempt, result.initiator_keys, gateway_b.address,
                                     "gateway B")
    result.initiator_auth_verified = bool(gateway_b.log.auth_checks and
                                          gateway_b.log.auth_checks[0])
    result.responder_auth_verified = outcome.responder_verified
    result.consume_result = gateway_b.log.consumes[0] if gateway_b.log.consumes else None

    narrator.step("Replay: the same ticket presented to gateway B again")
    replay = initiator.new_attempt()
    initiator.send(replay, gateway_b.address, "gateway B")
    result.replay_result = gateway_b.log.redeems[1] if len(gateway_b.log.redeems) > 1 else None
    result.replay_nacked = replay.decoded is not None and replay.decoded.nacked
    say("initiator", "N(TICKET_NACK): the ticket is spent; a full IKE_SA_INIT would follow"
        if result.replay_nacked else "the replay was NOT refused")


def _summary(narrator: Narrator, result: DemoResult) -> None:
    checks = [
        ("gateway A silent after it died", not result.dead_gateway_answered),
        ("ticket redeemed by gateway B", result.redeem_result is RedeemResult.OK),
        ("same keys on both sides", result.keys_match),
        ("initiator's AUTH verified by gateway B", result.initiator_auth_verified),
        ("gateway B's AUTH verified by the initiator", result.responder_auth_verified),
        ("ticket consumed", result.consume_result is RedeemResult.OK),
        ("replay refused: REPLAYED, N(TICKET_NACK)",
         result.replay_result is RedeemResult.REPLAYED and result.replay_nacked),
    ]
    narrator.emit("Result: " + ("OK" if result.ok else "FAILED"))
    for label, passed in checks:
        narrator.say("yes" if passed else "NO", label)


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (for ``ticket-authority demo``). Never raises."""
    parser.add_argument("--authority", metavar="HOST:PORT",
                        help="use this running authority (default: start an embedded one)")
    parser.add_argument("--backend", choices=["pkcs11", "tpm"], default="pkcs11",
                        help="device of the embedded authority (default pkcs11: SoftHSM2)")
    parser.add_argument("--lifetime", type=int, default=3600, metavar="SECONDS",
                        help="ticket lifetime to ask for (default 3600)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="deadline of each authority call and UDP wait (default 3)")
    tls = parser.add_argument_group("TLS to --authority")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA certificates")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mTLS)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="client key (mTLS)")
    tls.add_argument("--tls-server-name", metavar="NAME", help="expected server name")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the demo from parsed options: 0 if every check passed, 1 if one failed, 2 if the
    embedded authority could not start or an option is wrong, 3 if the authority could not be
    reached. Never raises for those cases."""
    from authority.errors import ConfigError, DeviceUnavailable, StartupError

    tls = None
    if any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)):
        tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    try:
        result = run_demo(args.authority, tls=tls, backend=args.backend,
                          lifetime=args.lifetime, timeout=args.timeout)
    except (ConfigError, StartupError, DeviceUnavailable, ValueError, OSError,
            ImportError) as exc:
        print(f"ticket-authority demo: {exc}", file=sys.stderr)
        return 2
    if isinstance(result.error, AuthorityUnavailable):
        return 3
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m authority.demo [options]``; the exit status of ``run_command``."""
    parser = configure_parser(argparse.ArgumentParser(
        prog="ticket-authority demo",
        description="Resume an IKEv2 SA on a second gateway through the ticket authority: real "
                    "IKE_SESSION_RESUME and IKE_AUTH messages over UDP on 127.0.0.1."))
    return run_command(parser.parse_args(argv))


__all__ = ["DemoResult", "configure_parser", "embedded_authority", "main",
           "run_command", "run_demo"]
