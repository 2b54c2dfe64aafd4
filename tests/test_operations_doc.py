"""docs/operations.md stays operable: every alert's runbook names one of its sections, and every
`ticket-authority` command it shows is one the CLI has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from authority.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "operations.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_anchor_is_a_section_of_the_guide() -> None:
    anchors = {_anchor(m) for m in re.findall(r"^#+ (.+)$", GUIDE.read_text(), re.MULTILINE)}
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    runbooks = [r["annotations"]["runbook"] for g in rules["groups"] for r in g["rules"]]
    assert runbooks
    for runbook in runbooks:
        assert "docs/operations.md#" in runbook, runbook
        assert runbook.rsplit("#", 1)[1] in anchors, runbook


def _commands() -> list[list[str]]:
    """The `ticket-authority ...` lines of the guide's code blocks, placeholders filled."""
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    lines = [ln.split("#", 1)[0].strip() for b in blocks for ln in b.splitlines()]
    found = []
    for line in lines:
        words = shlex.split(line.replace("|", " ").replace("[", "").replace("]", ""))
        if words and words[0].endswith("ticket-authority") and "<" not in line:
            found.append(words[1:])
    return found


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_every_command_the_guide_shows_parses(argv: list[str]) -> None:
    fixed = [{"KEY_ID": "0011223344556677", "REALM": "", "HEX": "00", "SPI_I:SPI_R":
              "0000000000000001:0000000000000002", "ISO8601": "2026-01-01T00:00:00Z"}.get(a, a)
             for a in argv]
    if fixed[:2] == ["tickets", "revoke"]:
        fixed = ["tickets", "revoke", "--id-i", "00"]   # the guide lists the four selectors
    try:
        build_parser().parse_args(fixed)
    except SystemExit as done:               # --version prints and exits 0
        assert done.code == 0, fixed
