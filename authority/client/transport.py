"""Channel set-up (TLS, mTLS, the loopback-only plaintext rule) and the retry bookkeeping shared
by the sync and asyncio clients."""

from __future__ import annotations

import ipaddress
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from authority.client.errors import (
    AuthorityDeadlineExceeded,
    AuthorityRejected,
    AuthorityUnavailable,
    PlaintextRefused,
)

_SCHEMES = ("dns:///", "dns:", "ipv4:", "ipv6:")
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")
_SYSTEM_RANDOM = secrets.SystemRandom()


@dataclass(frozen=True)
class ClientTls:
    """TLS towards the authority.

    ``ca_file``: PEM roots that sign the server's certificate (None: the system roots).
    ``cert_file`` + ``key_file``: the client's certificate chain and key, for mTLS (both or
    neither). ``server_name``: the name to check the server's certificate against when it differs
    from the address's host (e.g. connecting to an IP address)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    @property
    def mutual(self) -> bool:
        """A client certificate is presented."""
        return self.cert_file is not None

    def credentials(self) -> Any:
        """``grpc.ssl_channel_credentials`` from the files.

        Raises ValueError when only one of cert_file / key_file is given; OSError when a file
        cannot be read."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("ClientTls: give both cert_file and key_file (mTLS) or neither")
        roots = Path(self.ca_file).read_bytes() if self.ca_file is not None else None
        chain = Path(self.cert_file).read_bytes() if self.cert_file is not None else None
        key = Path(self.key_file).read_bytes() if self.key_file is not None else None
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key,
                                            certificate_chain=chain)

    def options(self) -> list[tuple[str, Any]]:
        """Channel options for the server name override (none without one). Never raises."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: before retry n (1, 2, ...) sleep a uniformly random
    time in [0, min(cap, base * multiplier ** (n - 1))) seconds."""

    base: float = 0.05
    multiplier: float = 2.0
    cap: float = 1.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap <= 0 or self.multiplier < 1:
            raise ValueError("Backoff: base and cap must be positive, multiplier at least 1")

    def ceiling(self, retry: int) -> float:
        """The largest sleep before retry ``retry`` (1-based). Never raises."""
        return float(min(self.cap, self.base * self.multiplier ** max(0, retry - 1)))

    def delay(self, retry: int, fraction: float) -> float:
        """The sleep before retry ``retry`` for a random ``fraction`` in [0, 1). Never raises."""
        return self.ceiling(retry) * min(max(fraction, 0.0), 1.0)


def host_of(address: str) -> str:
    """The host part of a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``,
    ``ipv4:a.b.c.d:port``). Never raises."""
    target = address.strip()
    for scheme in _SCHEMES:
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    target = target.split(",")[0]  # ipv4:a:1,b:2 lists: judge by the first
    if target.startswith("["):
        return target[1:target.find("]")] if "]" in target else target[1:]
    if target.count(":") > 1:  # a bare IPv6 address without a port
        return target
    return target.rpartition(":")[0] if ":" in target else target


def is_loopback(address: str) -> bool:
    """True for a target that cannot leave the host: a loopback IP, ``localhost`` or a Unix
    socket. Never raises."""
    if address.startswith(_LOCAL_SCHEMES):
        return True
    host = host_of(address).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(address: str) -> None:
    """Raises PlaintextRefused unless plaintext to ``address`` stays on this host."""
    if not is_loopback(address):
        raise PlaintextRefused(
            f"refusing plaintext gRPC to {address}: not a loopback address; ticket requests "
            f"carry SK_d in the clear without TLS. Pass tls=ClientTls(ca_file=..., "
            f"cert_file=..., key_file=...)")


def channel_options(backoff: Backoff, tls: ClientTls | None,
                    extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """gRPC channel options: reconnect backoff in step with the client's, the TLS name
    override, then the caller's own options (which win). Never raises."""
    options: list[tuple[str, Any]] = [
        ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff.base * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(backoff.cap * 1000))),
    ]
    if tls is not None:
        options += tls.options()
    return options + list(extra)


class ClientSettings:
    """What both clients (sync and asyncio) keep: where, how, and how patiently."""

    address: str
    tls: ClientTls | None
    timeout: float
    retries: int
    backoff: Backoff
    max_batch_items: int
    coalesce_window: float

    def _settle(self, address: str, tls: ClientTls | None, timeout: float, retries: int,
                backoff: Backoff | None, max_batch_items: int,
                options: Sequence[tuple[str, Any]],
                coalesce_window: float = 0.0) -> list[tuple[str, Any]]:
        """Check and keep the settings; returns the channel options.

        Raises ValueError (bad settings, ``coalesce_window`` named when it is the bad one),
        PlaintextRefused (no ``tls`` and a non-loopback address)."""
        check_settings(timeout, retries, max_batch_items)
        check_window(coalesce_window, timeout)
        self.coalesce_window = float(coalesce_window)
        self.address = address
        self.tls = tls
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.max_batch_items = max_batch_items
        opts = channel_options(self.backoff, tls, options)
        if tls is None:
            check_plaintext(address)
        return opts


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in slices of at most ``size`` (one batch message each). Never raises."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def check_window(window: float, timeout: float) -> None:
    """Raises ValueError naming ``coalesce_window`` unless it is 0 (off) or a finite number of
    seconds from 0 up to (not including) ``timeout``."""
    if isinstance(window, bool) or not isinstance(window, int | float) \
            or not (math.isfinite(window) and 0 <= window < timeout):
        raise ValueError(f"coalesce_window must be 0 (off) or seconds below timeout "
                         f"({timeout:g}), got {window!r}")


def check_settings(timeout: float, retries: int, max_batch_items: int) -> None:
    """Raises ValueError for a non-positive timeout, negative retries or batch size under 1."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    if max_batch_items < 1:
        raise ValueError(f"max_batch_items must be at least 1, got {max_batch_items}")


class RetryLoop:
    """The bookkeeping of one client call: its deadline, its attempts and the retry rule.

    ``idempotent`` calls are retried on UNAVAILABLE whatever its cause. Other calls are retried
    only after ``not_connected`` (nothing was sent); an UNAVAILABLE answer to a request that was
    sent ends them. Nothing else is ever retried."""

    def __init__(self, method: str, idempotent: bool, retries: int, backoff: Backoff,
                 budget: float, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = _SYSTEM_RANDOM.random) -> None:
        self.method = method
        self.idempotent = idempotent
        self.retries = retries
        self.backoff = backoff
        self.clock = clock
        self.rand = rand
        self.deadline = clock() + budget
        self.budget = budget
        self.attempts = 0

    def remaining(self) -> float:
        """Seconds left before the deadline.

        Raises AuthorityDeadlineExceeded if none are left."""
        left = self.deadline - self.clock()
        if left <= 0:
            raise AuthorityDeadlineExceeded(
                self.method, grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {self.budget:g} s", max(1, self.attempts))
        return left

    def not_connected(self, details: str) -> float:
        """Record an attempt that failed before anything was sent; the sleep before the next.

        Raises AuthorityUnavailable (maybe_sent False) when no retry is left or fits."""
        self.attempts += 1
        return self._next(grpc.StatusCode.UNAVAILABLE, details, maybe_sent=False)

    def sending(self) -> None:
        """Record an attempt about to be sent. Never raises."""
        self.attempts += 1

    def failed(self, err: Any) -> float:
        """Classify a failed attempt (a ``grpc.RpcError``); the sleep before the next attempt.

        Raises AuthorityDeadlineExceeded (DEADLINE_EXCEEDED), AuthorityRejected (any status but
        UNAVAILABLE), AuthorityUnavailable (UNAVAILABLE of a non-idempotent call, or no retry
        left or fitting before the deadline)."""
        code = err.code()
        details = err.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise AuthorityDeadlineExceeded(self.method, code, details, self.attempts)
        if code != grpc.StatusCode.UNAVAILABLE:
            raise AuthorityRejected(self.method, code, details, self.attempts)
        if not self.idempotent:
            raise AuthorityUnavailable(
                self.method, code, f"{details} (not retried: the request may have reached the "
                                   f"authority and the call is not idempotent)", self.attempts)
        return self._next(code, details, maybe_sent=True)

    def _next(self, code: Any, details: str, maybe_sent: bool) -> float:
        if self.attempts > self.retries:
            raise AuthorityUnavailable(self.method, code, details, self.attempts, maybe_sent)
        delay = self.backoff.delay(self.attempts, self.rand())
        if self.clock() + delay >= self.deadline:
            raise AuthorityUnavailable(
                self.method, code, f"{details} (no time left for a retry within "
                                   f"{self.budget:g} s)", self.attempts, maybe_sent)
        return delay
