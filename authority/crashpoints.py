"""Crash points: a TEST SEAM that kills the server (SIGKILL, as ``kill -9``) at a named point
of a key's life, so that the chaos scenario ``rotation-kill`` (authority/chaos/rotation_kill.py)
can check what a restart finds after a crash exactly there.

An operator never sets it. ``TICKET_AUTHORITY_CRASH_AT=<point>[:<n>]`` in the environment of
``ticket-authority serve`` is read once at start (:func:`arm_from_environment`, called by the
``serve`` command only, which logs a warning when it is set) and removed from the environment;
the process then kills itself the ``n``-th time (default 1) it reaches ``<point>``. Unset (the
default, and in every process that did not arm it), :func:`reached` is a module-level ``None``
check and nothing else. Only a ``serve`` of one process is armed: with ``server.processes`` > 1
the variable is removed before the replicas start, so none of them inherits it.

The points, in the order a rotation and a destruction reach them (authority/keyring/
lifecycle.py):

* ``rotate.before_create``: the new key's CREATING record is stored, the key is not yet made
  in the device;
* ``rotate.after_create``: the key is made in the device, not yet published (the ring's
  compare-and-swap not yet committed);
* ``rotate.after_record``: the rotation is committed (the new key PENDING or ACTIVE), the
  call has not answered;
* ``destroy.after_device``: a retired (or expired) key is destroyed in the device, its record
  not yet DESTROYED.
"""

from __future__ import annotations

import logging
import os
import signal

from authority.errors import ConfigError

log = logging.getLogger(__name__)

#: the environment variable (a test seam: never set in production)
VARIABLE = "TICKET_AUTHORITY_CRASH_AT"

ROTATE_BEFORE_CREATE = "rotate.before_create"
ROTATE_AFTER_CREATE = "rotate.after_create"
ROTATE_AFTER_RECORD = "rotate.after_record"
DESTROY_AFTER_DEVICE = "destroy.after_device"
#: every point, in the order a rotation then a destruction reach them
POINTS = (ROTATE_BEFORE_CREATE, ROTATE_AFTER_CREATE, ROTATE_AFTER_RECORD, DESTROY_AFTER_DEVICE)

#: the armed point, None: disarmed (the default); the times it is yet to be reached, the kill
#: at the last
_armed: str | None = None
_remaining = 0


def parse(text: str) -> tuple[str, int]:
    """``<point>[:<n>]`` as (point, n). Raises: ConfigError naming the variable (an unknown
    point, ``n`` not a whole number of at least 1)."""
    point, _, count = text.strip().partition(":")
    if point not in POINTS:
        raise ConfigError(VARIABLE, f"unknown crash point {point!r}; known: {', '.join(POINTS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(VARIABLE, f"{point}: the count must be a whole number of at least 1, "
                                    f"got {count!r}")
    return point, n


def arm(point: str, n: int = 1) -> None:
    """Kill this process the ``n``-th time it reaches ``point`` from now on. Raises:
    ConfigError (see :func:`parse`)."""
    global _armed, _remaining
    _armed, _remaining = parse(f"{point}:{n}")


def disarm() -> None:
    """Reach every point without consequence again. Never raises."""
    global _armed
    _armed = None


def arm_from_environment() -> str | None:
    """Arm from ``TICKET_AUTHORITY_CRASH_AT`` if set (removed from the environment: children
    do not inherit it); returns what was armed, None if unset. Raises: ConfigError."""
    text = os.environ.pop(VARIABLE, None)
    if not text:
        return None
    point, n = parse(text)
    arm(point, n)
    log.warning("%s=%s: TEST SEAM armed: this process kills itself (SIGKILL) when it reaches "
                "%s (time %d); never set it in production", VARIABLE, text, point, n)
    return f"{point}:{n}"


def reached(point: str) -> None:
    """Called at ``point``: nothing unless armed for it; armed, the ``n``-th call SIGKILLs this
    process (no clean-up, no flush: as ``kill -9``). Never returns then."""
    if _armed is None:
        return
    _reach(point)


def _reach(point: str) -> None:
    global _remaining
    if point != _armed:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
