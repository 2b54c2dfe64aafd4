"""libreswan 5.2 as a test peer: built once per machine from the vendored release tarball
(../shared/vendor, checked against its pinned sha256) into a cached throwaway prefix, and pluto
run in a network namespace (tests/netns_fixtures.py) with its own configuration, secrets, NSS
database and run directory, driven through whack on its control socket.

libreswan is only a peer the tests talk to; nothing of it is part of the product.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
VERSION = "5.2"
TARBALL = ROOT.parent / "shared" / "vendor" / f"libreswan-{VERSION}.tar.gz"
TARBALL_SHA256 = "c382bbd838c239f8d4c4e9cc320f3abf34f7b08e71d9e78ed029a96d963940ce"
BUILD_REVISION = 2          # part of the cached prefix's name: change it with make_variables
BUILD_TIMEOUT = 1800        # seconds: about one minute on 2 cores, much more on a loaded one
LOG_TAIL_LINES = 60
SUN_PATH_MAX = 107          # bytes of a unix socket's path (sockaddr_un.sun_path less the NUL)

# The test connection: what tests/test_interop_harness.py and the gateway interop test use.
CLIENT_ID = "@client.example"
GATEWAY_ID = "@gateway.example"
PROPOSAL = "aes_gcm256-sha2_256-dh19"   # ENCR_AES_GCM_16/256, PRF_HMAC_SHA2_256, DH 19
# the connection's message retransmission: first after 0.5 s, given up after 10 s; so a
# test waits at most that long for a peer that does not answer
RETRANSMIT = {"retransmit-interval": "500", "retransmit-timeout": "10s"}
# pluto 5.2 has no connection option for a childless IKE SA: this impairment makes it omit
# the Child SA payloads from IKE_AUTH, and expect none in the response
CHILDLESS = "omit-v2-ike-auth-child"
# The console lines libreswan's own test (testing/pluto/ikev2-resume-01-psk) expects
ESTABLISHED_PSK = "initiator established IKE SA; authenticated peer using authby=secret"
ESTABLISHED_RESUMED = "initiator established IKE SA; authenticated peer using authby=session-resume"
TICKET_RECEIVED = "received v2N_TICKET_LT_OPAQUE"
# pluto's own lines that end a negotiation as failed; waiting on stops there
FAILURE_MARKERS = ("EXPECTATION FAILED", "ASSERTION FAILED", "encountered fatal error",
                   "timeout exceeded", "authentication failed")
_LOG_TIME = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.\d+: ")


def console_lines(log: str) -> list[str]:
    """pluto's log lines that are not debugging ('| ...'), without their time stamps: what
    whack would have printed."""
    lines = (_LOG_TIME.sub("", line) for line in log.splitlines())
    return [line for line in lines if not line.startswith("|")]


class LibreswanError(RuntimeError):
    """Building libreswan, or running pluto or whack, failed."""


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------- the build

@dataclass(frozen=True)
class LibreswanPrefix:
    """An installed libreswan: the prefix and the programs the tests run."""

    root: Path

    @property
    def pluto(self) -> Path:
        return self.root / "libexec" / "ipsec" / "pluto"

    @property
    def whack(self) -> Path:
        return self.root / "libexec" / "ipsec" / "whack"

    @property
    def addconn(self) -> Path:
        return self.root / "libexec" / "ipsec" / "addconn"

    @property
    def ipsec(self) -> Path:
        return self.root / "sbin" / "ipsec"

    def programs(self) -> list[Path]:
        return [self.pluto, self.whack, self.addconn, self.ipsec]

    def complete(self) -> bool:
        """Whether every program is there and executable."""
        return all(os.access(p, os.X_OK) for p in self.programs())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$XDG_CACHE_HOME (else ~/.cache) / ike-ticket-authority."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ike-ticket-authority"


def make_variables(prefix: Path) -> list[str]:
    """The make variables of the build: systemd notification compiled in but no unit
    installed (INITSYSTEM=none does not build in 5.2), everything under ``prefix`` except the
    default run directory: its control socket's path is compiled into a sockaddr_un (at most
    107 bytes; a longer one is a compile error), and the tests always give their own."""
    return ["INITSYSTEM=systemd", "INSTALL_INITSYSTEM=false", f"PREFIX={prefix}",
            f"SYSCONFDIR={prefix}/etc", "RUNDIR=/run/pluto"]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_logged(argv: list[str], cwd: Path, log: Path) -> None:
    """Run ``argv`` in ``cwd``, appending its output to ``log``.

    Raises LibreswanError with the log's tail when it fails or times out."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        try:
            done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise LibreswanError(f"{argv[:2]} timed out after {BUILD_TIMEOUT}s; log {log}:\n"
                                 f"{tail(log.read_text())}") from None
    if done.returncode != 0:
        raise LibreswanError(f"{' '.join(argv[:2])} failed (exit {done.returncode}); "
                             f"log {log}:\n{tail(log.read_text())}")


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` must not be extracted (None when it may): an absolute name or one with a
    ``..`` part, a link whose target is absolute or leaves the tree, anything but a regular
    file, a directory or a link. A member under a symbolic link is refused by the caller."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        return "its name leaves the target directory"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "it is neither a regular file, a directory nor a link"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath()
        if target.is_absolute() or _escapes(base / target):
            return f"it links to {member.linkname!r}, outside the target directory"
    return None


def _escapes(path: PurePosixPath) -> bool:
    """Whether the relative ``path``, its ``..`` parts resolved in order, climbs above its root."""
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def extract_source(tarball: Path, dest: Path) -> None:
    """Unpack ``tarball`` into ``dest`` after checking every member (_member_problem), on any
    Python 3.11: the ``filter="data"`` argument is used where tarfile has it (3.11.4 and
    later) and is absent from Debian 12's 3.11.2, so the check is ours on both.

    Raises LibreswanError naming the first refused member; nothing is written then."""
    with tarfile.open(tarball) as archive:
        members = archive.getmembers()
        links = {PurePosixPath(m.name) for m in members if m.issym()}
        for member in members:
            problem = _member_problem(member)
            if problem is None and links.intersection(PurePosixPath(member.name).parents):
                problem = "its path goes through a symbolic link of the archive"
            if problem is not None:
                raise LibreswanError(f"{tarball}: member {member.name!r} refused: {problem}")
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, members, filter="data")
        else:
            archive.extractall(dest, members)  # noqa: S202 - every member checked above


def _build_into(tarball: Path, target: Path, log: Path) -> None:
    """Extract the tarball into a temporary directory beside ``target``, build, install with
    DESTDIR into that directory and rename the installed tree to ``target`` (atomic: a
    half-built prefix is never at ``target``). Raises LibreswanError on failure."""
    with tempfile.TemporaryDirectory(prefix=f".build-{target.name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        extract_source(tarball, work / "src")
        source = work / "src" / f"libreswan-{VERSION}"
        variables = make_variables(target)
        jobs = f"-j{max(1, min(os.cpu_count() or 1, 4))}"
        log.write_text("")
        make = installed("make", shutil.which("make"))
        _run_logged([make, jobs, "base", *variables], source, log)
        stage = work / "stage"
        _run_logged([make, "install-base", *variables, f"DESTDIR={stage}"], source, log)
        tree = stage / target.relative_to("/")
        if not LibreswanPrefix(tree).complete():
            raise LibreswanError(f"make install-base left no pluto/whack/addconn/ipsec under "
                                 f"{tree}; log {log}:\n{tail(log.read_text())}")
        tree.rename(target)


def build_libreswan(tarball: Path = TARBALL, expected_sha256: str = TARBALL_SHA256,
                    cache: Path | None = None) -> LibreswanPrefix:
    """The libreswan prefix for ``tarball``, built on first use into
    ``cache``/libreswan-VERSION-<sha12>-b<BUILD_REVISION> (one build per machine; a lock
    keeps two processes from building at once).

    Raises LibreswanError when the tarball is missing or its sha256 differs, or when the
    build fails (with the build log's tail)."""
    if not tarball.is_file():
        raise LibreswanError(f"{tarball} is missing (see ../shared/vendor/README.md)")
    actual = sha256_of(tarball)
    if actual != expected_sha256:
        raise LibreswanError(f"{tarball}: sha256 {actual}, expected {expected_sha256}")
    cache = cache_dir() if cache is None else cache
    target = cache / f"libreswan-{VERSION}-{expected_sha256[:12]}-b{BUILD_REVISION}"
    prefix = LibreswanPrefix(target)
    if prefix.complete():
        return prefix
    with _locked(cache / f"{target.name}.lock"):
        if prefix.complete():              # another process built it while this one waited
            return prefix
        if target.exists():                # cannot be half built: only a rename puts it there
            raise LibreswanError(f"{target} exists but lacks a program; remove it to rebuild")
        _build_into(tarball, target, cache / f"{target.name}.build.log")
    return prefix


# ---------------------------------------------------------------------------- pluto

def conn_text(name: str, *, local: str, remote: str, local_id: str = CLIENT_ID,
              remote_id: str = GATEWAY_ID, proposal: str = PROPOSAL,
              resumption: bool = True, extra: Mapping[str, str] | None = None) -> str:
    """An ipsec.conf ``conn`` section: IKEv2 with a pre-shared key between ``local`` (left)
    and ``remote`` (right), ``proposal`` as the only IKE proposal, session resumption
    (RFC 5723) on or off, added but never started by itself (auto=ignore), with short
    retransmissions (RETRANSMIT); ``extra`` adds or overrides options."""
    options = {"keyexchange": "ikev2", "left": local, "leftid": local_id, "right": remote,
               "rightid": remote_id, "authby": "secret", "ike": proposal,
               "session-resumption": "yes" if resumption else "no", "auto": "ignore",
               **RETRANSMIT, **(extra or {})}
    return f"conn {name}\n" + "".join(f"\t{key}={value}\n" for key, value in options.items())


def secrets_text(local_id: str, remote_id: str, psk: str) -> str:
    """An ipsec.secrets line giving ``psk`` for the pair of ids."""
    if '"' in psk or "\n" in psk:
        raise ValueError("the PSK must not contain a double quote or a newline")
    return f'{local_id} {remote_id} : PSK "{psk}"\n'


class Pluto:
    """One pluto in ``namespace`` with its files under ``workdir``: ipsec.conf (config setup
    and the conns given), ipsec.secrets, an empty NSS database, a run directory (its control
    socket) and pluto.log.

    Use as a context manager, or call start() and stop()."""

    def __init__(self, prefix: LibreswanPrefix, namespace: str, workdir: Path,
                 conns: Sequence[str], secrets: str, debug: str = "all") -> None:
        self.prefix = prefix
        self.namespace = namespace
        self.workdir = workdir
        self.conf = workdir / "ipsec.conf"
        self.secrets = workdir / "ipsec.secrets"
        self.nssdir = workdir / "nss"
        self.rundir = workdir / "run"
        self._own_rundir = len(bytes(self.rundir / "pluto.ctl")) > SUN_PATH_MAX
        if self._own_rundir:     # the control socket's path would not fit a sockaddr_un
            self.rundir = Path(tempfile.mkdtemp(prefix="pluto-run-"))
        self.ctl = self.rundir / "pluto.ctl"
        self.log = workdir / "pluto.log"
        self.stdout = workdir / "pluto.stdout"
        self._conns = list(conns)
        self._secrets_text = secrets
        self._debug = debug
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Pluto:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def _write_files(self) -> None:
        for directory in (self.workdir, self.nssdir, self.rundir, self.workdir / "ipsec.d"):
            directory.mkdir(parents=True, exist_ok=True)
        setup = {"logfile": str(self.log), "logappend": "no", "logtime": "yes",
                 "plutodebug": self._debug, "nssdir": str(self.nssdir),
                 "secretsfile": str(self.secrets), "ipsecdir": str(self.workdir / "ipsec.d"),
                 "dumpdir": str(self.rundir)}
        self.conf.write_text("config setup\n"
                             + "".join(f"\t{k}={v}\n" for k, v in setup.items() if v)
                             + "\n" + "\n".join(self._conns))
        fd = os.open(self.secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._secrets_text)
        certutil = installed("certutil", shutil.which("certutil"))
        _check([certutil, "-N", "-d", f"sql:{self.nssdir}", "--empty-password"],
               "certutil -N (the NSS database)")

    def start(self, timeout: float = 20.0) -> None:
        """Write the files, start pluto in the namespace and wait for its control socket to
        answer. Raises LibreswanError (with the log's tail) when it does not within
        ``timeout`` seconds (pluto is stopped then) or exits."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self._write_files()
        argv = ["ip", "netns", "exec", self.namespace, str(self.prefix.pluto),
                "--config", str(self.conf), "--nofork", "--rundir", str(self.rundir)]
        # the updown script pluto runs calls `ipsec`: the prefix's, not one on this machine
        env = {**os.environ, "PATH": f"{self.prefix.root / 'sbin'}:{os.environ['PATH']}"}
        with self.stdout.open("wb") as out:
            self._process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LibreswanError(f"pluto exited {self._process.returncode}:\n"
                                     f"{self.stdout.read_text()}\n{tail(self.log_text())}")
            if self.ctl.exists() and self.whack_run(["--status"], timeout=5).returncode == 0:
                return
            time.sleep(0.05)
        raise LibreswanError(f"pluto's control socket did not answer in {timeout}s:\n"
                             f"{tail(self.log_text())}")

    def whack_run(self, args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``whack ARGS`` on this pluto's control socket (stdout and stderr together).

        Raises LibreswanError when it does not end within ``timeout`` seconds."""
        argv = [str(self.prefix.whack), "--rundir", str(self.rundir), "--ctlsocket",
                str(self.ctl), *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise LibreswanError(f"whack {' '.join(args)} did not end in {timeout}s; pluto log:"
                                 f"\n{tail(self.log_text())}") from exc

    def whack(self, *args: str, timeout: float = 30.0) -> str:
        """``whack ARGS``'s output. Raises LibreswanError (with pluto's log tail) when it
        exits non-zero or does not end within ``timeout`` seconds."""
        done = self.whack_run(list(args), timeout=timeout)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise LibreswanError(f"whack {' '.join(args)}: exit {done.returncode}:\n{output}\n"
                                 f"pluto log:\n{tail(self.log_text())}")
        return output

    def add(self, conn: str) -> str:
        """Load connection ``conn`` from ipsec.conf (addconn). Raises LibreswanError."""
        argv = [str(self.prefix.addconn), "--config", str(self.conf), "--ctlsocket",
                str(self.ctl), conn]
        return _check(argv, f"addconn {conn}")

    def impair(self, *behaviours: str) -> str:
        """``whack --impair B`` for each behaviour (global to this pluto)."""
        args: list[str] = []
        for behaviour in behaviours:
            args += ["--impair", behaviour]
        return self.whack(*args)

    def initiate(self, conn: str, expect: Sequence[str] = (TICKET_RECEIVED,),
                 timeout: float = 30.0) -> str:
        """Bring ``conn`` up and return pluto's console lines from then on, once each line of
        ``expect`` is among them.

        Asynchronous (whack --initiate --asynchronous), then pluto's log is read: a
        synchronous whack waits for the Child SA, and a resumed IKE_AUTH asks for one even
        with omit-v2-ike-auth-child (see CHILDLESS), so it would wait for ever. Raises
        LibreswanError when a FAILURE_MARKERS line comes first, or after ``timeout``
        seconds."""
        mark = self.mark()
        self.whack("--name", conn, "--initiate", "--asynchronous")
        return self.wait_for(expect, mark, timeout)

    def mark(self) -> int:
        """A position in pluto's log, for wait_for and console_since."""
        return self.log.stat().st_size if self.log.exists() else 0

    def console_since(self, mark: int) -> str:
        """pluto's console lines written after ``mark``."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return "\n".join(console_lines(text))

    def wait_for(self, expect: Sequence[str], mark: int, timeout: float = 30.0,
                 failures: Sequence[str] = FAILURE_MARKERS) -> str:
        """Wait until each of ``expect`` is in pluto's console lines after ``mark``; return
        those lines. Raises LibreswanError when a ``failures`` line appears first (pass ()
        when pluto is expected to fail on its way, e.g. before a fallback), when pluto exits,
        or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_since(mark)
            if all(line in text for line in expect):
                return text
            failed = [m for m in failures if m in text]
            if failed or time.monotonic() > deadline or not self.running():
                why = (f"pluto logged {failed}" if failed else
                       "pluto exited" if not self.running() else f"{timeout}s passed")
                raise LibreswanError(f"waiting for {list(expect)}: {why}; pluto said:\n{text}")
            time.sleep(0.02)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def suspend(self, conn: str) -> str:
        """Drop ``conn``'s IKE SA but keep its resumption ticket (whack --suspend)."""
        return self.whack("--suspend", "--name", conn)

    def showstates(self) -> str:
        return self.whack("--showstates")

    def trafficstatus(self) -> str:
        return self.whack("--trafficstatus")

    def status(self) -> str:
        return self.whack("--status")

    def connectionstatus(self) -> str:
        return self.whack("--connectionstatus")

    def log_text(self) -> str:
        """pluto's log so far ('' before it wrote one)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Shut pluto down (whack --shutdown), kill it when it has not exited within
        ``timeout`` seconds. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                self.whack_run(["--shutdown"], timeout=timeout)
                process.wait(timeout=timeout)
            except (LibreswanError, subprocess.TimeoutExpired):
                process.kill()
                process.wait(timeout=timeout)
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)


def _check(argv: list[str], what: str) -> str:
    """Run ``argv``; its output. Raises LibreswanError with it when it exits non-zero."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise LibreswanError(f"{what}: exit {done.returncode}:\n{output}")
    return output


def installed(program: str, path: str | None) -> str:
    """``path`` (what shutil.which found for ``program``). Raises LibreswanError when it is
    None: the program is missing (scripts/bootstrap --test installs it)."""
    if path is None:
        raise LibreswanError(f"{program} is not installed (scripts/bootstrap --test installs it)")
    return path
