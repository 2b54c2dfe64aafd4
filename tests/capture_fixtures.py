"""A packet capture of the IKE traffic on an interface inside a network namespace (dumpcap,
as tshark captures), read back with tshark's ISAKMP dissector: one row per IKE message."""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

IKE_FILTER = "udp port 500 or udp port 4500"
SETTLE = 0.75    # seconds stop() waits: a packet sent just before SIGTERM was lost without it
EXCHANGE_NAMES = {34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA",
                  37: "INFORMATIONAL", 38: "IKE_SESSION_RESUME"}
TRANSFORM_FIELDS = {1: "isakmp.tf.id.encr", 2: "isakmp.tf.id.prf", 3: "isakmp.tf.id.integ",
                    4: "isakmp.tf.id.dh", 5: "isakmp.tf.id.esn"}   # by transform type
_FIELDS = ("frame.time_epoch", "ip.src", "ip.dst", "udp.srcport", "udp.dstport",
           "isakmp.exchangetype", "isakmp.flag_r", "isakmp.messageid", "isakmp.length",
           "isakmp.ispi", "isakmp.rspi", "isakmp.typepayload", "isakmp.notify.msgtype",
           "isakmp.prop.number", "isakmp.tf.type", *TRANSFORM_FIELDS.values(),
           "isakmp.ike2.attr.key_length", "isakmp.key_exchange.dh_group")


class CaptureError(RuntimeError):
    """dumpcap did not start or tshark could not read the capture."""


@dataclass(frozen=True)
class Message:
    """One IKE message as captured. ``payloads`` are the payload types tshark saw (inside
    an SK payload only the 46 itself; proposal 2 and transform 3 substructures included),
    ``notifies`` the notify message types in clear; for an SA payload in clear the number of
    proposals, the (type, id) of every transform and the key length attributes; the KE
    payload's group."""

    time: float
    src: str
    dst: str
    sport: int
    dport: int
    exchange: int
    is_response: bool
    message_id: int
    length: int
    spi_i: str
    spi_r: str
    payloads: tuple[int, ...]
    notifies: tuple[int, ...]
    proposals: int = 0
    transforms: tuple[tuple[int, int], ...] = ()
    key_lengths: tuple[int, ...] = ()
    ke_group: int | None = None

    def line(self) -> str:
        name = EXCHANGE_NAMES.get(self.exchange, str(self.exchange))
        kind = "response" if self.is_response else "request"
        return (f"{self.time:.6f} {self.src}:{self.sport} -> {self.dst}:{self.dport} "
                f"{name}({self.exchange}) {kind} mid={self.message_id} len={self.length} "
                f"spi={self.spi_i}/{self.spi_r} payloads={list(self.payloads)} "
                f"notifies={list(self.notifies)}"
                + (f" proposals={self.proposals} transforms={list(self.transforms)} "
                   f"key_lengths={list(self.key_lengths)}" if self.proposals else "")
                + (f" ke_group={self.ke_group}" if self.ke_group is not None else ""))


def installed(program: str, path: str | None) -> str:
    """``path`` (what shutil.which found for ``program``). Raises CaptureError when it is
    None: the program is missing (scripts/bootstrap --test installs it)."""
    if path is None:
        raise CaptureError(f"{program} is not installed (scripts/bootstrap --test installs it)")
    return path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v, 0) for v in text.split(",") if v)


def _transforms(types: str, ids: dict[int, list[int]]) -> tuple[tuple[int, int], ...]:
    """(type, id) pairs: tshark gives the types in order and the ids in one list per type."""
    pairs = []
    for kind in _ints(types):
        pairs.append((kind, ids[kind].pop(0) if ids.get(kind) else -1))
    return tuple(pairs)


def _message(row: str) -> Message:
    cells = row.split("\t")
    cells += [""] * (len(_FIELDS) - len(cells))
    (when, src, dst, sport, dport, exchange, response, mid, length, spi_i, spi_r, payloads,
     notifies, proposals, types) = cells[:15]
    ids = {kind: list(_ints(cells[15 + n])) for n, kind in enumerate(TRANSFORM_FIELDS)}
    key_lengths, group = cells[15 + len(TRANSFORM_FIELDS):][:2]
    return Message(time=float(when), src=src, dst=dst, sport=int(sport), dport=int(dport),
                   exchange=int(exchange, 0), is_response=response in ("1", "True"),
                   message_id=int(mid, 0), length=int(length, 0), spi_i=spi_i, spi_r=spi_r,
                   payloads=_ints(payloads), notifies=_ints(notifies),
                   proposals=len(_ints(proposals)), transforms=_transforms(types, ids),
                   key_lengths=_ints(key_lengths),
                   ke_group=int(group, 0) if group else None)


def read_messages(path: Path) -> list[Message]:
    """The IKE messages in the capture ``path``, in capture order.

    Raises CaptureError when tshark fails."""
    tshark = installed("tshark", shutil.which("tshark"))
    argv = [tshark, "-r", str(path), "-Y", "isakmp", "-T", "fields", "-E", "separator=/t",
            "-E", "occurrence=a", "-E", "aggregator=,"]
    for name in _FIELDS:
        argv += ["-e", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise CaptureError(f"tshark -r {path}: exit {done.returncode}: {done.stderr}")
    return [_message(row) for row in done.stdout.splitlines() if row.strip()]


class Capture:
    """dumpcap on ``interface`` inside ``namespace`` writing ``path`` (pcapng), IKE ports
    only. A context manager: start on enter, stop on exit."""

    def __init__(self, namespace: str, interface: str, path: Path,
                 capture_filter: str = IKE_FILTER) -> None:
        self.namespace = namespace
        self.interface = interface
        self.path = path
        self.capture_filter = capture_filter
        self._stderr = path.with_suffix(".dumpcap.log")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 15.0) -> None:
        """Start dumpcap and wait until it captures. Raises CaptureError when it exits or
        does not report capturing within ``timeout`` seconds."""
        dumpcap = installed("dumpcap", shutil.which("dumpcap"))
        argv = ["ip", "netns", "exec", self.namespace, dumpcap, "-q", "-i", self.interface,
                "-f", self.capture_filter, "-w", str(self.path)]
        with self._stderr.open("wb") as err:
            self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                             stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Capturing on" in self._stderr.read_text(errors="replace"):
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop(settle=0)
        raise CaptureError(f"dumpcap did not start capturing on {self.interface} in "
                           f"{self.namespace}: {self._stderr.read_text(errors='replace')}")

    def stop(self, settle: float = SETTLE, timeout: float = 10.0) -> None:
        """Stop dumpcap: after ``settle`` seconds (packets reach it in batches, a quarter of
        a second apart; what it has not received by SIGTERM is lost), SIGTERM (it writes out
        what it has); kill it after ``timeout`` seconds more. Safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        time.sleep(settle)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def exchanges(self) -> list[Message]:
        """The IKE messages captured so far (stop() first to have them all).

        Raises CaptureError when tshark cannot read the file."""
        return read_messages(self.path)

    def handshake(self, first_exchange: int, occurrence: int = 0,
                  timeout: float = 15.0) -> Handshake:
        """The handshake (see handshake()) once the capture file holds it: dumpcap writes
        what it captured about a second later, and what it has not written when stopped is
        lost, so wait for it before stop(). Raises CaptureError (with the messages
        captured) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return handshake(self.exchanges(), first_exchange, occurrence)
            except CaptureError as exc:
                if time.monotonic() > deadline:
                    raise CaptureError(f"{exc}\n{self.table()}") from None
            time.sleep(0.1)

    def table(self) -> str:
        """The captured messages as text lines, for an assertion's message."""
        return f"capture {self.path}:\n" + "\n".join(m.line() for m in self.exchanges())


@dataclass(frozen=True)
class Handshake:
    """The messages that brought up one IKE SA (same initiator SPI) through its IKE_AUTH
    response; the fragments of one message (same exchange, direction and id) are one
    message here, timed by its first fragment; ``end`` is the last fragment's time."""

    messages: tuple[Message, ...]
    end: float

    @property
    def exchanges(self) -> list[tuple[int, bool]]:
        """(exchange type, is_response) per message."""
        return [(m.exchange, m.is_response) for m in self.messages]

    @property
    def round_trips(self) -> int:
        return sum(1 for m in self.messages if m.is_response)

    @property
    def seconds(self) -> float:
        """From the first request's capture time to the end of the last response."""
        return self.end - self.messages[0].time

    @property
    def round_trip_seconds(self) -> list[float]:
        """Each request's time to its response, in order."""
        return [r.time - q.time for q, r in itertools.pairwise(self.messages)
                if not q.is_response and r.is_response and q.exchange == r.exchange]


def _key(m: Message) -> tuple[int, bool, int]:
    return m.exchange, m.is_response, m.message_id


def handshake(messages: list[Message], first_exchange: int, occurrence: int = 0) -> Handshake:
    """The ``occurrence``-th IKE SA whose first request is ``first_exchange`` (34 for a full
    exchange, 38 for a resumption), up to its IKE_AUTH response.

    Raises CaptureError when there is no such request or no IKE_AUTH response follows."""
    starts = [m for m in messages if m.exchange == first_exchange and not m.is_response]
    if len(starts) <= occurrence:
        raise CaptureError(f"no request #{occurrence} of exchange {first_exchange} captured")
    spi = starts[occurrence].spi_i
    frames = [m for m in messages if m.spi_i == spi and m.exchange in (first_exchange, 35)]
    kept: list[Message] = []
    for m in frames:
        if _key(m) not in {_key(k) for k in kept}:   # not a further fragment / retransmit
            kept.append(m)
        if m.exchange == 35 and m.is_response:
            end = max(f.time for f in frames if _key(f) == _key(m))
            return Handshake(tuple(kept), end)
    raise CaptureError(f"the IKE SA {spi} started by exchange {first_exchange} has no "
                       "IKE_AUTH response in the capture")
