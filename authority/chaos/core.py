"""What a chaos scenario reports, and the table ``ticket-authority chaos`` prints."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Outcome:
    """One scenario's result. ``held``: every expectation of the scenario was met (0 wrong
    answers, 0 acknowledged consumes lost, recovery within its bound, its own checks);
    ``checks`` lists each expectation and whether it held, ``figures`` what was measured."""

    scenario: str
    injected: str
    calls: int = 0
    wrong: int = 0
    lost: int = 0
    recovery_s: float | None = None
    held: bool = False
    checks: list[tuple[str, bool]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    def check(self, what: str, ok: bool) -> bool:
        """Record one expectation; returns ``ok``."""
        self.checks.append((what, bool(ok)))
        return bool(ok)

    def conclude(self) -> Outcome:
        """``held`` from the counts and the checks; returns self."""
        self.held = self.wrong == 0 and self.lost == 0 and all(ok for _, ok in self.checks)
        return self


#: a scenario: run in a fresh work directory; ``quick`` for CI (shorter, fewer repetitions)
Scenario = Callable[[Path, bool], Outcome]


def table(outcomes: Sequence[Outcome]) -> str:
    """The table ``chaos`` prints: one row per scenario, then each failed check."""
    rows = [("SCENARIO", "INJECTED", "CALLS", "WRONG", "LOST ACKED CONSUMES", "RECOVERY",
             "HELD")]
    for o in outcomes:
        rows.append((o.scenario, o.injected, str(o.calls), str(o.wrong), str(o.lost),
                     "-" if o.recovery_s is None else f"{o.recovery_s:.2f} s",
                     "yes" if o.held else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for o in outcomes:
        failed = [what for what, ok in o.checks if not ok]
        for what in failed:
            lines.append(f"  {o.scenario}: did not hold: {what}")
        if o.detail and not o.held:
            lines.append(f"  {o.scenario}: {o.detail}")
    return "\n".join(lines)


def as_json(outcomes: Sequence[Outcome]) -> str:
    """The outcomes as JSON (``--json``)."""
    return json.dumps([asdict(o) for o in outcomes], indent=2)
