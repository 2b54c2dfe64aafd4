"""The server under test as a subprocess (so that client and server do not share a GIL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import authority
from authority.errors import StartupError

#: the first line of ``announce`` in authority/service/server.py
BANNER = re.compile(r"listening on (\S+)")
_CONFIG = '[server]\nmetrics_listen = ""\nmode = "{mode}"\n'  # no fixed /metrics port


@dataclass
class ServerProcess:
    """A ``ticket-authority serve`` child process and where it listens."""

    proc: subprocess.Popen[str]
    address: str
    log_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The server's process id (for /proc readings and py-spy)."""
        return self.proc.pid

    @classmethod
    def start(cls, state_dir: Path, backend: str, mode: str = "aio",
              timeout: float = 120.0, processes: int | None = None,
              tables: str = "") -> ServerProcess:
        """Start ``python -m authority.cli serve`` on a free loopback port and wait for its
        banner. The first start on a state dir provisions the embedded token. ``processes``:
        its server.processes (None: the default); above 1 the pid is the supervisor's.
        ``tables``: more of its config file (``[postgresql]``).

        Raises: StartupError (with the tail of the server log) if it exits or stays silent.
        """
        config = state_dir / "bench-server.toml"
        config.write_text(_CONFIG.format(mode=mode)
                          + ("" if processes is None else f"processes = {processes}\n")
                          + tables)
        log_path = state_dir / "bench-server.log"
        cmd = [sys.executable, "-m", "authority.cli", "serve", "--state-dir", str(state_dir),
               "--listen", "127.0.0.1:0", "--config", str(config), "--backend", backend,
               "--log-level", "WARNING"]
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                    env=child_env(), start_new_session=True)
        running = cls(proc, "", log_path)
        found = threading.Event()
        assert proc.stdout is not None
        reader = threading.Thread(target=running._read, args=(proc.stdout, found),
                                  name="server-stdout", daemon=True)
        reader.start()
        if not found.wait(timeout) or not running.address:
            running.stop(timeout=5)
            raise StartupError(f"the server did not start: {running.log_tail()}")
        return running

    def _read(self, out: IO[str], found: threading.Event) -> None:
        for line in out:
            self.lines.append(line.rstrip("\n"))
            match = BANNER.search(line)
            if match and not self.address:
                self.address = match.group(1)
                found.set()
        found.set()  # EOF: the process ended

    def log_tail(self, lines: int = 8) -> str:
        """The last lines the server logged (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def child_env() -> dict[str, str]:
    """Our environment, with this ``authority`` package first on the path of the child."""
    env = dict(os.environ)
    root = str(Path(authority.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
