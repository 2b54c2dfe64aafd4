"""Nodes for the cluster KEK tests: each a process with its own embedded SoftHSM2 token in its own
directory (SoftHSM2 reads SOFTHSM2_CONF once per process, and keeps login state per process, as
separate machines would).

A node runs calls on its :class:`SecurityOfficer` or :class:`Pkcs11Backend` sent from the test
process; an authority error comes back as :class:`NodeError` naming its class.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from authority.backends.softhsm import SO_PIN_NAME, provision_embedded_token
from authority.config import Pkcs11Settings, Secret


class NodeError(Exception):
    """An exception raised in a node: ``kind`` is its class name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _serve(hsm_dir: Path, conn: Connection) -> None:
    """The node process: provision the token, then answer calls until told to stop."""
    from authority.backends.pkcs11 import Pkcs11Backend
    from authority.backends.pkcs11.officer import SecurityOfficer

    settings = provision_embedded_token(hsm_dir)
    so_pin = Secret((hsm_dir / SO_PIN_NAME).read_text("utf-8").strip())
    held: dict[str, Any] = {}
    conn.send(("ok", settings))
    while True:
        target, method, args = conn.recv()
        if target == "stop":
            for obj in held.values():
                obj.close()
            conn.send(("ok", None))
            return
        try:
            if method == "open":
                held[target] = (SecurityOfficer.open(settings.module, settings.softhsm2_conf,
                                                     settings.token_label, so_pin)
                                if target == "officer"   # per-node tokens: copies used
                                else Pkcs11Backend.open(replace(settings, per_node_keys=True)))
                result = None
            elif target == "probe":
                result = PROBES[method](settings, *args)
            elif method == "close":
                held.pop(target).close()
                result = None
            else:
                result = getattr(held[target], method)(*args)
            conn.send(("ok", result))
        except Exception as exc:  # every error goes back to the test
            conn.send(("err", (type(exc).__name__, str(exc))))


def _probe_key(settings: Pkcs11Settings, key_id: bytes) -> dict[str, str]:
    """In the node's process, beside its backend (whose user login is token-wide): what the
    token answers when the ticket key ``key_id``'s value is read, and when a fresh key that is
    not trusted (the user cannot make one trusted) tries to wrap it."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    lib = pkcs11.lib(os.path.realpath(settings.module))
    token = lib.get_token(token_label=settings.token_label)
    answers: dict[str, str] = {}
    with token.open(rw=True) as session:
        key = session.get_key(id=key_id, object_class=ObjectClass.SECRET_KEY)
        try:
            key[Attribute.VALUE]
            answers["value"] = "READ"
        except pkcs11.PKCS11Error as exc:
            answers["value"] = type(exc).__name__
        wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                       template={Attribute.WRAP: True})
        try:
            wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)
            answers["untrusted_wrap"] = "WRAPPED"
        except pkcs11.PKCS11Error as exc:
            answers["untrusted_wrap"] = type(exc).__name__
        try:
            session.generate_key(KeyType.AES, 256, store=False,
                                 template={Attribute.WRAP: True, Attribute.TRUSTED: True})
            answers["user_trusted"] = "MADE"
        except pkcs11.PKCS11Error as exc:
            answers["user_trusted"] = type(exc).__name__
        kek = session.get_key(label="ticket-authority-kek", object_class=ObjectClass.SECRET_KEY)
        try:
            kek[Attribute.VALUE]
            answers["kek_value"] = "READ"
        except pkcs11.PKCS11Error as exc:
            answers["kek_value"] = type(exc).__name__
    return answers


PROBES = {"key": _probe_key}


class Node:
    """One node process and its token."""

    def __init__(self, hsm_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(hsm_dir, child), daemon=True)
        self._process.start()
        self.settings: Pkcs11Settings = self._answer()

    def _answer(self, timeout: float = 60.0) -> Any:
        waited = 0.0
        while not self._conn.poll(0.2):
            waited += 0.2
            if not self._process.is_alive():
                raise NodeError("NodeDied", f"exit code {self._process.exitcode}")
            if waited > timeout:
                raise TimeoutError(f"node did not answer in {timeout} s")
        status, value = self._conn.recv()
        if status == "err":
            raise NodeError(*value)
        return value

    def officer(self, method: str, *args: Any) -> Any:
        """Call the node's SecurityOfficer (``open``/``close`` open and close it)."""
        self._conn.send(("officer", method, args))
        return self._answer()

    def backend(self, method: str, *args: Any) -> Any:
        """Call the node's Pkcs11Backend (``open``/``close`` open and close it)."""
        self._conn.send(("backend", method, args))
        return self._answer()

    def probe(self, method: str, *args: Any) -> Any:
        """Run one of :data:`PROBES` in the node's process."""
        self._conn.send(("probe", method, args))
        return self._answer()

    def stop(self) -> None:
        """Close what is open and end the process."""
        if self._process.is_alive():
            try:
                self._conn.send(("stop", "", ()))
                self._answer()
            except (OSError, EOFError, TimeoutError):
                pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)

    def pkcs11_tool(self, *args: str) -> str:
        """Run opensc's pkcs11-tool on this node's token (user login); its stdout."""
        tool = shutil.which("pkcs11-tool")
        assert tool is not None
        env = dict(os.environ, SOFTHSM2_CONF=str(self.settings.softhsm2_conf),
                   ITA_PIN=self.settings.pin.reveal())
        out = subprocess.run(
            [tool, "--module", str(self.settings.module), "--token-label",
             self.settings.token_label, "--login", "--pin", "env:ITA_PIN", *args],
            env=env, capture_output=True, text=True, timeout=60, check=True)
        return out.stdout
