"""One :class:`~authority.backends.pkcs11.officer.SecurityOfficer` call in a spawned child process.

PKCS#11 login state is per application (per process for SoftHSM2): while a server's
:class:`~authority.backends.pkcs11.Pkcs11Backend` holds the user login, an SO login in the same
process is refused (CKR_USER_ANOTHER_ALREADY_LOGGED_IN). :func:`run_officer` therefore runs the
SO's work in a fresh process, started with the "spawn" method: a forked copy of a process that
has the module loaded and initialised would inherit its state, which PKCS#11 forbids using.

The child receives the token's coordinates, the SO PIN, the method and its arguments through
the process pipe (never argv or the environment), opens the officer, makes the one call, closes
it and sends back the result or the error; the parent always reaps it.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

from authority import errors
from authority.config import Pkcs11Settings, Secret
from authority.errors import AuthorityError, ConfigError, DeviceUnavailable, StartupError

__all__ = ["ALLOWED", "run_officer"]

log = logging.getLogger("authority.backends.pkcs11")

#: the SecurityOfficer methods a child may run (a session transport key would die with the
#: child, so new_transport_key is not among them, and unwrap_kek needs a fingerprint)
ALLOWED: Final = frozenset({
    "wrap_kek_for", "make_kek", "destroy_kek", "kek_labels", "has_kek", "unwrap_kek",
    "has_transport_key", "drop_transport_key", "kek_attributes",
})
#: seconds to wait for a killed child to be reaped
_REAP_SECONDS: Final = 10.0
#: what crosses from the child: the errors.py class a raised error is (or derives from)
_CROSSING: Final = (AuthorityError, StartupError, ConfigError)

#: (module, SOFTHSM2_CONF, token label, SO PIN, method, args, kwargs)
Request = tuple[Path, Path | None, str, str, str, tuple[Any, ...], dict[str, Any]]


def run_officer(settings: Pkcs11Settings, so_pin: Secret, method: str, *args: Any,
                timeout: float = 60.0, **kwargs: Any) -> Any:
    """Run ``SecurityOfficer.<method>(*args, **kwargs)`` on the token of ``settings`` in a
    freshly spawned child process logged in as SO with ``so_pin``; return its result.

    Raises: ValueError (``method`` is not in :data:`ALLOWED`; unwrap_kek without a
    fingerprint); TypeError (arguments the method does not take); the errors.py class of an
    error raised in the child (AuthorityError, StartupError, ConfigError), with its message;
    DeviceUnavailable naming ``method`` (the child died, or did not answer in ``timeout``
    seconds: it is killed); RuntimeError (another exception in the child: a defect).
    """
    _check_call(method, args, kwargs)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_child, args=(theirs,), name=f"security-officer-{method}",
                            daemon=True)
    started = time.monotonic()
    try:
        child.start()
        theirs.close()
        request: Request = (settings.module, settings.softhsm2_conf, settings.token_label,
                            so_pin.reveal(), method, args, kwargs)
        try:
            ours.send(request)
        except OSError as exc:
            raise DeviceUnavailable(f"security officer {method}: its process did not take "
                                    f"the call ({type(exc).__name__})") from exc
        status, value = _answer(ours, child, method, timeout)
    finally:
        _reap(child)
        ours.close()
    log.debug("security officer %s ran in a child process in %.2f s", method,
              time.monotonic() - started)
    if status == "ok":
        return value
    if status == "err":
        raise _rebuild(*value)
    raise RuntimeError(f"security officer {method} failed in its process: {value}")


def _check_call(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a method not in :data:`ALLOWED`, arguments it does not take, and unwrap_kek
    without a fingerprint. Raises: ValueError; TypeError."""
    if method not in ALLOWED:
        raise ValueError(f"security officer method {method!r} cannot run in a child process "
                         f"(allowed: {', '.join(sorted(ALLOWED))})")
    from authority.backends.pkcs11.officer import SecurityOfficer

    bound = inspect.signature(getattr(SecurityOfficer, method)).bind(None, *args, **kwargs)
    if method == "unwrap_kek" and bound.arguments.get("fingerprint") is None:
        raise ValueError("unwrap_kek in a child process needs the fingerprint of a persistent "
                         "transport key (a session transport key dies with its process)")


def _answer(conn: Connection, child: BaseProcess, method: str, timeout: float) -> tuple[str, Any]:
    """The child's (status, value). Raises: DeviceUnavailable (it died or did not answer in
    ``timeout`` seconds)."""
    ready = wait([conn, child.sentinel], timeout=timeout)
    if conn in ready or conn.poll():
        try:
            answer: tuple[str, Any] = conn.recv()
            return answer
        except (EOFError, OSError):
            pass
    elif not ready:
        raise DeviceUnavailable(f"security officer {method}: no answer in {timeout:g} s; "
                                "its process was killed")
    child.join(_REAP_SECONDS)
    raise DeviceUnavailable(f"security officer {method}: its process died without answering "
                            f"(exit code {child.exitcode})")


def _reap(child: BaseProcess) -> None:
    """Kill ``child`` if it still runs and wait for it. Never raises."""
    try:
        if child.is_alive():
            child.kill()
        child.join(_REAP_SECONDS)
        if child.is_alive():
            log.error("security officer process %s did not end after SIGKILL", child.pid)
            return
        child.close()
    except (ValueError, AssertionError, OSError):
        # never started (start() failed), or already closed
        pass


def _describe(exc: BaseException) -> tuple[str, tuple[Any, ...]]:
    """The errors.py class ``exc`` is or derives from, and the arguments that rebuild it with
    the same message. Never raises."""
    base = next(c for c in type(exc).__mro__
                if c.__module__ == errors.__name__ and issubclass(c, _CROSSING))
    message = str(exc)
    if issubclass(base, errors.InvalidArgument):
        field = str(getattr(exc, "field", ""))
        return base.__name__, (field, message.removeprefix(f"{field}: "))
    if issubclass(base, ConfigError):
        setting = str(getattr(exc, "setting", ""))
        return base.__name__, (setting, message.removeprefix(f"{setting}: "))
    return base.__name__, (message,)


def _rebuild(name: str, args: tuple[Any, ...]) -> Exception:
    """The error the child described (:func:`_describe`). Never raises."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, _CROSSING)):
        return DeviceUnavailable(f"security officer: its process sent an unknown error {name}")
    rebuilt: Exception = cls(*args)
    return rebuilt


def _child(conn: Connection) -> None:
    """The child process: one call on a SecurityOfficer, its answer sent back."""
    try:
        module, conf, token, pin, method, args, kwargs = conn.recv()
        answer = _call(module, conf, token, Secret(pin), method, args, kwargs)
        try:
            conn.send(answer)
        except Exception as exc:  # an unpicklable result: a defect, said so
            conn.send(("bug", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _call(module: Path, conf: Path | None, token: str, so_pin: Secret, method: str,
          args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    """("ok", result), ("err", described error) or ("bug", text). Never raises."""
    from authority.backends.pkcs11.officer import SecurityOfficer

    try:
        if method not in ALLOWED:   # checked by the parent; the child does not trust the pipe
            raise ValueError(f"method {method!r} not allowed")
        with SecurityOfficer.open(module, conf, token, so_pin) as officer:
            return "ok", getattr(officer, method)(*args, **kwargs)
    except _CROSSING as exc:
        return "err", _describe(exc)
    except Exception as exc:  # every other failure goes back as a defect
        return "bug", f"{type(exc).__name__}: {exc}"
