"""What ``ticket-authority doctor`` found: one :class:`Check` per thing looked at, each with
its status and, unless it is fine, how to fix it; the exit code scripts read."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass


class Status(enum.IntEnum):
    """How one check came out; the worst one decides the exit code (``SKIP`` counts as OK)."""

    OK = 0
    SKIP = 0 - 1      # not applicable here (another backend, no [tls], ...)
    WARNING = 1       # works now, needs attention (a certificate expiring within 30 days)
    FAILURE = 2       # broken: serve would refuse to start or fail calls


_LABELS = {Status.OK: "ok", Status.SKIP: "skip", Status.WARNING: "warning",
           Status.FAILURE: "failure"}


@dataclass(frozen=True)
class Check:
    """One check: ``name`` ("device.login"), what was found, and for a warning or a failure
    the fix (``hint``). Never holds a secret (PIN, DSN password)."""

    name: str
    status: Status
    detail: str
    hint: str = ""

    @property
    def label(self) -> str:
        return _LABELS[self.status]


def ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def skip(name: str, detail: str) -> Check:
    return Check(name, Status.SKIP, detail)


def warning(name: str, detail: str, hint: str) -> Check:
    return Check(name, Status.WARNING, detail, hint)


def failure(name: str, detail: str, hint: str) -> Check:
    return Check(name, Status.FAILURE, detail, hint)


def worst(checks: list[Check]) -> int:
    """The exit code of ``checks``: 0 all OK or skipped, 1 a warning, 2 a failure."""
    return max([0, *(int(c.status) for c in checks)])


def as_text(checks: list[Check]) -> str:
    """One line per check (``[ ok ] name: detail``), the hint under it, and a summary."""
    lines = []
    for check in checks:
        lines.append(f"[{check.label:^7}] {check.name}: {check.detail}")
        if check.hint:
            lines.append(f"          fix: {check.hint}")
    code = worst(checks)
    counts = {label: sum(1 for c in checks if c.label == label) for label in _LABELS.values()}
    summary = ", ".join(f"{n} {label}" for label, n in counts.items() if n)
    verdict = {0: "all OK", 1: "warnings", 2: "failures"}[code]
    lines.append(f"doctor: {verdict} ({summary}); exit {code}")
    return "\n".join(lines) + "\n"


def as_json(checks: list[Check]) -> str:
    """``{"exit": N, "status": "ok"|"warning"|"failure", "checks": [{name, status, detail,
    hint}, ...]}``."""
    code = worst(checks)
    body = {"exit": code, "status": {0: "ok", 1: "warning", 2: "failure"}[code],
            "checks": [{**asdict(c), "status": c.label} for c in checks]}
    return json.dumps(body, indent=2) + "\n"
