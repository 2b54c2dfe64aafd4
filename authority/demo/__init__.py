"""The resumption demo: an initiator and two gateways exchange real IKE_SESSION_RESUME and
IKE_AUTH messages over UDP on 127.0.0.1, with the ticket authority in between (see
``authority.demo.runner``).

    from authority.demo import run_demo
    result = run_demo()            # starts an embedded authority; prints each step
    assert result.ok

Command line: ``python -m authority.demo [--authority HOST:PORT]`` (or ``ticket-authority demo``).
"""

from __future__ import annotations

from authority.demo.runner import (
    DemoResult,
    configure_parser,
    embedded_authority,
    main,
    run_command,
    run_demo,
)

__all__ = ["DemoResult", "configure_parser", "embedded_authority", "main", "run_command",
           "run_demo"]
