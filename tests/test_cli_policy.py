"""``tickets revoke|revocations`` and ``policy bump|list`` against a real server (SoftHSM2 token,
real gRPC): each selector revokes what it names, the tables and --json show it, and bad flag
values exit 2 naming the flag before anything is sent."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2
from authority.cli import build_parser, main
from tests.conftest import START, Harness, redeem, sample_state

OK = authority_pb2.REDEEM_RESULT_OK
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
State = authority_pb2.ResumptionState
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(pkcs11_harness: Harness, capsys: pytest.CaptureFixture[str]) -> Run:
    """``main([*args, --listen server])``: (exit status, stdout, stderr)."""
    assert pkcs11_harness.running is not None
    address = pkcs11_harness.running.address

    def call(*args: str) -> tuple[int, str, str]:
        status = main([*args, "--listen", address])
        out = capsys.readouterr()
        return status, out.out, out.err

    return call


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def issue_in(h: Harness, state: State, realm: str = "") -> bytes:
    return bytes(h.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
        state=state, lifetime_seconds=3600, realm=realm)).ticket)


def redeem_in(h: Harness, ticket: bytes, realm: str) -> int:
    return int(h.tickets.RedeemTicket(
        authority_pb2.RedeemTicketRequest(ticket=ticket, realm=realm)).result)


# Selector flags as a function of the tickets' states and redeem handles, and the tickets each
# must cover (0 and 1 share id_i; 2 has its own and is issued 20 s later).
SELECTORS: dict[str, tuple[Callable[[list[State], list[bytes]], list[str]], set[int]]] = {
    "id_i": (lambda s, _: ["--id-i", s[0].id_i.hex()], {0, 1}),
    "old_sa": (lambda s, _: ["--old-sa", f"{s[2].spi_i.hex()}:{s[2].spi_r.hex()}"], {2}),
    "ticket_id": (lambda _, handles: ["--ticket-id", handles[1][:16].hex()], {1}),
    "ticket_handle": (lambda _, handles: ["--ticket-id", "0x" + handles[2].hex()], {2}),
    "issued_before": (lambda _s, _h: ["--issued-before", iso(START + 10)], {0, 1}),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_revoke_by_each_selector(pkcs11_harness: Harness, run: Run, name: str) -> None:
    h = pkcs11_harness
    states = [sample_state(1), sample_state(2, id_i=sample_state(1).id_i), sample_state(3)]
    tickets = []
    for n, state in enumerate(states):
        if n == 2:
            h.clock.advance(20)
        tickets.append(issue_in(h, state))
    handles = [bytes(redeem(h.tickets, t).ticket_id) for t in tickets]
    flags, covered = SELECTORS[name]
    status, out, err = run("tickets", "revoke", *flags(states, handles), "--reason", f"cli {name}")
    assert status == 0, err
    listed = h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
    assert len(listed) == 1
    assert out.splitlines() == [f"revocation  {listed[0].revocation_id}",
                                f"expires     {when(listed[0].expires_at.seconds)}"]
    assert listed[0].reason == f"cli {name}"
    assert [redeem(h.tickets, t).result for t in tickets] == [
        REVOKED if i in covered else OK for i in range(3)]


def test_revocations_table_and_json(pkcs11_harness: Harness, run: Run) -> None:
    h = pkcs11_harness
    status, out, _ = run("tickets", "revocations")
    lines = out.strip().splitlines()
    assert status == 0 and len(lines) == 2  # header and rule only
    assert lines[0].split() == ["ID", "KIND", "VALUE", "ISSUED", "BEFORE", "CREATED", "EXPIRES",
                                "REASON"]
    long_id = b"\x02\x00\x00\x00" + b"a-rather-long-name.vpn.example.net"
    state = sample_state(4)
    h.clock.advance(5)
    assert run("tickets", "revoke", "--id-i", long_id.hex(), "--reason", "lost\nlaptop")[0] == 0
    assert run("tickets", "revoke", "--old-sa",
               f"{state.spi_i.hex()}:{state.spi_r.hex()}")[0] == 0
    assert run("tickets", "revoke", "--issued-before", iso(START + 2))[0] == 0

    status, out, _ = run("tickets", "revocations")
    assert status == 0
    rows = [re.split(r"  +", line) for line in out.strip().splitlines()[2:]]
    assert [r[:3] for r in rows] == [
        ["1", "id_i", long_id.hex()[:37] + "..."],
        ["2", "old_sa", f"{state.spi_i.hex()}:{state.spi_r.hex()}"],
        ["3", "issued_before", "-"]]
    assert rows[0][6] == "lost laptop" and len(rows[1]) == 6  # no reason
    stored = h.admin.ListRevocations(admin_pb2.ListRevocationsRequest()).revocations
    assert [r[3:6] for r in rows] == [
        [when(r.issued_before.seconds), when(r.created_at.seconds), when(r.expires_at.seconds)]
        for r in stored]
    assert rows[2][3] == when(START + 2)

    status, out, _ = run("tickets", "revocations", "--json")
    assert status == 0
    listed = json.loads(out)["revocations"]
    assert [(r["revocation_id"], r["kind"]) for r in listed] == [
        ("1", "id_i"), ("2", "old_sa"), ("3", "issued_before")]
    assert listed[0]["reason"] == "lost\nlaptop"
    status, out, _ = run("tickets", "revoke", "--ticket-id", "00" * 16, "--json")
    assert status == 0 and json.loads(out)["revocation_id"] == "4"


def test_policy_bump_revokes_the_realm_and_list_shows_epochs(pkcs11_harness: Harness,
                                                             run: Run) -> None:
    h = pkcs11_harness
    status, out, _ = run("policy", "list")
    assert status == 0 and out.split() == ["REALM", "EPOCH", "-----", "-----"]
    blue, red, default = (issue_in(h, sample_state(n), realm)
                          for n, realm in enumerate(("blue", "red", "")))

    status, out, err = run("policy", "bump", "blue")
    assert status == 0, err
    assert out.split() == ["realm", "blue", "policy", "epoch", "1"]
    assert [redeem_in(h, blue, "blue"), redeem_in(h, red, "red"), redeem_in(h, default, "")] == [
        REVOKED, OK, OK]
    fresh = issue_in(h, sample_state(5), "blue")
    assert redeem_in(h, fresh, "blue") == OK

    status, out, _ = run("policy", "bump", "")
    assert status == 0 and out.split() == ["realm", "(default)", "policy", "epoch", "1"]
    assert redeem_in(h, default, "") == REVOKED
    assert run("policy", "bump", "blue")[0] == 0
    assert redeem_in(h, fresh, "blue") == REVOKED

    status, out, _ = run("policy", "list")
    assert status == 0
    assert [line.split() for line in out.strip().splitlines()[2:]] == [
        ["(default)", "1"], ["blue", "2"]]
    status, out, _ = run("policy", "list", "--json")
    assert status == 0 and json.loads(out) == {"realms": [   # zero values are printed too
        {"realm": "", "policy_epoch": "1"}, {"realm": "blue", "policy_epoch": "2"}]}


@pytest.mark.parametrize(("args", "flag"), [
    (["--id-i", "zz"], "--id-i"),
    (["--id-i", "0200000"], "--id-i"),
    (["--id-i", ""], "--id-i"),
    (["--ticket-id", "00112233445566778899aabbccddeefg"], "--ticket-id"),
    (["--old-sa", "0011223344556677"], "--old-sa"),
    (["--old-sa", "0011223344556677:00112233"], "--old-sa"),
    (["--old-sa", "00112233445566zz:0011223344556677"], "--old-sa"),
    (["--issued-before", "yesterday"], "--issued-before"),
    (["--issued-before", "2026-13-01T00:00:00Z"], "--issued-before"),
])
def test_bad_flag_values_exit_2_naming_the_flag(capsys: pytest.CaptureFixture[str],
                                                args: list[str], flag: str) -> None:
    # nothing listens on port 1: exit 2 rather than 1 shows the flag is refused before connecting
    status = main(["tickets", "revoke", *args, "--listen", "127.0.0.1:1", "--timeout", "1"])
    out = capsys.readouterr()
    assert (status, out.out) == (2, "")
    assert out.err.startswith(f"ticket-authority: {flag}: ")


@pytest.mark.parametrize("args", [
    [],
    ["--reason", "no selector"],
    ["--id-i", "02000000", "--ticket-id", "00" * 16],
])
def test_exactly_one_selector(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["tickets", "revoke", *args, "--listen", "127.0.0.1:1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--id-i" in err and ("required" in err or "not allowed with" in err)


def test_refusals_of_the_server_exit_1(run: Run) -> None:
    status, _, err = run("tickets", "revoke", "--ticket-id", "00" * 15)
    assert status == 1 and "INVALID_ARGUMENT: ticket_id:" in err
    status, _, err = run("tickets", "revoke", "--issued-before", iso(START + 3600))
    assert status == 1 and "INVALID_ARGUMENT: issued_before:" in err
    status, _, err = run("policy", "bump", "r" * 65)
    assert status == 1 and "INVALID_ARGUMENT: realm" in err


@pytest.mark.parametrize("command", [["tickets", "revoke", "--id-i", "02000000"],
                                     ["tickets", "revocations"], ["policy", "bump", "blue"],
                                     ["policy", "list"]])
def test_new_commands_take_the_admin_client_flags(command: list[str]) -> None:
    args = build_parser().parse_args([
        *command, "--state-dir", "s", "--config", "c.toml", "--json", "--timeout", "3",
        "--tls-ca", "ca.pem", "--tls-cert", "a.pem", "--tls-key", "a.key",
        "--tls-server-name", "localhost"])
    assert args.json and args.timeout == 3.0 and str(args.tls_key) == "a.key"
    assert args.tls_server_name == "localhost" and str(args.state_dir) == "s"
