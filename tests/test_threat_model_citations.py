"""docs/threat-model.md cites the test behind each claim: every cited test must exist.

A citation is ``tests/test_x.py::name`` or, after one in the same paragraph, ``::name`` (same
file). A parametrised test is cited by its function name. A renamed or deleted test makes a
claim unsupported: this fails until the document is corrected.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "threat-model.md"
_CITE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def _citations(text: str) -> list[tuple[str, str | None]]:
    """(file, test name or None) for every citation, ``::name`` resolved against the last file
    cited in the same paragraph."""
    found: list[tuple[str, str | None]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        current: str | None = None
        for match in _CITE.finditer(paragraph):
            path, name = match.group(1), match.group(2)
            if path is None and name is None:
                continue
            if path is not None:
                current = path
            assert current is not None, f"::{name} with no file before it in: {paragraph[:80]}"
            found.append((current, name))
    return found


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_the_citation_reader_resolves_short_forms() -> None:
    text = "a (`tests/test_a.py::one`, `::two`) b `tests/test_b.py`\n\nc `x = 1`"
    assert _citations(text) == [("tests/test_a.py", "one"), ("tests/test_a.py", "two"),
                                ("tests/test_b.py", None)]


def test_every_cited_test_exists() -> None:
    citations = _citations(DOC.read_text())
    assert len(citations) > 40   # the document cites its tests; an empty parse is a bug here
    missing = []
    for path, name in citations:
        file = ROOT / path
        if not file.is_file():
            missing.append(path)
        elif name is not None and name not in _test_names(file):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/threat-model.md cites tests that do not exist: {missing}"
