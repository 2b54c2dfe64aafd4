"""Scenario 2, device loss (TPM): the swtpm a server uses is killed (SIGKILL, no
TPM2_Shutdown: a crash) mid-load, then started again on the same state directory.

The scenario owns the swtpm (``[tpm] tcti = "swtpm:path=..."``, its state in the work
directory) so that it can kill it and start it again, as an operator's supervisor would; the
embedded swtpm is the server's child and nothing else may start one on its state.

Expected: calls UNAVAILABLE, never INVALID for a valid ticket; health NOT_SERVING while it is
gone; service back by itself within 2 s of the device's return (the time is printed); tickets
issued before redeem afterwards; no acknowledged consume lost; once the server has stopped,
the TPM is not in dictionary-attack lockout, its lockout counter is where it was before, and no
transient object or session is left loaded in it.

Scenario 2b (``device-tpm-embedded``, :func:`run_embedded`): the server's own embedded swtpm
(no ``tpm.tcti``: it runs in state_dir/tpm/swtpm as the server's child) killed -9 under load,
with the TPM backend in the server and in a device process (``server.device_processes = 1``;
the swtpm is the server's there too). Nobody starts it again but the server. Expected: calls
UNAVAILABLE meanwhile, never wrong; a round trip OK and health SERVING within 2 s of each kill;
the restart logged once per kill; tickets from before redeem; no lockout and the lockout
counter where it was (read on the state before the server started and after it stopped)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from authority._proto.ticketauthority.v1 import authority_pb2
from authority.backends.tpm.swtpm import PID_FILE, SwtpmProcess
from authority.bench.serveproc import ServeProcess
from authority.chaos.core import Outcome
from authority.chaos.load import Load, Tally, lost_consumes
from authority.chaos.servers import (
    RECOVERY_BOUND,
    SERVING,
    health,
    round_trip,
    settle_outage,
    single,
    time_until,
)

NAME = "device-tpm"
EMBEDDED = "device-tpm-embedded"

_PT_PERMANENT = 0x200           # TPM_PT_PERMANENT (TPM_PT_VAR + 0)
_PT_LOCKOUT_COUNTER = 0x20E     # TPM_PT_LOCKOUT_COUNTER
_IN_LOCKOUT = 1 << 2            # TPMA_PERMANENT.inLockout
_TRANSIENT = 0x80000000
_LOADED_SESSION = 0x02000000    # TPM_HT_LOADED_SESSION (HMAC sessions)
_POLICY_SESSION = 0x03000000    # TPM_HT_POLICY_SESSION


def run(work: Path, quick: bool, server_toml: str = "") -> Outcome:
    """``server_toml``: more ``[server]`` settings (``device_processes = 1``: the TPM backend
    in a device process). Raises: StartupError (swtpm did not start), AssertionError (the
    server did not start), grpc.RpcError (it never came back)."""
    out = Outcome(NAME, "swtpm killed mid-load, started again on its state")
    tpm_state = work / "swtpm"
    swtpm = SwtpmProcess.start(tpm_state)
    lockout_before = tpm_facts(swtpm.tcti)["lockout_counter"]
    server = None
    try:
        server = single(work, backend="tpm", extra=server_toml + f'[tpm]\ntcti = "{swtpm.tcti}"\n')
        swtpm = _outage(out, server, swtpm, 2.0 if quick else 10.0)
        server.stop()
        facts = tpm_facts(swtpm.tcti)
        out.check("the TPM is not in dictionary-attack lockout", not facts["in_lockout"])
        out.check("the TPM's lockout counter did not grow",
                  facts["lockout_counter"] <= lockout_before)
        out.check("no transient object left in the TPM", facts["transient"] == 0)
        out.check("no session left in the TPM", facts["sessions"] == 0)
        out.figures.update({"lockout_counter": facts["lockout_counter"]})
    finally:
        if server is not None:
            server.stop()
        swtpm.stop()
    return out


def _outage(out: Outcome, server: ServeProcess, swtpm: SwtpmProcess,
            outage: float) -> SwtpmProcess:
    """Kill the swtpm under load, start it again after ``outage`` seconds; record what was seen
    in ``out``; return the new swtpm. Raises: StartupError, grpc.RpcError."""
    before = [server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
        state=_state(n)), timeout=5).ticket for n in range(20)]
    with Load([lambda: server.tickets], max_seconds=4 * outage + 20) as load:
        time.sleep(1.0)
        swtpm.kill()
        down = time_until(lambda: health(server) not in (SERVING, None), 10.0)
        out.check("health NOT_SERVING within 10 s of the device's loss", down is not None)
        out.check("health stayed NOT_SERVING until the device returned",
                  _stays_down(server, outage))
        swtpm = SwtpmProcess.start(swtpm.state_dir)
        back = time_until(lambda: round_trip(server) and health(server) == SERVING, 30.0)
        time.sleep(1.0)
    tally = load.tally
    settle_outage(out, tally, server, before, back, outage)
    return swtpm


def run_embedded(work: Path, quick: bool) -> Outcome:
    """Scenario 2b: the embedded swtpm killed -9 under load, ``kills`` times (2 quick, 5 full),
    with the backend in the server, then in a device process. Raises: StartupError,
    AssertionError (a server did not start), grpc.RpcError (it never came back), OSError."""
    out = Outcome(EMBEDDED, "the server's own swtpm killed -9 mid-load")
    out.recovery_s = 0.0
    for name, server_toml in (("in-server", ""), ("device-process", "device_processes = 1\n")):
        _embedded_case(out, work, name, server_toml, 2 if quick else 5)
    return out


def _embedded_case(out: Outcome, work: Path, name: str, server_toml: str, kills: int) -> None:
    """One server ``name`` on its embedded swtpm, its swtpm killed ``kills`` times under load;
    what was seen goes into ``out`` (checks prefixed with ``name``). Raises: as run_embedded."""
    state = work / name / "tpm" / "swtpm"
    lockout_before = _facts_on(state)["lockout_counter"]
    server = single(work, name, backend="tpm", extra=server_toml)
    try:
        before = [server.tickets.IssueTicket(authority_pb2.IssueTicketRequest(
            state=_state(n)), timeout=5).ticket for n in range(20)]
        pids, backs = [], []
        with Load([lambda: server.tickets], max_seconds=kills * 15 + 10) as load:
            for _ in range(kills):
                time.sleep(1.2)   # a swtpm that ran 1 s is restarted at once (swtpm.py)
                pids.append(_swtpm_pid(state))
                os.kill(pids[-1], signal.SIGKILL)
                backs.append(time_until(
                    lambda: round_trip(server) and health(server) == SERVING, 10.0))
            time.sleep(0.5)
        _judge_kills(out, name, server, load.tally, backs, before)
        out.check(f"{name}: the server started a new swtpm after each kill",
                  _swtpm_pid(state) not in pids)
        restarts = server.log.read_text(errors="replace").count("started again on its state")
        out.check(f"{name}: each restart logged once", restarts == kills)
        server.stop()
    finally:
        server.stop()
        _stop_left(state)
    facts = _facts_on(state)
    out.check(f"{name}: the TPM is not in dictionary-attack lockout", not facts["in_lockout"])
    out.check(f"{name}: the TPM's lockout counter did not grow",
              facts["lockout_counter"] <= lockout_before)
    out.figures[f"{name}_lockout_counter"] = facts["lockout_counter"]


def _judge_kills(out: Outcome, name: str, server: ServeProcess, tally: Tally,
                 backs: list[float | None], before: list[bytes]) -> None:
    """Record in ``out`` what the load and the recoveries of one server saw.
    Raises: grpc.RpcError (the server does not answer)."""
    out.check(f"{name}: service back within {RECOVERY_BOUND} s of each kill",
              all(b is not None and b <= RECOVERY_BOUND for b in backs))
    out.check(f"{name}: calls failed (UNAVAILABLE) after the kills", tally.failing > 0)
    out.calls += tally.calls
    out.wrong += len(tally.wrong)
    out.lost += lost_consumes(tally, server.tickets)
    still = [server.tickets.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=t),
                                         timeout=5).result for t in before]
    out.check(f"{name}: tickets issued before the kills redeem OK after them",
              all(r == authority_pb2.REDEEM_RESULT_OK for r in still))
    known = [b for b in backs if b is not None]
    out.recovery_s = None if out.recovery_s is None or len(known) < len(backs) \
        else max(out.recovery_s, *known)
    out.detail = "; ".join([*([out.detail] if out.detail else []), *tally.wrong[:3]])
    out.figures.update({f"{name}_failing_calls": tally.failing,
                        f"{name}_slowest_back_s": round(max(known, default=-1.0), 3)})


def _swtpm_pid(state: Path) -> int:
    """The pid in the embedded swtpm's pid file. Raises: OSError, ValueError."""
    return int((state / PID_FILE).read_text("ascii").strip())


def _facts_on(state: Path) -> dict[str, int]:
    """``tpm_facts`` of the TPM state in ``state``, read with a swtpm of our own started on it
    (no server running on it). Raises: StartupError, TSS2_Exception."""
    swtpm = SwtpmProcess.start(state)
    try:
        return tpm_facts(swtpm.tcti)
    finally:
        swtpm.stop()


def _stop_left(state: Path) -> None:
    """SIGKILL a swtpm still running on ``state`` (its server died without stopping it).
    Never raises."""
    try:
        pid = _swtpm_pid(state)
        if str(state).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _stays_down(server: ServeProcess, seconds: float) -> bool:
    """Whether health answers other than SERVING each time it is asked, every 0.1 s for
    ``seconds``."""
    deadline = time.monotonic() + seconds
    flapped = False
    while time.monotonic() < deadline:
        flapped |= health(server) == SERVING
        time.sleep(0.1)
    return not flapped


def tpm_facts(tcti: str) -> dict[str, int]:
    """What the TPM at ``tcti`` says of its dictionary-attack state and what it holds loaded:
    ``in_lockout`` (0/1), ``lockout_counter``, ``transient`` (objects), ``sessions`` (loaded
    HMAC and policy sessions). Read with tpm2-pytss over a connection of its own (the swtpm
    serves one client at a time: call it when no server is connected).

    Raises: TSS2_Exception (the TPM did not answer)."""
    from tpm2_pytss import ESAPI  # type: ignore[import-untyped, unused-ignore]
    from tpm2_pytss.constants import TPM2_CAP  # type: ignore[import-untyped, unused-ignore]

    with ESAPI(tcti) as esapi:
        _more, props = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_PERMANENT, 64)
        values = {int(p.property): int(p.value) for p in props.data.tpmProperties}

        def handles(first: int) -> int:
            _more, data = esapi.get_capability(TPM2_CAP.HANDLES, first, 64)
            return sum(1 for h in data.data.handles if int(h) >> 24 == first >> 24)

        return {"in_lockout": int(bool(values.get(_PT_PERMANENT, 0) & _IN_LOCKOUT)),
                "lockout_counter": values.get(_PT_LOCKOUT_COUNTER, 0),
                "transient": handles(_TRANSIENT),
                "sessions": handles(_LOADED_SESSION) + handles(_POLICY_SESSION)}


def _state(n: int) -> authority_pb2.ResumptionState:
    from authority.bench.workload import proto_state

    return proto_state(20_000 + n)
