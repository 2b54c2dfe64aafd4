"""Scenario 3, kill -9 inside a rotation: one server (embedded SoftHSM2 token, SQLite) under
bounded load is killed again and again at a point of a key's life, then restarted, and what the
restart finds is checked against the device.

Each kill at a **crash point** (authority/crashpoints.py, the test seam
``TICKET_AUTHORITY_CRASH_AT``; the points cycled in their order): the server is restarted with
the point armed, RotateKey (RetireKey of the oldest DECRYPT_ONLY key for
``destroy.after_device``) makes it SIGKILL itself there, and the call must fail. Each **random
kill**: RotateKey or RetireKey is sent and the server killed from outside 0-20 ms later (the
call takes about 10 ms). After every kill the server is restarted WITHOUT a crash point and:

* every ACTIVE, PENDING and DECRYPT_ONLY key of the ring is in the device (listed by a process
  of its own: SoftHSM2 reads its token once per process), and exactly one key seals;
* every key the device holds is in the ring: one that opens tickets, or CREATING (a rotation
  killed after making its key, before publishing it). "No orphan" is checked in two steps: here
  such a key must be recorded CREATING (the ring gives it up only ``CREATING_GRACE``, 10
  minutes, after its creation: no setting shortens it), and at the end the ring's own
  maintenance pass is run with a clock past that grace (:func:`sweep_later`, the server
  stopped): the device then holds exactly the keys that open tickets, no CREATING record left;
* every ticket issued before (but those under a key retired since) redeems OK, a new ticket
  round-trips, and a retirement the kill interrupted completes when the call is repeated (the
  key DESTROYED, its tickets no longer OK);
* at the end, the audit chain verifies (``ticket-authority audit verify``: no line torn by a
  kill).

Each kill at a crash point is also checked to have left what its point implies (the ring and
the device read before the restart): a new CREATING record whose key the device lacks
(``rotate.before_create``) or holds (``rotate.after_create``), a new key that opens tickets
(``rotate.after_record``), the retired key gone from the device while still DECRYPT_ONLY in the
ring (``destroy.after_device``; the restart then finds it MISSING).

Load throughout: 0 wrong answers, 0 acknowledged consumes lost (load.py; consumes under a key
retired since are not asked again: they answer INVALID). Every stop here is a kill -9 (each
armed restart follows one too): graceful stops under load are the rolling-restart scenario's.
Figures: restart times (RECOVERY: the slowest), kills by
point and by where a random kill landed, CREATING keys in the device before the sweep.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from authority._proto.ticketauthority.v1 import admin_pb2, authority_pb2, authority_pb2_grpc
from authority.bench.serveproc import ServeProcess, token_key_ids
from authority.chaos.core import Outcome
from authority.chaos.load import Load, Tally, lost_consumes
from authority.chaos.servers import round_trip, single
from authority.crashpoints import (
    DESTROY_AFTER_DEVICE,
    POINTS,
    ROTATE_AFTER_CREATE,
    ROTATE_BEFORE_CREATE,
    VARIABLE,
)
from authority.keys import KeyState
from authority.ticket_format import parse_ticket

NAME = "rotation-kill"
#: kills at the crash points (cycled) and at random times: (quick, full)
POINT_KILLS = {True: 8, False: 40}
RANDOM_KILLS = {True: 2, False: 10}
OPENING = {KeyState.ACTIVE, KeyState.PENDING, KeyState.DECRYPT_ONLY}
CALL = 10.0
#: a retired key's tickets: refused (never OK) once the retirement completed
REFUSED = {authority_pb2.REDEEM_RESULT_INVALID}


@dataclass
class Run:
    """What the kills found: each expectation with how often it failed and its first failure;
    the tickets to redeem after each restart, by key id; figures."""

    out: Outcome
    tickets: dict[bytes, list[bytes]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    checked: Counter[str] = field(default_factory=Counter)
    restarts: list[float] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    creating_in_device: int = 0
    retired: set[bytes] = field(default_factory=set)
    issued: int = 0

    def note(self, what: str, ok: bool, detail: str = "") -> bool:
        """One expectation of one kill (reported once per kind, with the count of failures)."""
        self.failures.setdefault(what, [])
        self.checked[what] += 1
        if not ok:
            self.failures[what].append(detail)
        return ok

    def conclude(self) -> None:
        for what, failed in self.failures.items():
            self.out.check(f"{what} ({len(failed)} of {self.checked[what]} failed)",
                           not failed)
            if failed and not self.out.detail:
                self.out.detail = f"{what}: {failed[0]}"


class Channels:
    """The load's stubs: one channel per address the server listened on, kept open until
    :meth:`close` (ServeProcess closes its own channel when it kills or restarts the server,
    which would cancel the load's call in flight: CANCELLED, a wrong answer)."""

    def __init__(self, server: ServeProcess) -> None:
        self._server = server
        self._open: dict[str, grpc.Channel] = {}

    def tickets(self) -> authority_pb2_grpc.TicketAuthorityStub:
        address = self._server.address
        if address not in self._open:
            self._open[address] = grpc.insecure_channel(address)
        return authority_pb2_grpc.TicketAuthorityStub(self._open[address])

    def close(self) -> None:
        for channel in self._open.values():
            channel.close()


def run(work: Path, quick: bool) -> Outcome:
    """Raises: AssertionError (a server did not start), grpc.RpcError (it never answered)."""
    out = Outcome(NAME, "kill -9 inside a rotation or retirement, restart")
    server = single(work)
    channels = Channels(server)
    rng = random.Random(16)   # noqa: S311 -- kill times, not secrets
    state = Run(out)
    try:
        _issue(server, state, 10)
        with Load([channels.tickets], max_calls=10**6, max_seconds=900,
                  pause=0.002) as load:
            for i in range(POINT_KILLS[quick]):
                _point_kill(server, POINTS[i % len(POINTS)], state)
            for i in range(RANDOM_KILLS[quick]):
                _random_kill(server, rng, state, retire=i % 2 == 1)
        tally = load.tally
        out.calls, out.wrong = tally.calls, len(tally.wrong)
        out.lost = lost_consumes(_opening(tally, state.retired), server.tickets)
        if tally.wrong:
            out.detail = "; ".join(tally.wrong[:3])
        _final_sweep(server, state)
        state.conclude()
        restarts = sorted(state.restarts)
        out.figures.update({
            "kills": sum(state.kills.values()), **{f"kills_{k}": v for k, v in state.kills.items()},
            "restart_median_s": round(restarts[len(restarts) // 2], 2),
            "restart_max_s": round(restarts[-1], 2),
            "creating_keys_in_device_before_sweep": state.creating_in_device,
            "tickets_checked": state.issued, "failing_calls": tally.failing})
        out.recovery_s = restarts[-1]   # the slowest restart: start to answering
    finally:
        server.kill()
        channels.close()
    return out


# -- one kill --------------------------------------------------------------------------------------

def _point_kill(server: ServeProcess, point: str, state: Run) -> None:
    """Restart the server armed at ``point``, make it reach it, restart it unarmed, check."""
    target = _retirable(server, state) if point == DESTROY_AFTER_DEVICE else None
    server.kill()   # not a graceful stop under load: see the module's docstring
    server.env = {VARIABLE: point}
    try:
        server.serve()
    finally:
        server.env = {}
    before = _ring(server.state)
    answered = _call(server, target)
    died = _wait_exit(server, 15.0)
    state.note("the armed server died at its crash point (SIGKILL), the call unanswered",
               died == -signal.SIGKILL and not answered,
               f"{point}: exit {died}, answered {answered}")
    server.kill()
    left = _left(point, before, _ring(server.state), device_keys(server.state), target)
    state.note("the kill left what its point implies (ring and device read before restart)",
               left == "", f"{point}: {left}")
    state.kills[point] += 1
    _after_restart(server, state, target)


def _left(point: str, before: dict[bytes, KeyState], after: dict[bytes, KeyState],
          device: set[bytes], target: bytes | None) -> str:
    """What is wrong with the state a kill at ``point`` left ("" if nothing): a new CREATING
    record whose key the device lacks (before_create) or holds (after_create), a new key that
    opens tickets (after_record), the retired key gone from the device, its record not yet
    DESTROYED (destroy.after_device)."""
    new = {k: s for k, s in after.items() if k not in before}
    if target is not None:
        ok = after.get(target) == KeyState.DECRYPT_ONLY and target not in device
        return "" if ok else f"retired key {after.get(target)}, in device {target in device}"
    if len(new) != 1:
        return f"{len(new)} new key records"
    (key_id, made), = new.items()
    expected = {ROTATE_BEFORE_CREATE: (made == KeyState.CREATING, False),
                ROTATE_AFTER_CREATE: (made == KeyState.CREATING, True)}.get(
                    point, (made in OPENING, True))
    ok = expected[0] and (key_id in device) == expected[1]
    return "" if ok else f"new key {made.name}, in device {key_id in device}"


def _random_kill(server: ServeProcess, rng: random.Random, state: Run, retire: bool) -> None:
    """RotateKey (or RetireKey) sent, the server SIGKILLed 0-20 ms later; restart, check."""
    target = _retirable(server, state) if retire else None
    before = _ring(server.state)
    if target is None:
        server.admin.RotateKey.future(admin_pb2.RotateKeyRequest(), timeout=CALL)
    else:
        server.admin.RetireKey.future(admin_pb2.RetireKeyRequest(key_id=target.hex()),
                                      timeout=CALL)
    time.sleep(rng.uniform(0.0, 0.02))
    server.kill()
    state.kills[f"random_{_what_happened(before, _ring(server.state), target)}"] += 1
    _after_restart(server, state, target)


def _what_happened(before: dict[bytes, KeyState], after: dict[bytes, KeyState],
                   target: bytes | None) -> str:
    """Where a random kill landed, from the ring before and after it."""
    if target is not None:
        return {KeyState.DESTROYED: "retired", KeyState.DECRYPT_ONLY: "retire_not_done"}.get(
            after.get(target, KeyState.DESTROYED), "retire_other")
    new = {k: s for k, s in after.items() if k not in before}
    if not new:
        return "rotation_not_started"
    return "rotation_committed" if any(s in OPENING for s in new.values()) \
        else "rotation_creating"


def _call(server: ServeProcess, target: bytes | None) -> bool:
    """RotateKey, or RetireKey of ``target``: whether it answered."""
    try:
        if target is None:
            server.admin.RotateKey(admin_pb2.RotateKeyRequest(), timeout=CALL)
        else:
            server.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=target.hex()),
                                   timeout=CALL)
    except grpc.RpcError:
        return False
    return True


def _wait_exit(server: ServeProcess, timeout: float) -> int | None:
    """The server's exit status once it exited, None if still running after ``timeout``."""
    assert server.proc is not None
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# -- after a restart -------------------------------------------------------------------------------

def _after_restart(server: ServeProcess, state: Run, retired: bytes | None) -> None:
    """Restart without a crash point and check the ring against the device, the tickets; a
    retirement interrupted is repeated (as its caller would) and must complete."""
    started = time.monotonic()
    server.serve()
    state.restarts.append(time.monotonic() - started)
    _agree(server, state)
    if retired is not None:
        _retire_again(server, state, retired)
    state.note("a new ticket round-trips after the restart", round_trip(server))
    bad = _not_ok(server, [t for ts in state.tickets.values() for t in ts])
    state.note("every ticket issued before the kill redeems OK", not bad,
               f"{len(bad)} did not: {bad[:3]}")
    _issue(server, state, 3)


def _agree(server: ServeProcess, state: Run) -> None:
    """The ring (as stored) and the device's keys agree; one key seals."""
    ring = _ring(server.state)
    device = device_keys(server.state)
    opening = {k for k, s in ring.items() if s in OPENING}
    state.note("every ACTIVE/PENDING/DECRYPT_ONLY key is in the device", opening <= device,
               f"missing: {sorted(k.hex() for k in opening - device)}")
    unknown = {k for k in device if ring.get(k) not in OPENING | {KeyState.CREATING}}
    state.note("every device key is in the ring (opening tickets, or CREATING)", not unknown,
               f"orphans: {sorted((k.hex(), ring.get(k)) for k in unknown)}")
    sealing = [k for k, s in ring.items() if s == KeyState.ACTIVE]
    state.note("exactly one sealing key", len(sealing) == 1, f"{len(sealing)} ACTIVE")
    state.creating_in_device = sum(ring.get(k) == KeyState.CREATING for k in device)


def _retire_again(server: ServeProcess, state: Run, key_id: bytes) -> None:
    """RetireKey of ``key_id`` again: DESTROYED, gone from the device, its tickets refused;
    they are no longer expected to redeem."""
    try:
        reply = server.admin.RetireKey(admin_pb2.RetireKeyRequest(key_id=key_id.hex()),
                                       timeout=CALL)
        done = reply.key.state == admin_pb2.KEY_STATE_DESTROYED
        detail = admin_pb2.KeyState.Name(reply.key.state)
    except grpc.RpcError as exc:
        done, detail = False, f"{exc.code().name}: {exc.details()}"
    state.note("an interrupted retirement completes when repeated (DESTROYED)", done,
               f"{key_id.hex()}: {detail}")
    state.note("a retired key is gone from the device",
               key_id not in device_keys(server.state), key_id.hex())
    state.retired.add(key_id)
    gone = state.tickets.pop(key_id, [])
    answers = [_redeem(server, t) for t in gone]
    state.note("a retired key's tickets are refused INVALID",
               all(a in REFUSED for a in answers), f"{answers[:3]}")


def _retirable(server: ServeProcess, state: Run) -> bytes:
    """The oldest DECRYPT_ONLY key, once there are two (rotations made as needed, so that
    tickets under a DECRYPT_ONLY key stay to be checked). Raises: AssertionError (not within
    60 s), grpc.RpcError."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        keys = server.admin.ListKeys(admin_pb2.ListKeysRequest(), timeout=CALL).keys
        old = sorted((k.created_at.ToNanoseconds(), k.key_id) for k in keys
                     if k.state == admin_pb2.KEY_STATE_DECRYPT_ONLY)
        if len(old) >= 2:
            return bytes.fromhex(old[0][1])
        if all(k.state != admin_pb2.KEY_STATE_PENDING for k in keys):
            server.admin.RotateKey(admin_pb2.RotateKeyRequest(), timeout=CALL)
            _issue(server, state, 3)   # tickets under the new key
        else:
            time.sleep(0.2)   # a PENDING key: wait for its publication
    raise AssertionError("not two DECRYPT_ONLY keys to retire from within 60 s")


# -- the end: the sweep past the CREATING grace ----------------------------------------------------

def _final_sweep(server: ServeProcess, state: Run) -> None:
    """Stop the server, run the ring's maintenance with a clock past ``CREATING_GRACE``
    (:func:`sweep_later`, a process of its own), check the device holds exactly the keys that
    open tickets, restart, and check the tickets again."""
    server.stop()
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from authority.chaos.rotation_kill import "
         "sweep_later; sweep_later(sys.argv[1])", str(server.config)],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    state.out.check("the maintenance pass past the CREATING grace ran", done.returncode == 0)
    if done.returncode != 0:
        state.out.detail = f"sweep: {done.stderr.strip().splitlines()[-1:]}"
    ring = _ring(server.state)
    device = device_keys(server.state)
    opening = {k for k, s in ring.items() if s in OPENING}
    creating = [k for k, s in ring.items() if s == KeyState.CREATING]
    state.out.check("past the CREATING grace, the device holds exactly the keys that open "
                    "tickets, no CREATING record left (no orphan)",
                    device == opening and not creating)
    state.out.figures["device_keys_after_sweep"] = len(device)
    audit = server.cli("audit", "verify")
    state.out.check("the audit chain verifies after the kills (audit verify)",
                    audit.returncode == 0)
    server.serve()
    bad = _not_ok(server, [t for ts in state.tickets.values() for t in ts])
    state.out.check("every ticket issued before the kills redeems OK after the sweep",
                    not bad)


def sweep_later(config_path: str) -> None:
    """One maintenance pass of the authority of ``config_path`` (not running) with a clock
    ``CREATING_GRACE`` + 60 s ahead: CREATING keys are given up as they would be 10 minutes
    later. Raises: StartupError, AuthorityError."""
    from authority.app import Authority
    from authority.clock import SystemClock
    from authority.keyring.core import CREATING_GRACE
    from authority.settings_loader import load_config

    class Later(SystemClock):
        def now(self) -> float:
            return super().now() + CREATING_GRACE + 60

    authority = Authority.open(load_config(Path(config_path)), clock=Later())
    try:
        authority.maintain()
    finally:
        authority.close()


# -- reading the ring, the device, tickets ---------------------------------------------------------

def _ring(state: Path) -> dict[bytes, KeyState]:
    """Every key record of the server's SQLite store (CREATING ones too), read-only."""
    db = sqlite3.connect(f"file:{state / 'authority.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {bytes(k): KeyState(s) for k, s in db.execute("SELECT key_id, state FROM keys")}
    finally:
        db.close()


def device_keys(state: Path) -> set[bytes]:
    """The ticket keys the embedded token of ``state`` holds, listed by python-pkcs11 in a
    process of its own. Raises: AssertionError (the listing failed)."""
    from authority.backends.softhsm import (
        CONF_NAME,
        DEFAULT_LABEL,
        USER_PIN_NAME,
        find_softhsm_module,
    )

    hsm = state / "hsm"
    return {bytes.fromhex(k) for k in token_key_ids(
        find_softhsm_module(), DEFAULT_LABEL, (hsm / USER_PIN_NAME).read_text().strip(),
        hsm / CONF_NAME)}


def _issue(server: ServeProcess, state: Run, count: int) -> None:
    """Issue ``count`` tickets, kept by the id of the key that sealed them."""
    for _ in range(count):
        ticket = bytes(server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=_state(state.issued)), timeout=CALL).ticket)
        state.tickets.setdefault(parse_ticket(ticket).key_id, []).append(ticket)
        state.issued += 1


def _redeem(server: ServeProcess, ticket: bytes) -> int | str:
    """The redeem's result, or the status name of a failed call."""
    try:
        return int(server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(
            ticket=ticket), timeout=CALL).result)
    except grpc.RpcError as exc:
        return str(exc.code().name)


def _not_ok(server: ServeProcess, tickets: list[bytes]) -> list[str]:
    """What the tickets that did not redeem OK answered."""
    answers = [_redeem(server, t) for t in tickets]
    return [_name(a) for a in answers if a != authority_pb2.REDEEM_RESULT_OK]


def _name(answer: int | str) -> str:
    return answer if isinstance(answer, str) else authority_pb2.RedeemResult.Name(answer)


def _opening(tally: Tally, retired: set[bytes]) -> Tally:
    """The tally with only the acknowledged consumes of tickets under keys not retired (a
    retired key's tickets answer INVALID, not REPLAYED: nothing to learn from them)."""
    return Tally(consumed=[t for t in tally.consumed if parse_ticket(t).key_id not in retired])


def _state(n: int) -> authority_pb2.ResumptionState:
    from authority.bench.workload import proto_state

    return proto_state(30_000 + n)

