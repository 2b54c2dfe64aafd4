"""How a PostgreSQL database is named in messages (``describe_dsn``: never the password) and
how secrets are taken out of any text (``scrub_secrets``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from authority.errors import StartupError

_SECRET_KEYS: Final = ("password", "sslpassword")
_HIDDEN: Final = "********"
_ANYWHERE: Final = 6   # secrets this long are hidden wherever they appear in a message


def describe_dsn(dsn: str) -> str:
    """What names the database in messages: ``postgresql host=... port=... dbname=...
    user=...`` (never the password or other options).

    Raises: StartupError if ``dsn`` is not a connection string (without repeating it: a
    malformed one may hold a password).
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise StartupError("state store postgresql: the DSN is not a libpq connection string "
                           "or postgresql:// URI") from None
    shown = [f"{k}={params[k]}" for k in ("host", "port", "dbname", "user") if params.get(k)]
    return " ".join(["postgresql", *shown])


def scrub_secrets(text: str, dsn: str) -> str:
    """``text`` with the DSN, its password(s) and anything shaped ``password=...`` or
    ``//user:password@`` replaced by ``********``. Never raises."""
    hidden = [dsn]
    with contextlib.suppress(psycopg.Error):
        params = conninfo_to_dict(dsn)
        hidden += [str(params[k]) for k in _SECRET_KEYS if params.get(k)]
    hidden += re.findall(r"//[^/@:\s]*:([^@\s]+)@", dsn)   # a URI's password as written
    for secret in sorted({s for s in hidden if s}, key=len, reverse=True):
        if len(secret) >= _ANYWHERE:
            text = text.replace(secret, _HIDDEN)
        else:   # a short one only as a word of its own: "y" must not garble "directory"
            text = re.sub(rf"(?<![\w.-]){re.escape(secret)}(?![\w.-])", _HIDDEN, text)
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\1{_HIDDEN}", text,
                  flags=re.IGNORECASE)
    return re.sub(r"(//[^/@:\s]*:)[^@\s]+@", rf"\1{_HIDDEN}@", text)

