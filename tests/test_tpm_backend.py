"""TpmBackend against a real swtpm (started per test in tmp_path), checked with tpm2-tools where it
helps. Nothing is mocked; the capability checker and the error translation are pure functions and
are fed fabricated inputs.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from authority.errors import (
    DeviceUnavailable,
    InvalidArgument,
    StartupError,
    UnsealFailed,
)
from authority.ticket_format import FORMAT_V2_TPM, encode_header
from tests.tpm_fixtures import (  # noqa: F401  (fixtures)
    HAVE_PYTSS,
    HAVE_SWTPM,
    requires_tools,
    requires_tpm,
    run_tool,
    swtpm_fixture,
    tpm_backend_fixture,
    tpm_settings_fixture,
)

pytestmark = requires_tpm

if HAVE_PYTSS and HAVE_SWTPM:
    from authority.backends.base import KeyBackend
    from authority.backends.tpm import (
        SwtpmProcess,
        TpmBackend,
        TpmCapabilities,
        check_capabilities,
        missing_capabilities,
        open_tpm_backend,
    )
    from authority.backends.tpm._errors import Ctx, Kind, Phase, TpmError, translate
    from authority.backends.tpm.capabilities import (
        REQUIRED_ALGORITHMS,
        REQUIRED_COMMANDS,
        REQUIRED_CURVES,
    )
    from authority.backends.tpm.worker import Worker
    from authority.config import TpmSettings

K1 = bytes.fromhex("0102030405060708")
K2 = bytes.fromhex("1112131415161718")
K3 = bytes.fromhex("2122232425262728")
REPO = Path(__file__).resolve().parents[1]
PRIMARY_ATTRS = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"


def _aad(key_id: bytes) -> bytes:
    return encode_header(key_id, FORMAT_V2_TPM)


@pytest.fixture
def keyed(tpm_backend: TpmBackend) -> TpmBackend:
    tpm_backend.create_key(K1)
    return tpm_backend


# ------------------------------------------------------------------------------------ basics


def test_satisfies_protocol_and_describe(tpm_backend: TpmBackend) -> None:
    backend: KeyBackend = tpm_backend
    assert backend.name == "tpm" and backend.format_version == 2
    info = backend.describe()
    assert info.backend == "tpm"
    assert info.library.startswith(tpm_backend.tcti) and "tpm2-pytss" in info.library
    assert info.token.startswith("IBM SW TPM firmware")   # swtpm's manufacturer and vendor
    assert info.sessions == 1
    assert tpm_backend.info.transient_slots == 3 and tpm_backend.info.max_buffer == 1024
    assert tpm_backend.info.lru_keys == 1


def test_key_attributes_read_back_from_the_tpm(keyed: TpmBackend) -> None:
    attributes = keyed.key_attributes(K1)
    for obj in ("aes", "hmac"):
        for name in ("fixed_tpm", "fixed_parent", "sensitive_data_origin", "user_with_auth",
                     "no_da", "sign_encrypt"):
            assert attributes[f"{obj}.{name}"] is True, f"{obj}.{name}"
        for name in ("restricted", "encrypted_duplication", "admin_with_policy"):
            assert attributes[f"{obj}.{name}"] is False, f"{obj}.{name}"
    assert attributes["aes.decrypt"] is True
    assert attributes["hmac.decrypt"] is False


def test_key_dir_layout_and_permissions(keyed: TpmBackend) -> None:
    key_dir = keyed.key_dir
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in key_dir.iterdir())
    assert names == sorted(f"{K1.hex()}.{part}" for part in
                           ("aes.pub", "aes.priv", "hmac.pub", "hmac.priv"))
    for path in key_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_sizes_refused_clearly(keyed: TpmBackend) -> None:
    aad = _aad(K1)
    biggest = 1024 - 16 - len(aad)
    assert keyed.max_plaintext == biggest
    sealed = keyed.seal(K1, aad, b"p" * biggest)
    assert keyed.unseal(K1, aad, sealed) == b"p" * biggest
    with pytest.raises(InvalidArgument, match="at most 1024 octets per command"):
        keyed.seal(K1, aad, b"p" * (biggest + 1))
    with pytest.raises(InvalidArgument, match=r"items\[1\]\.plaintext"):
        keyed.seal_many([(K1, aad, b"ok"), (K1, aad, b"p" * 2000)])
    with pytest.raises(UnsealFailed):
        keyed.unseal(K1, aad, sealed + b"x")      # longer than any seal can make
    assert keyed.unseal(K1, aad, keyed.seal(K1, aad, b"")) == b""


def test_embedded_swtpm_life_cycle(tmp_path: Path) -> None:
    tpm_dir = tmp_path / "tpm"
    backend = open_tpm_backend(TpmSettings(), tpm_dir)
    try:
        swtpm = backend.swtpm
        assert swtpm is not None and swtpm.running
        assert "embedded swtpm" in backend.describe().library
        for directory in (tpm_dir, tpm_dir / "swtpm", tpm_dir / "keys"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        backend.create_key(K1)
        sealed = backend.seal(K1, _aad(K1), b"kept")
    finally:
        backend.close()
    assert not swtpm.running
    backend.close()  # idempotent
    with pytest.raises(DeviceUnavailable, match="closed"):
        backend.seal(K1, _aad(K1), b"x")
    second = open_tpm_backend(TpmSettings(), tpm_dir)
    try:
        assert second.unseal(K1, _aad(K1), sealed) == b"kept"
        assert second.info.stale_flushed == 0   # the first one flushed and shut down cleanly
    finally:
        second.close()


_ORPHAN = """
import sys
from pathlib import Path
from authority.backends.tpm import SwtpmProcess
process = SwtpmProcess.start(Path(sys.argv[1]))
print(process.pid, flush=True)
import os
os._exit(0)  # die without stopping it, as a SIGKILLed authority would
"""


def _running(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_embedded_swtpm_orphaned_by_a_dead_process_is_replaced(tmp_path: Path) -> None:
    tpm_dir = tmp_path / "tpm"
    child = subprocess.run([sys.executable, "-c", _ORPHAN, str(tpm_dir / "swtpm")], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=60, check=True)
    orphan = int(child.stdout.strip())
    try:
        assert _running(orphan)
        backend = open_tpm_backend(TpmSettings(), tpm_dir)
        try:
            assert not _running(orphan)
            backend.create_key(K1)
            assert backend.unseal(K1, _aad(K1), backend.seal(K1, _aad(K1), b"ok")) == b"ok"
            with pytest.raises(StartupError, match="still in use by process"):
                open_tpm_backend(TpmSettings(), tpm_dir)   # a second backend on the same dir
        finally:
            backend.close()
    finally:
        if _running(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_missing_swtpm_and_bad_tcti(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(StartupError, match="swtpm, which is not installed"):
        open_tpm_backend(TpmSettings(), tmp_path / "a")
    monkeypatch.undo()
    with pytest.raises(StartupError, match=r"tpm\.tcti"):
        open_tpm_backend(TpmSettings(tcti="swtpm:host=127.0.0.1,port=9"), tmp_path / "b")
    with pytest.raises(StartupError, match=r"tpm\.retries"):
        open_tpm_backend(TpmSettings(tcti="swtpm:port=9", retries=-1), tmp_path / "c")


# ------------------------------------------------------------------------------------ tpm2-tools


@requires_tools
def test_tpm2_tools_read_the_same_attributes(tpm_backend: TpmBackend, tmp_path: Path) -> None:
    """Load our blobs with tpm2-tools under a primary it makes from the same template, and read
    the public areas back from the TPM. That tpm2_load accepts them also shows the storage primary
    is the deterministic owner-hierarchy ECC P-256 key, recreated rather than persisted."""
    tpm_backend.create_key(K1)
    key_dir = tpm_backend.key_dir
    tcti = tpm_backend.tcti
    tpm_backend.close()  # free its transient slots (no resource manager)
    work = tmp_path / "tools"
    work.mkdir()
    for obj in ("aes", "hmac"):
        printed = run_tool(tcti, "tpm2_print", "-t", "TPM2B_PUBLIC",
                           str(key_dir / f"{K1.hex()}.{obj}.pub"))
        assert "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda" in printed
    run_tool(tcti, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
             "-a", PRIMARY_ATTRS, "-c", str(work / "primary.ctx"))
    run_tool(tcti, "tpm2_flushcontext", "-t")
    seen = {}
    for obj in ("aes", "hmac"):
        run_tool(tcti, "tpm2_load", "-C", str(work / "primary.ctx"),
                 "-u", str(key_dir / f"{K1.hex()}.{obj}.pub"),
                 "-r", str(key_dir / f"{K1.hex()}.{obj}.priv"), "-c", str(work / f"{obj}.ctx"))
        run_tool(tcti, "tpm2_flushcontext", "-t")
        seen[obj] = run_tool(tcti, "tpm2_readpublic", "-c", str(work / f"{obj}.ctx"))
        run_tool(tcti, "tpm2_flushcontext", "-t")
    assert "value: fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|decrypt|sign\n" \
        in seen["aes"]
    assert "value: symcipher" in seen["aes"] and "sym-keybits: 256" in seen["aes"]
    assert "value: cfb" in seen["aes"]
    assert "value: fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign\n" \
        in seen["hmac"]
    assert "value: keyedhash" in seen["hmac"] and "value: hmac" in seen["hmac"]


def test_private_blobs_are_tpm_wrapped(tpm_backend: TpmBackend, swtpm: SwtpmProcess,
                                       tmp_path: Path) -> None:
    """What this shows, honestly: the .priv files are TPM2B_PRIVATE structures (an integrity
    HMAC followed by an encrypted sensitive area), whose encrypted part does not start like a
    plaintext TPM2B_SENSITIVE of a symmetric key, and which differ for two keys made from the same
    template; and that another TPM (a fresh swtpm, another owner seed) cannot load them. It cannot
    show that the key never exists in the clear anywhere: we never see the key value, which is the
    point (sensitiveDataOrigin: the TPM generated it; fixedTPM: it cannot be duplicated)."""
    tpm_backend.create_key(K1)
    tpm_backend.create_key(K2)
    sealed = tpm_backend.seal(K1, _aad(K1), b"bound to this TPM")
    privs = {}
    for key_id in (K1, K2):
        for obj in ("aes", "hmac"):
            data = (tpm_backend.key_dir / f"{key_id.hex()}.{obj}.priv").read_bytes()
            assert int.from_bytes(data[:2], "big") == len(data) - 2       # TPM2B size
            assert int.from_bytes(data[2:4], "big") == 32                 # integrity HMAC size
            encrypted = data[36:]
            # a plaintext TPM2B_SENSITIVE would be: size, sensitiveType (0x0025 symcipher /
            # 0x0008 keyedhash), authValue (empty: 0x0000), seedValue size 0x0020
            assert encrypted[2:8] not in (bytes.fromhex("002500000020"),
                                          bytes.fromhex("000800000020"))
            privs[(key_id, obj)] = data
    assert privs[(K1, "aes")] != privs[(K2, "aes")]
    assert privs[(K1, "aes")][36:] != privs[(K2, "aes")][36:]
    assert privs[(K1, "hmac")] != privs[(K2, "hmac")]
    tpm_backend.close()
    other = SwtpmProcess.start(tmp_path / "other-swtpm")
    try:
        stranger = open_tpm_backend(TpmSettings(tcti=other.tcti, key_dir=tpm_backend.key_dir),
                                    tmp_path / "other")
        try:
            assert stranger.list_keys() == {K1, K2}
            with pytest.raises(DeviceUnavailable, match="another TPM"):
                stranger.unseal(K1, _aad(K1), sealed)
        finally:
            stranger.close()
    finally:
        other.stop()


# ------------------------------------------------------------------------------------ restarts


def test_swtpm_restart_keeps_every_ticket(tpm_settings: TpmSettings, swtpm: SwtpmProcess,
                                         tmp_path: Path) -> None:
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    keys = (K1, K2, K3)
    for key_id in keys:
        backend.create_key(key_id)
    tickets = [(k, _aad(k), backend.seal(k, _aad(k), k * 4)) for k in keys]
    backend.close()
    swtpm.stop()
    restarted = SwtpmProcess.start(swtpm.state_dir)
    try:
        backend = open_tpm_backend(replace(tpm_settings, tcti=restarted.tcti), tmp_path / "tpm")
        try:
            assert backend.list_keys() == set(keys)
            assert backend.unseal_many(tickets) == [k * 4 for k in keys]
        finally:
            backend.close()
    finally:
        restarted.stop()


def test_swtpm_restart_under_a_live_backend(tpm_settings: TpmSettings, swtpm: SwtpmProcess,
                                           tmp_path: Path) -> None:
    """The swtpm dies (no TPM2_Shutdown) and comes back on the same sockets and state while the
    backend stays open. A call during the outage is UNAVAILABLE and the next one reconnects; a
    restart between two calls is noticed as handles the TPM no longer has (it was reset), and
    the objects are reloaded from the blobs. Every ticket still opens."""
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    processes = [swtpm]
    try:
        backend.create_key(K1)
        backend.create_key(K2)
        one, two = backend.seal(K1, _aad(K1), b"one"), backend.seal(K2, _aad(K2), b"two")

        processes[-1].kill()
        with pytest.raises(DeviceUnavailable):
            backend.unseal(K1, _aad(K1), one)
        processes.append(SwtpmProcess.start(swtpm.state_dir))
        assert backend.unseal(K1, _aad(K1), one) == b"one"
        assert backend.counters()["reconnects"] == 1

        processes[-1].kill()
        processes.append(SwtpmProcess.start(swtpm.state_dir))
        assert backend.unseal(K1, _aad(K1), one) == b"one"
        assert backend.unseal(K2, _aad(K2), two) == b"two"
        assert backend.unseal(K1, _aad(K1), backend.seal(K1, _aad(K1), b"new")) == b"new"
        assert backend.key_attributes(K2)["aes.no_da"] is True
        assert backend.counters()["resyncs"] >= 1
    finally:
        backend.close()
        for process in processes:
            process.stop()


_LOOP = """
import sys
from pathlib import Path
from authority.backends.tpm import open_tpm_backend
from authority.config import TpmSettings
tcti, key_dir, tpm_dir = sys.argv[1:4]
backend = open_tpm_backend(TpmSettings(tcti=tcti, key_dir=Path(key_dir)), Path(tpm_dir))
# One key: once loaded it stays loaded (the LRU never evicts it), so wherever the kill lands
# at least its two objects are left in the TPM. Two alternating keys would be evicted and
# reloaded on every operation, and a kill between flush and load could leave nothing.
key = bytes([1]) * 8
aad = bytes(12)
n = 0
while True:
    assert backend.unseal(key, aad, backend.seal(key, aad, b"loop")) == b"loop"
    n += 1
    if n == 20:
        print("running", flush=True)
"""


def test_killed_client_leaves_nothing_blocking(tpm_settings: TpmSettings, swtpm: SwtpmProcess,
                                              tmp_path: Path) -> None:
    """SIGKILL a process in the middle of seal/unseal loops (no resource manager: its objects
    stay loaded in the swtpm); a new backend flushes them, and there is no lockout."""
    setup = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    for key_id in (b"\x01" * 8, b"\x02" * 8):
        setup.create_key(key_id)
    setup.close()
    assert tpm_settings.key_dir is not None
    child = subprocess.Popen(
        [sys.executable, "-c", _LOOP, swtpm.tcti, str(tpm_settings.key_dir),
         str(tmp_path / "child")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        line = child.stdout.readline() if ready else b""
        if line == b"running\n":
            time.sleep(0.3)  # let it loop a while: the kill lands mid-operation
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert line == b"running\n", child.stderr.read().decode(errors="replace")
    assert child.returncode == -signal.SIGKILL
    backend = open_tpm_backend(tpm_settings, tmp_path / "tpm")
    try:
        assert backend.info.stale_flushed >= 1
        assert backend.info.lockout_counter == 0
        for key_id in (b"\x01" * 8, b"\x02" * 8):
            aad = bytes(12)
            assert backend.unseal(key_id, aad, backend.seal(key_id, aad, b"after")) == b"after"
    finally:
        backend.close()


@requires_tools
def test_dictionary_attack_lockout_does_not_touch_ticket_keys(
        keyed: TpmBackend, swtpm: SwtpmProcess, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Lock the swtpm out (one wrong password on a DA-protected object); the ticket keys are noDA
    and keep working, and a backend opened during the lockout says so in the log."""
    sealed = keyed.seal(K1, _aad(K1), b"before")
    settings = TpmSettings(tcti=keyed.tcti, key_dir=keyed.key_dir)
    keyed.close()
    tcti, work = swtpm.tcti, tmp_path / "da"
    work.mkdir()
    run_tool(tcti, "tpm2_dictionarylockout", "--setup-parameters", "--max-tries=1",
             "--recovery-time=600", "--lockout-recovery-time=600")
    run_tool(tcti, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", str(work / "p.ctx"))
    run_tool(tcti, "tpm2_flushcontext", "-t")
    run_tool(tcti, "tpm2_create", "-C", str(work / "p.ctx"), "-G", "hmac", "-p", "secret",
             "-u", str(work / "k.pub"), "-r", str(work / "k.priv"), "-c", str(work / "k.ctx"))
    run_tool(tcti, "tpm2_flushcontext", "-t")
    (work / "data").write_bytes(b"data")
    for _ in range(2):
        wrong = subprocess.run(["tpm2_hmac", "-c", str(work / "k.ctx"), "-p", "wrong",
                                str(work / "data")], env={**os.environ, "TPM2TOOLS_TCTI": tcti},
                               capture_output=True, text=True, check=False)
        assert wrong.returncode != 0
        run_tool(tcti, "tpm2_flushcontext", "-t")
    assert "lockout" in wrong.stderr.lower()
    with caplog.at_level(logging.WARNING):
        backend = open_tpm_backend(settings, tmp_path / "tpm2")
    try:
        assert "dictionary-attack lockout" in caplog.text
        assert backend.info.lockout_counter >= 1
        assert backend.unseal(K1, _aad(K1), sealed) == b"before"
        backend.create_key(K2)
        assert backend.unseal(K2, _aad(K2), backend.seal(K2, _aad(K2), b"x")) == b"x"
    finally:
        backend.close()


# ------------------------------------------------------------------------------------ threads


def test_eight_threads_through_the_worker(tpm_backend: TpmBackend) -> None:
    for key_id in (K1, K2, K3):
        tpm_backend.create_key(key_id)
    errors: list[BaseException] = []
    done = [0] * 8
    stop_at = time.monotonic() + 2.0

    def run(n: int) -> None:
        key_id = (K1, K2, K3)[n % 3]
        aad = _aad(key_id)
        try:
            i = 0
            while time.monotonic() < stop_at:
                plaintext = f"thread {n} item {i}".encode()
                if i % 10 == 0:
                    items = [(key_id, aad, plaintext + bytes([j])) for j in range(5)]
                    sealed = tpm_backend.seal_many(items)
                    opened = tpm_backend.unseal_many(
                        [(k, a, s) for (k, a, _), s in zip(items, sealed, strict=True)])
                    assert opened == [p for _, _, p in items]
                else:
                    sealed_one = tpm_backend.seal(key_id, aad, plaintext)
                    assert tpm_backend.unseal(key_id, aad, sealed_one) == plaintext
                    with pytest.raises(UnsealFailed):
                        tpm_backend.unseal(key_id, aad,
                                           sealed_one[:-1] + bytes([sealed_one[-1] ^ 1]))
                i += 1
            done[n] = i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert all(count > 0 for count in done), done
    counters = tpm_backend.counters()
    assert counters["resyncs"] == 0


def test_worker_queue_full_and_timeout() -> None:
    """The worker alone (no TPM): a full queue and a late result are DeviceUnavailable."""
    release = threading.Event()
    worker = Worker("test-worker", queue_size=1, timeout=5.0)
    try:
        blocker = threading.Thread(target=lambda: worker.call(lambda: release.wait(10)))
        blocker.start()
        time.sleep(0.1)                           # the worker is now busy with the blocker
        waiting = threading.Thread(target=lambda: worker.call(lambda: None))
        waiting.start()
        time.sleep(0.1)                           # ... and the queue holds one job
        with pytest.raises(DeviceUnavailable, match="saturated"):
            worker.call(lambda: None)
        release.set()
        blocker.join(5)
        waiting.join(5)
        release.clear()
        with pytest.raises(DeviceUnavailable, match="no result within"):
            worker.call(lambda: release.wait(1), timeout=0.1)
        release.set()
        assert worker.call(lambda: 42) == 42
    finally:
        release.set()
        worker.stop(lambda: None)
    with pytest.raises(DeviceUnavailable, match="closed"):
        worker.call(lambda: None)


def test_the_authority_serves_with_the_tpm_backend(tmp_path: Path) -> None:
    """End to end over gRPC: config backend="tpm" (embedded swtpm), issue a format-2 ticket,
    redeem it, restart the server on the same state dir, redeem it again."""
    from authority._proto.ticketauthority.v1 import authority_pb2
    from tests.conftest import Harness, issue, redeem

    harness = Harness(tmp_path / "state")
    harness.config = replace(harness.config, backend="tpm")
    harness.start()
    try:
        ticket = issue(harness.tickets, 1).ticket
        assert ticket[0] == FORMAT_V2_TPM
        ok = authority_pb2.REDEEM_RESULT_OK
        assert redeem(harness.tickets, ticket).result == ok
        assert harness.authority.backend.describe().backend == "tpm"
        harness.restart()
        assert redeem(harness.tickets, ticket).result == ok
    finally:
        harness.stop()


def test_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m authority.backends.tpm.bench`` (figures only, no timing assertions)."""
    from authority.backends.tpm import bench

    bench.main(["-n", "200", "--seconds", "0.2"])
    out = capsys.readouterr().out
    assert "unseal_many(100), items" in out and "8 threads unseal, two keys" in out


# ------------------------------------------------------------------------------------ pure checks


def _full_caps(**changes: object) -> TpmCapabilities:
    caps = TpmCapabilities.of(REQUIRED_COMMANDS, REQUIRED_ALGORITHMS, REQUIRED_CURVES,
                              aes256_cfb=True, hmac_sha256=True, transient_slots=3)
    return replace(caps, **changes)  # type: ignore[arg-type]


def test_capability_check_on_fabricated_lists() -> None:
    check_capabilities(_full_caps(), "device:/dev/tpmrm0")
    assert missing_capabilities(_full_caps()) == []
    # commands as GetCapability reports them: TPMA_CC with attribute bits above the index
    with_bits = TpmCapabilities.of([cc | 0x02C00000 for cc in REQUIRED_COMMANDS],
                                   REQUIRED_ALGORITHMS, REQUIRED_CURVES, True, True)
    assert missing_capabilities(with_bits) == []

    no_encrypt = _full_caps(commands=frozenset(REQUIRED_COMMANDS) - {0x193})
    with pytest.raises(StartupError) as info:
        check_capabilities(no_encrypt, "device:/dev/tpmrm0")
    message = str(info.value)
    assert message.startswith("tpm.tcti: the TPM at 'device:/dev/tpmrm0' lacks")
    assert "command TPM2_EncryptDecrypt2" in message and "optional" in message

    poor = _full_caps(algorithms=frozenset(REQUIRED_ALGORITHMS) - {0x0043},
                      curves=frozenset(), aes256_cfb=False, transient_slots=2)
    assert missing_capabilities(poor) == [
        "algorithm CFB mode",
        "curve ECC NIST P-256",
        "AES-256 keys in CFB mode (TPM2_TestParms refused them)",
        "3 transient object slots (it reports 2)",
    ]


class _Rc(Exception):
    """A stand-in carrying a response code, as TSS2_Exception does (``.rc``)."""

    def __init__(self, rc: int) -> None:
        super().__init__(f"rc 0x{rc:x}")
        self.rc = rc


@pytest.mark.parametrize(("rc", "kind", "text"), [
    (0x922, "BUSY", "busy"),                      # TPM_RC_RETRY
    (0x908, "BUSY", "busy"),                      # TPM_RC_YIELDED
    (0x90A, "BUSY", "busy"),                      # TPM_RC_TESTING
    (0x921, "LOCKOUT", "dictionary-attack lockout"),
    (0x902, "MEMORY", "out of object or session memory"),
    (0x910, "STALE", "no longer valid"),          # TPM_RC_REFERENCE_H0
    (0x18B, "STALE", "no longer valid"),          # TPM_RC_HANDLE, handle 1
    (0x100, "INITIALIZE", "not been started"),
    (0x101, "FAILURE", "failure mode"),
    (0x1DF, "OTHER", "another TPM"),              # TPM_RC_INTEGRITY, parameter 1
    (0xA000A, "UNREACHABLE", "cannot be reached"),
    (0xC0921, "LOCKOUT", "lockout"),              # relayed by a resource manager
])
def test_error_translation(rc: int, kind: str, text: str,
                           caplog: pytest.LogCaptureFixture) -> None:
    err = translate(_Rc(rc), Ctx(Phase.OPERATION, "seal", "swtpm:port=1"))
    assert isinstance(err, TpmError) and isinstance(err, DeviceUnavailable)
    assert err.kind is Kind[kind]
    assert text in err.message and f"0x{rc:x}" in err.message
    if err.kind in (Kind.LOCKOUT, Kind.MEMORY):
        assert text.split()[0] in caplog.text          # the cause is logged
    start = translate(_Rc(rc), Ctx(Phase.STARTUP, "creating the primary", "swtpm:port=1"))
    assert isinstance(start, StartupError) and str(start).startswith("tpm.")


def test_refused_owner_auth_names_the_setting() -> None:
    err = translate(_Rc(0x98E), Ctx(Phase.STARTUP, "creating the primary", "device:/dev/tpm0"))
    assert isinstance(err, StartupError)
    assert str(err).startswith("tpm.owner_auth: the TPM at 'device:/dev/tpm0' refused")
    stale = translate(_Rc(0x1DF), Ctx(Phase.OPERATION, "context load", saved_context=True))
    assert isinstance(stale, TpmError) and stale.kind is Kind.STALE
