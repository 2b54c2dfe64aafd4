"""Three real replicas end to end (issue 13): three ``ticket-authority serve`` processes, each
with its own state directory, one shared SoftHSM2 token (a ``[pkcs11]`` table naming it), one
PostgreSQL database (``[postgresql]``), plaintext loopback listeners on port 0 (each address read
from its state directory's server.json), reached over real gRPC. Nothing mocked. The replicas
start one after the other, as ``server.processes`` starts its own (they need not: see
``test_processes_opening_one_softhsm2_token_at_once_all_succeed``).

The replicas run with short intervals (``cluster.heartbeat_interval`` 0.2 s, replica timeout
and lease 1 s, ``store.max_staleness`` 3 s) so that the module stays quick; load loops are
bounded in count and time. The bounds the tests measure are printed (``pytest -s``):

- a revocation or an epoch bump on A is applied on B and C by notification, at the latest
  one ``cluster.heartbeat_interval`` plus one re-read after it committed;
- the maintenance lease of a replica killed with SIGKILL moves within ``cluster.lease_duration``
  plus a heartbeat;
- the database back after an outage: every replica serves again within 2 s.

Defects found here, each with its test: SoftHSM2 token files opened by processes at the same
moment (``test_processes_opening_one_softhsm2_token_at_once_all_succeed``), and a key another
process made unseen by a process that made one just after
(``test_a_key_another_process_made_is_found_after_this_process_made_one``; the key ring's side:
tests/test_cluster_keyring.py ``test_the_loser_of_two_rotations_in_two_processes_sees_the_winner``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pkcs11 import Attribute, ObjectClass

from authority._proto.ticketauthority.v1 import (
    admin_pb2,
    authority_pb2,
    authority_pb2_grpc,
)
from authority.backends.pkcs11 import Pkcs11Backend, _keys
from authority.backends.softhsm import provision_embedded_token
from authority.bench.serveproc import ServeProcess, token_key_ids
from authority.chaos.replicas import (  # the replicas' intervals (their settings' too)
    HEARTBEAT,
    LEASE,
    PUBLISH_DELAY,
    STALENESS,
    settings,
)
from authority.devdb import child_pids
from tests.conftest import at_once, process_gone, sample_state, wait_until
from tests.pkcs11_fixtures import KID, OTHER, requires_softhsm
from tests.postgres_fixtures import PostgresServer, private_server, shared_server

pytestmark = requires_softhsm

ROOT = Path(__file__).resolve().parent.parent
OK = authority_pb2.REDEEM_RESULT_OK
INVALID = authority_pb2.REDEEM_RESULT_INVALID
REPLAYED = authority_pb2.REDEEM_RESULT_REPLAYED
REVOKED = authority_pb2.REDEEM_RESULT_REVOKED
ACTIVE = admin_pb2.KEY_STATE_ACTIVE
DESTROYED = admin_pb2.KEY_STATE_DESTROYED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T = TypeVar("T")

RECOVERY = 2.0         # the issue's bound on recovery after the database's return
SLACK = 2.0            # allowed over a bound on this shared 2-core machine
DEADLINE = 10.0        # how long a poll waits for what must happen (generous)
CALL = 5.0             # the deadline of one call


class Replica(ServeProcess):
    """One ``ticket-authority serve`` replica (``ServeProcess``), with channels of its own for
    the tests that need several connections."""

    def __init__(self, directory: Path, name: str, settings_text: str) -> None:
        super().__init__(directory, name, settings_text)
        self.connections: list[grpc.Channel] = []

    def connection(self) -> grpc.Channel:
        """A new channel with a connection of its own (closed by ``stop``)."""
        made = grpc.insecure_channel(self.address,
                                     options=[("grpc.use_local_subchannel_pool", 1)])
        self.connections.append(made)
        return made

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The server process (started: every replica of ``Cluster`` is)."""
        assert self.proc is not None
        return self.proc

    def status(self) -> admin_pb2.GetStatusResponse:
        reply: admin_pb2.GetStatusResponse = self.admin.GetStatus(
            admin_pb2.GetStatusRequest(), timeout=CALL, wait_for_ready=True)
        return reply

    def keys(self) -> dict[str, int]:
        """{key id: state} as its ListKeys shows them (destroyed ones too)."""
        listed = self.admin.ListKeys(admin_pb2.ListKeysRequest(include_destroyed=True),
                                     timeout=CALL).keys
        return {k.key_id: k.state for k in listed}

    def stop(self) -> None:
        for made in self.connections:
            made.close()
        super().stop()


class Cluster:
    """Replicas on one token and one database; each started by ``start``."""

    def __init__(self, directory: Path, dsn: str) -> None:
        self.directory = directory
        self.token = provision_embedded_token(directory / "hsm")
        self.dsn_file = directory / "dsn"
        self.dsn_file.write_text(dsn)
        self.dsn_file.chmod(0o600)
        self.replicas: list[Replica] = []

    def start(self, *names: str) -> list[Replica]:
        """Start one replica per name, each once the previous one serves (as server.processes
        does; opening at once is tested by
        test_processes_opening_one_softhsm2_token_at_once_all_succeed); return them."""
        started = []
        for name in names:
            started.append(Replica(self.directory, name, settings(
                self.directory / name, self.token, self.dsn_file)))
            self.replicas.append(started[-1])
            started[-1].serve(timeout=60.0)
        return started

    def token_keys(self) -> set[str]:
        """The ids (hex) of the ticket keys the token holds, listed by python-pkcs11 in a
        process of its own (SoftHSM2 reads its configuration once per process)."""
        return token_key_ids(self.token.module, self.token.token_label,
                             self.token.pin.reveal(), self.token.softhsm2_conf)

    def close(self) -> None:
        for replica in self.replicas:
            replica.stop()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Replicas A, B and C on the session's PostgreSQL (a database of their own). The kill -9
    test leaves two of them, for the last test (two rotations at once)."""
    server = shared_server()
    name = server.create_database()
    cluster = Cluster(tmp_path_factory.mktemp("trio"), server.dsn(name))
    try:
        cluster.start("a", "b", "c")
        yield cluster
    finally:
        cluster.close()
        server.drop_database(name)


# -- helpers -------------------------------------------------------------------------------------


def issue(replica: Replica, n: int) -> authority_pb2.IssueTicketResponse:
    reply: authority_pb2.IssueTicketResponse = replica.tickets.IssueTicket(
        authority_pb2.IssueTicketRequest(state=sample_state(n)), timeout=CALL)
    return reply


def redeem(replica: Replica, ticket: bytes, consume: bool = False) -> int:
    """The redeem result of ``ticket`` on ``replica``."""
    reply = replica.tickets.RedeemTicket(
        authority_pb2.RedeemTicketRequest(ticket=ticket, consume=consume), timeout=CALL)
    return int(reply.result)


def redeem_all(replica: Replica, tickets: list[bytes], consume: bool = False) -> set[int]:
    """The results of redeeming ``tickets`` on ``replica`` (RedeemTickets, in batches)."""
    results: set[int] = set()
    for start in range(0, len(tickets), 500):
        reply = replica.tickets.RedeemTickets(authority_pb2.RedeemTicketsRequest(items=[
            authority_pb2.RedeemTicketRequest(ticket=t, consume=consume)
            for t in tickets[start:start + 500]]), timeout=CALL)
        results |= {int(item.redeemed.result) for item in reply.items}
    return results


# -- one token shared by processes ----------------------------------------------------------------


class DestroyedWhileListing:
    """A real session whose object search, once it has found the token's keys, lets another
    session of the token destroy the first of them before the caller reads it: what a replica
    listing the shared token sees when another replica destroys a key at that moment (the
    loser of two rotations at once)."""

    def __init__(self, session: Any, other: Any) -> None:
        self._session = session
        self._other = other

    def get_objects(self, template: Any) -> Iterator[Any]:
        found = list(self._session.get_objects(template))
        first = bytes(found[0][Attribute.ID])
        self._other.get_key(id=first, object_class=ObjectClass.SECRET_KEY).destroy()
        yield from found


def test_listing_the_token_skips_a_key_another_replica_destroys_meanwhile(
        tmp_path: Path) -> None:
    """The key destroyed between the search and the reading of its label is not listed, and
    the listing does not fail (it failed ObjectHandleInvalid: a replica starting while another
    destroyed its losing first key exited 'device unavailable: pkcs11 list_keys failed')."""
    backend = Pkcs11Backend.open(replace(provision_embedded_token(tmp_path / "hsm"),
                                         sessions=2))
    try:
        backend.create_key(KID)
        backend.create_key(OTHER)
        with backend._pool.session() as pooled, backend._token.open(rw=True) as other:
            listed = _keys.list_ids(DestroyedWhileListing(pooled.session, other), False)
        assert len(listed) == 1 and listed <= {KID, OTHER}
        assert backend.list_keys() == listed
    finally:
        backend.close()


_OPENS = """
import sys, time
from pathlib import Path
from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.softhsm import provision_embedded_token
from authority.errors import DeviceUnavailable, StartupError
settings = provision_embedded_token(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()                       # all at once
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        Pkcs11Backend.open(settings).close()
    except (StartupError, DeviceUnavailable) as exc:
        print(exc)
        break
"""


def test_processes_opening_one_softhsm2_token_at_once_all_succeed(tmp_path: Path) -> None:
    """Three processes open and close the token in a loop for 2 s, all released together.
    Failed before the token files' lock (backends/pkcs11/_filelock.py): SoftHSM2 2.6.1
    rewrites token.object at every C_Login and drops its fcntl lock before the buffered write
    reaches the file, so a process initialising the module (or reading the token's
    information) then read a cut file: "no token labelled ..." or CKR_GENERAL_ERROR."""
    provision_embedded_token(tmp_path / "hsm")
    procs = [subprocess.Popen([sys.executable, "-c", _OPENS, str(tmp_path / "hsm"), "2"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    failed = [out for out, _ in (p.communicate(timeout=120) for p in procs) if out]
    assert not failed, failed

_CREATE = """
import sys
from pathlib import Path
from authority.backends.pkcs11 import Pkcs11Backend
from authority.backends.softhsm import provision_embedded_token
backend = Pkcs11Backend.open(provision_embedded_token(Path(sys.argv[1])))
backend.create_key(bytes.fromhex(sys.argv[2]))
backend.close()
"""


def test_a_key_another_process_made_is_found_after_this_process_made_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (a replica) makes KID exactly between this process's look for OTHER
    in the token and its making of OTHER (the moment is forced by running that process from
    the look; the token and both processes are real). SoftHSM2 2.6.1 keeps a per-process index
    of a token's objects, redone when the token's generation file changed; making OTHER bumps
    the generation from what is on disk, absorbing the other process's bump, so this process
    may no longer list KID. ``refresh`` must make it list both, and ``destroy_key(KID)`` must
    find KID without being told to refresh (failed before: KeyNotFound, the key left in the
    token as an orphan)."""
    token = provision_embedded_token(tmp_path / "hsm")
    backend = Pkcs11Backend.open(token)
    real_search = _keys.search

    def search_then_another_replica_creates(session: Any, key_id: bytes,
                                            by_label_only: bool) -> list[Any]:
        found = real_search(session, key_id, by_label_only)
        if key_id == OTHER:
            done = subprocess.run(
                [sys.executable, "-c", _CREATE, str(tmp_path / "hsm"), KID.hex()], cwd=ROOT,
                capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        return found

    try:
        assert backend.list_keys() == set()
        monkeypatch.setattr(_keys, "search", search_then_another_replica_creates)
        backend.create_key(OTHER)
        monkeypatch.undo()
        print("listed without a refresh:", sorted(k.hex() for k in backend.list_keys()))
        backend.destroy_key(KID)
        assert backend.list_keys() == {OTHER}
        backend.refresh()
        assert backend.list_keys() == {OTHER}
        backend.seal(OTHER, b"aad", b"still usable after the refresh")
    finally:
        backend.close()


# -- one ticket, any replica ---------------------------------------------------------------------


def test_issue_on_a_redeem_on_b_consume_on_c_replayed_on_a(trio: Cluster) -> None:
    a, b, c = trio.replicas
    ticket = issue(a, 1).ticket
    assert redeem(b, ticket) == OK
    assert redeem(c, ticket, consume=True) == OK
    assert redeem(a, ticket, consume=True) == REPLAYED
    assert redeem(b, ticket) == REPLAYED   # a redeem looks the consumed set up too


def test_sixteen_consumers_of_one_ticket_over_three_replicas_one_ok(
        trio: Cluster) -> None:
    """16 concurrent consumers, each on a connection of its own spread over the replicas."""
    ticket = issue(trio.replicas[0], 2).ticket
    channels = [trio.replicas[i % 3].connection() for i in range(16)]
    for made in channels:   # connected before the race
        grpc.channel_ready_future(made).result(timeout=CALL)
    stubs = [authority_pb2_grpc.TicketAuthorityStub(made) for made in channels]
    request = authority_pb2.RedeemTicketRequest(ticket=ticket, consume=True)

    def consume(stub: authority_pb2_grpc.TicketAuthorityStub) -> int:
        return int(stub.RedeemTicket(request, timeout=CALL).result)

    results = at_once([lambda s=stub: consume(s) for stub in stubs])  # type: ignore[misc]
    assert sorted(results) == sorted([OK] + [REPLAYED] * 15)


# -- rotation under load --------------------------------------------------------------------------


class Traffic:
    """Threads that each issue tickets on one replica and redeem each on another, until
    stopped, ``per_thread`` tickets or ``seconds`` (whichever first). Counts each redeem
    result by the key that sealed the ticket; keeps every failed call."""

    def __init__(self, routes: list[tuple[Replica, Replica]], first: int,
                 per_thread: int = 2000, seconds: float = 30.0) -> None:
        self.results: dict[tuple[str, int], int] = {}
        self.failures: list[str] = []
        self.early: list[bytes] = []          # tickets kept to redeem later
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, args=(
            issuer.connection(), redeemer.connection(), first + 100_000 * i, per_thread, seconds))
            for i, (issuer, redeemer) in enumerate(routes)]
        for t in self._threads:
            t.start()

    def _run(self, issuing: grpc.Channel, redeeming: grpc.Channel, first: int, count: int,
             seconds: float) -> None:
        issuer = authority_pb2_grpc.TicketAuthorityStub(issuing)
        redeemer = authority_pb2_grpc.TicketAuthorityStub(redeeming)
        deadline = time.monotonic() + seconds
        for n in range(first, first + count):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                issued = issuer.IssueTicket(authority_pb2.IssueTicketRequest(
                    state=sample_state(n)), timeout=CALL)
                result = redeemer.RedeemTicket(authority_pb2.RedeemTicketRequest(
                    ticket=issued.ticket), timeout=CALL).result
            except grpc.RpcError as err:
                with self._lock:
                    self.failures.append(f"{err.code().name}: {err.details()}")
                continue
            with self._lock:
                key = (issued.key_id, int(result))
                self.results[key] = self.results.get(key, 0) + 1
                if len(self.early) < 20:
                    self.early.append(issued.ticket)

    def count(self, key_id: str | None = None, result: int | None = None) -> int:
        with self._lock:
            return sum(v for (k, r), v in self.results.items()
                       if key_id in (None, k) and result in (None, r))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads)


def seals_with(replicas: list[Replica], key_id: str) -> bool:
    """Whether every replica lists ``key_id`` ACTIVE and seals with it (GetStatus)."""
    return all(r.keys().get(key_id) == ACTIVE and r.status().sealing_key_id == key_id
               for r in replicas)


def test_rotation_on_a_under_load_on_b_and_c_makes_no_valid_ticket_invalid(
        trio: Cluster) -> None:
    """B and C issue and redeem (each redeeming what the other issued) while A rotates: every
    redeem is OK, under the old key and under the new one, before and after the new key
    seals; tickets sealed under the old key before the rotation still open afterwards."""
    a, b, c = trio.replicas
    old = a.status().sealing_key_id
    traffic = Traffic([(b, c), (c, b), (b, b), (c, c)], first=10_000)
    try:
        wait_until(lambda: traffic.count(old) >= 20, timeout=DEADLINE, poll=0.01)
        rotated = a.admin.RotateKey(admin_pb2.RotateKeyRequest(), timeout=CALL)
        new = rotated.new_key.key_id
        assert new != old
        start = time.monotonic()
        wait_until(lambda: seals_with(trio.replicas, new), timeout=PUBLISH_DELAY + DEADLINE,
                   poll=0.05)
        print(f"\nnew key {new} sealing on every replica {time.monotonic() - start:.2f} s "
              f"after RotateKey returned "
              f"({admin_pb2.KeyState.Name(rotated.new_key.state)} then)")
        sealed_new = traffic.count(new)
        wait_until(lambda: traffic.count(new) >= sealed_new + 40, timeout=DEADLINE, poll=0.01)
    finally:
        traffic.stop()
    assert not traffic.failures, traffic.failures[:5]
    assert traffic.count(result=INVALID) == 0
    assert traffic.count() == traffic.count(result=OK)
    assert traffic.count(old) >= 20 and traffic.count(new) >= 40
    assert set().union(*(redeem_all(r, traffic.early) for r in trio.replicas)) == {OK}
    assert a.keys()[old] == admin_pb2.KEY_STATE_DECRYPT_ONLY


# -- revocations and epoch bumps ------------------------------------------------------------------

#: the stated bound: by notification at once; at the latest one heartbeat interval and one
#: re-read (a query: well under PROPAGATION - HEARTBEAT) after the change committed
PROPAGATION = HEARTBEAT + 0.5


def applied_within(replicas: list[Replica], ticket: bytes, result: int) -> float:
    """Seconds until every one of ``replicas`` redeems ``ticket`` as ``result`` (polled
    until DEADLINE)."""
    start = time.monotonic()
    wait_until(lambda: all(redeem(r, ticket) == result for r in replicas), timeout=DEADLINE,
               poll=0.005)
    return time.monotonic() - start


def test_a_revocation_and_an_epoch_bump_on_a_reach_b_and_c_within_the_bound(
        trio: Cluster) -> None:
    a, b, c = trio.replicas
    revoked, bumped = issue(b, 900).ticket, issue(c, 901).ticket
    assert {redeem(r, t) for r in (a, b, c) for t in (revoked, bumped)} == {OK}
    a.admin.RevokeTickets(admin_pb2.RevokeTicketsRequest(id_i=sample_state(900).id_i,
                                                         reason="e2e"), timeout=CALL)
    by_revocation = applied_within([b, c], revoked, REVOKED)
    assert redeem(b, bumped) == OK
    epoch = a.admin.BumpPolicyEpoch(admin_pb2.BumpPolicyEpochRequest(), timeout=CALL)
    by_bump = applied_within([b, c], bumped, REVOKED)
    print(f"\nrevocation on A applied on B and C after {by_revocation * 1000:.0f} ms, epoch "
          f"bump ({epoch.policy_epoch}) after {by_bump * 1000:.0f} ms (bound {PROPAGATION} s)")
    assert max(by_revocation, by_bump) < PROPAGATION
    after = issue(b, 902).ticket          # issued under the new epoch: OK everywhere
    assert {redeem(r, after) for r in (a, b, c)} == {OK}


# -- kill -9 of a replica under load -------------------------------------------------------------


class Consumers:
    """One thread per replica: issue a ticket there and consume it there; a call failing
    UNAVAILABLE is retried on the next replica (a consume retried may find its first try
    committed: REPLAYED). Records every acknowledged consume and every failure."""

    def __init__(self, replicas: list[Replica], first: int, seconds: float = 20.0) -> None:
        self.replicas = replicas
        self.acknowledged: list[bytes] = []     # tickets whose consume answered OK
        self.unavailable: dict[str, int] = {}   # replica name: calls failed UNAVAILABLE
        self.retried: list[int] = []            # what each retry of a failed call answered
        self.errors: list[str] = []             # anything else
        self._lock = threading.Lock()
        self._stop = threading.Event()
        stubs = [authority_pb2_grpc.TicketAuthorityStub(r.connection()) for r in replicas]
        self._threads = [threading.Thread(target=self._run, args=(i, stubs, first + 100_000 * i,
                                                                  seconds), daemon=True)
                         for i in range(len(replicas))]
        for t in self._threads:
            t.start()

    def _call(self, home: int, stubs: list[Any], call: Callable[[Any], T]) -> T:
        """``call`` on the home replica's stub, else on the next ones (UNAVAILABLE)."""
        for step in range(len(stubs)):
            index = (home + step) % len(stubs)
            try:
                result = call(stubs[index])
            except grpc.RpcError as err:
                if err.code() != UNAVAILABLE:
                    raise
                with self._lock:
                    name = self.replicas[index].name
                    self.unavailable[name] = self.unavailable.get(name, 0) + 1
                continue
            return result
        raise AssertionError("every replica failed UNAVAILABLE")

    def _run(self, home: int, stubs: list[Any], first: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for n in range(first, first + 100_000):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self._one(home, stubs, n)
            except (grpc.RpcError, AssertionError) as exc:
                with self._lock:
                    self.errors.append(repr(exc))

    def _one(self, home: int, stubs: list[Any], n: int) -> None:
        ticket = self._call(home, stubs, lambda s: s.IssueTicket(
            authority_pb2.IssueTicketRequest(state=sample_state(n)), timeout=CALL).ticket)
        tries: list[int] = []

        def consume(stub: Any) -> int:
            tries.append(1)
            return int(stub.RedeemTicket(authority_pb2.RedeemTicketRequest(
                ticket=ticket, consume=True), timeout=CALL).result)

        result = self._call(home, stubs, consume)
        with self._lock:
            if len(tries) > 1:
                self.retried.append(result)
            if result == OK:
                self.acknowledged.append(ticket)
            elif not (result == REPLAYED and len(tries) > 1):
                self.errors.append(f"consume answered {result} on its first try")

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads)


def lease_holder(replica: Replica) -> str:
    """The replica id holding the maintenance lease unexpired, as ``replica`` sees it ("" if
    none)."""
    lease = replica.status().maintenance_lease
    return "" if lease.expired else str(lease.holder)


def test_kill_9_of_the_lease_holder_under_load(trio: Cluster) -> None:
    """The replica holding the maintenance lease is killed (SIGKILL) while every replica
    issues and consumes: calls on it fail UNAVAILABLE, their retries on another replica
    succeed, every consume acknowledged OK is REPLAYED on every surviving replica, and the
    lease moves to a survivor. It leaves two replicas."""
    ids = {r.status().replica_id: r for r in trio.replicas}
    wait_until(lambda: lease_holder(trio.replicas[0]) in ids, timeout=DEADLINE)
    victim = ids[lease_holder(trio.replicas[0])]
    survivors = [r for r in trio.replicas if r is not victim]
    children = child_pids(victim.process.pid)
    watch = health_pb2_grpc.HealthStub(victim.connection()).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == SERVING    # a call in flight when the replica dies
    load = Consumers([victim, *survivors], first=20_000)
    try:
        wait_until(lambda: load.count() >= 30, timeout=DEADLINE, poll=0.01)
        victim.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: process_gone(victim.process.pid), timeout=DEADLINE)
        others = {r.status().replica_id for r in survivors}
        wait_until(lambda: all(lease_holder(r) in others for r in survivors),
                   timeout=DEADLINE, poll=0.02)
        moved = time.monotonic() - killed
        acknowledged = load.count()
        wait_until(lambda: load.count() >= acknowledged + 30, timeout=DEADLINE, poll=0.01)
    finally:
        load.stop()
    assert victim.process.wait(timeout=10) == -signal.SIGKILL
    with pytest.raises(grpc.RpcError) as ended:
        next(watch)
    assert ended.value.code() == UNAVAILABLE
    assert not load.errors, load.errors[:5]
    assert set(load.unavailable) == {victim.name} and load.unavailable[victim.name] >= 1
    assert load.retried and set(load.retried) <= {OK, REPLAYED}
    for replica in survivors:
        assert redeem_all(replica, load.acknowledged, consume=True) == {REPLAYED}
    print(f"\n{len(load.acknowledged)} consumes acknowledged, {load.unavailable} calls "
          f"UNAVAILABLE ({len(children)} device processes of the victim); "
          f"the lease moved {moved:.2f} s after the kill (lease {LEASE} s)")
    assert moved < LEASE + HEARTBEAT + SLACK
    victim_id = next(k for k, v in ids.items() if v is victim)
    wait_until(lambda: not live(survivors[0])[victim_id], timeout=DEADLINE)
    assert all(live(survivors[0])[r.status().replica_id] for r in survivors)
    for child in children:   # its device processes follow it
        wait_until(lambda c=child: process_gone(c), timeout=DEADLINE)  # type: ignore[misc]


def live(replica: Replica) -> dict[str, bool]:
    """{replica id: live} as GetStatus on ``replica`` lists the replicas."""
    return {r.replica_id: r.live for r in replica.status().replicas}


def test_two_rotations_at_once_on_two_replicas_make_one_key(trio: Cluster) -> None:
    """RotateKey on two replicas at the same moment: both answer the same new key; every
    replica's ListKeys agrees; the token holds exactly the ring's keys (no orphan: the
    losing replica destroyed the key it had made). Runs on the two replicas the kill -9 test
    left (run the module whole). The loser's SoftHSM2 view may miss the winner's key until
    it reads the token afresh
    (test_a_key_another_process_made_is_found_after_this_process_made_one)."""
    a, b = (r for r in trio.replicas if r.process.poll() is None)
    old = a.status().sealing_key_id
    before = a.keys()
    outcomes = at_once([lambda r=r: r.admin.RotateKey(  # type: ignore[misc]
        admin_pb2.RotateKeyRequest(), timeout=CALL) for r in (a, b)])
    new = {o.new_key.key_id for o in outcomes}
    assert len(new) == 1 and old not in new
    assert {o.previous_key.key_id for o in outcomes} == {old}
    (key_id,) = new
    assert set(a.keys()) - set(before) == {key_id}        # one key added to the ring
    wait_until(lambda: seals_with([a, b], key_id), timeout=PUBLISH_DELAY + DEADLINE)
    wait_until(lambda: a.keys() == b.keys(), timeout=DEADLINE)
    ring = a.keys()
    assert list(ring.values()).count(ACTIVE) == 1
    assert trio.token_keys() == {k for k, s in ring.items() if s != DESTROYED}

# -- the database stopped and started again under load -------------------------------------------


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[tuple[PostgresServer, Cluster]]:
    """Replicas A, B and C on a PostgreSQL server of this test's own (it is stopped)."""
    for server in private_server():
        cluster = Cluster(tmp_path, server.dsn(server.create_database()))
        try:
            cluster.start("a", "b", "c")
            yield server, cluster
        finally:
            cluster.close()


@pytest.fixture
def own_database() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own (it is stopped)."""
    yield from private_server()


class Redeems:
    """One thread per replica redeeming one ticket without consume every 20 ms; each outcome
    (a result's name or a refused call's status) kept with its time."""

    def __init__(self, replicas: list[Replica], ticket: bytes) -> None:
        self.outcomes: list[tuple[float, str]] = []
        self.by_replica: dict[str, list[tuple[float, str]]] = {r.name: [] for r in replicas}
        self.timed: dict[str, list[tuple[float, float, str]]] = {r.name: [] for r in replicas}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(r.connection(), ticket, r.name),
                                          daemon=True) for r in replicas]
        for t in self._threads:
            t.start()

    def _run(self, channel: grpc.Channel, ticket: bytes, replica: str) -> None:
        stub = authority_pb2_grpc.TicketAuthorityStub(channel)
        request = authority_pb2.RedeemTicketRequest(ticket=ticket)
        while not self._stop.wait(0.02):
            sent = time.monotonic()
            try:
                name = authority_pb2.RedeemResult.Name(stub.RedeemTicket(request,
                                                                         timeout=CALL).result)
            except grpc.RpcError as err:
                name = err.code().name
            self.outcomes.append((sent, name))
            self.by_replica[replica].append((sent, name))
            self.timed[replica].append((sent, time.monotonic() - sent, name))

    def between(self, start: float, end: float) -> set[str]:
        return {name for at, name in self.outcomes if start <= at < end}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def health(replica: Replica) -> int:
    reply = health_pb2_grpc.HealthStub(replica.channel()).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=CALL)
    return int(reply.status)


def refused(call: Callable[[], object]) -> grpc.StatusCode | None:
    """The status code ``call`` fails with (None: it succeeded)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return None


def recovered(replica: Replica, serial: Iterator[int]) -> bool:
    """Whether ``replica`` serves again: health SERVING, a ticket issued and consumed."""
    if health(replica) != SERVING:
        return False
    try:
        fresh = issue(replica, next(serial)).ticket
        return redeem(replica, fresh, consume=True) == OK
    except grpc.RpcError as err:
        assert err.code() == UNAVAILABLE, err
        return False


def test_the_database_stopped_and_started_again_under_load(
        outage: tuple[PostgresServer, Cluster]) -> None:
    """pg_ctl stop under redeem load on every replica: redeems without consume keep being
    answered from each replica's cache until store.max_staleness, consumes fail UNAVAILABLE;
    past the bound health turns NOT_SERVING; the database back, every replica serves again
    by itself (measured; the issue's target is 2 s, asserted against a generous bound)."""
    postgres, cluster = outage
    replicas = cluster.replicas
    kept, used = issue(replicas[0], 30).ticket, issue(replicas[1], 31).ticket
    fresh = [issue(r, 40 + i).ticket for i, r in enumerate(replicas)]
    assert redeem(replicas[2], used, consume=True) == OK
    load = Redeems(replicas, kept)
    try:
        halted = time.monotonic()   # each replica confirmed its cache a heartbeat before
        postgres.halt()
        assert {refused(lambda r=r, t=t: redeem(r, t, consume=True))  # type: ignore[misc]
                for r, t in zip(replicas, fresh, strict=True)} == {UNAVAILABLE}
        wait_until(lambda: {health(r) for r in replicas} == {NOT_SERVING},
                   timeout=STALENESS + DEADLINE, poll=0.02)
        stale = time.monotonic()
        assert stale - halted >= STALENESS - HEARTBEAT - 0.1
        assert {refused(lambda r=r: redeem(r, kept)) for r in replicas} == {  # type: ignore[misc]
            UNAVAILABLE}
        resuming = time.monotonic()
        postgres.resume()           # returns once the server accepts connections
        back = time.monotonic()
        serial = iter(range(100, 10_000))
        took = []
        for replica in replicas:
            wait_until(lambda r=replica: recovered(r, serial),  # type: ignore[misc]
                       timeout=DEADLINE, poll=0.02)
            took.append(time.monotonic() - back)
    finally:
        load.stop()
    print(f"\nthe database back: every replica serving (health, issue, consume) "
          f"{max(took):.2f} s after pg_ctl start returned ({max(took) + back - resuming:.2f} s "
          f"after it was run; target {RECOVERY} s)")
    assert max(took) < DEADLINE
    assert {redeem(r, used) for r in replicas} == {REPLAYED}
    assert {name for _, name in load.outcomes} <= {"REDEEM_RESULT_OK", "UNAVAILABLE"}
    served = halted + STALENESS - HEARTBEAT - 0.5   # calls sent by then are answered in time
    assert all(any(halted <= at < served for at, _ in outcomes)
               for outcomes in load.by_replica.values())
    # a call that already held a connection when the database stopped may fail (in flight);
    # nothing else is refused in the window (test_a_redeem_right_after_the_database_stops_
    # answers_from_the_cache shows the first redeem after the stop answered from the cache)
    refusals = [(name, round(at - halted, 2), round(took, 2), what)
                for name, outcomes in load.timed.items() for at, took, what in outcomes
                if halted <= at < served and what != "REDEEM_RESULT_OK"]
    assert all(what == "UNAVAILABLE" for _, _, _, what in refusals), refusals
    assert "REDEEM_RESULT_OK" in load.between(halted, served)
    assert load.between(stale + 0.1, resuming) <= {"UNAVAILABLE"}


def test_a_redeem_right_after_the_database_stops_answers_from_the_cache(
        tmp_path: Path, own_database: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One replica (in-process server, real database, real token) with connect_timeout =
    max_staleness = 3 s: PostgreSQL is stopped while the replica's policy watch is in a
    refresh; a redeem without consume sent then must be answered OK from the cache."""
    from authority.config import ClusterSettings, PostgresSettings, Secret, StoreSettings
    from authority.service.server import build_server
    from tests.conftest import make_config

    postgres = own_database
    config = replace(make_config(tmp_path / "state", "pkcs11", "threads"),
                     cluster=ClusterSettings(heartbeat_interval=0.2, replica_timeout=1.0,
                                             lease_duration=1.0),
                     store=StoreSettings(max_staleness=STALENESS),
                     postgresql=PostgresSettings(
                         dsn=Secret(postgres.dsn(postgres.create_database())),
                         pool_size=2, connect_timeout=STALENESS))
    running = build_server(config)
    channel = grpc.insecure_channel(running.address)
    try:
        running.authority.start_maintenance()
        stub = authority_pb2_grpc.TicketAuthorityStub(channel)
        ticket = stub.IssueTicket(authority_pb2.IssueTicketRequest(state=sample_state(1)),
                                  timeout=CALL).ticket
        policy = running.authority.policy
        real_refresh = policy.refresh
        stopped = threading.Event()

        def refresh_while_the_database_stops() -> bool:
            if not stopped.is_set():
                postgres.halt()
                stopped.set()
            return bool(real_refresh())

        monkeypatch.setattr(policy, "refresh", refresh_while_the_database_stops)
        assert stopped.wait(DEADLINE)
        try:
            reply = stub.RedeemTicket(authority_pb2.RedeemTicketRequest(ticket=ticket),
                                      timeout=3 * STALENESS)
        except grpc.RpcError as err:
            raise AssertionError(f"{err.code().name}: {err.details()}") from None
        assert reply.result == OK
    finally:
        channel.close()
        running.stop(grace=1.0)
