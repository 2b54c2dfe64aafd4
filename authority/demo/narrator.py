"""Readable, numbered output of the demo, safe to call from the gateway threads."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Narrator:
    """Numbered steps and indented lines, sent to ``out`` and kept in ``lines``."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._step = 0
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        """One line as is. Raises whatever ``out`` raises."""
        with self._lock:
            self.lines.append(line)
            self._out(line)

    def step(self, title: str) -> None:
        """A new numbered step: ``[3] Gateway A dies``."""
        with self._lock:
            self._step += 1
            number = self._step
        self.emit(f"[{number}] {title}")

    def say(self, who: str, text: str) -> None:
        """An indented line attributed to ``who`` (a column of its own)."""
        self.emit(f"    {who:<24} {text}")

    def more(self, text: str) -> None:
        """A continuation line under the previous ``say``."""
        self.emit(f"    {'':<24} {text}")
