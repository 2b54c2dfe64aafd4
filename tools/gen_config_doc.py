"""Generate docs/configuration.md, the reference of every setting, from the settings schema.

What it reads: the keys the loader accepts (authority/settings_loader.py: ``_TOP``,
``_SECTIONS`` and the per-table key sets), each key's type and default (the dataclasses in
authority/config.py), what it does (the comment after each field in authority/config.py, read
with ast and tokenize; a table's text is its class docstring), which flag of ``serve``
overrides it (``load_config``'s keyword parameters and the ``serve`` parser). What it cannot
read, the values the validation accepts, is written down once, in ``SPECS`` below;
tests/test_config_doc.py checks each entry's examples against the loader.

Run after adding or changing a setting:  python tools/gen_config_doc.py
tests/test_config_doc.py fails while the committed file differs from what this writes, and when
a key the loader accepts is missing from it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
CONFIG_SOURCE = ROOT / "authority" / "config.py"
COMMAND = "python tools/gen_config_doc.py"
WIDTH = 100


@dataclass(frozen=True)
class Spec:
    """What the validation accepts for one key, written here once (the generator cannot read
    it from the validation code). ``refused``: values that load_config must refuse with a
    ConfigError naming this key (the other settings at their defaults); ``accepted``: values it
    must load; tests/test_config_doc.py checks both. ``type`` and ``default`` replace what the
    dataclasses say, where the TOML key differs from the field."""

    allowed: str
    refused: tuple[Any, ...] = ()
    accepted: tuple[Any, ...] = ()
    type: str | None = None
    default: str | None = None


_SECONDS = "> 0 (seconds)"
_NEVER_OR_SECONDS = "0 (never) or > 0 (seconds)"
_PATH = "a file path"
_PIN_ONE_OF = "exactly one of pin, pin_file, pin_env"
_DSN_ONE_OF = "exactly one of dsn, dsn_file, dsn_env"

#: every key the loader accepts, by its dotted name
SPECS: dict[str, Spec] = {
    # -- top level --
    "state_dir": Spec("a directory path (created if missing)",
                      default="`$TICKET_AUTHORITY_STATE_DIR`, else "
                              "`$XDG_STATE_HOME/ticket-authority` (`~/.local/state/...`)"),
    "backend": Spec('"pkcs11" or "tpm"', refused=("hsm",), accepted=("pkcs11", "tpm")),
    "log_level": Spec('"DEBUG", "INFO", "WARNING" or "ERROR" (any case)',
                      refused=("TRACE",), accepted=("debug", "ERROR")),
    "log_format": Spec('"text" or "json" (one JSON event per line: authority/logs.py)',
                       refused=("JSON", "xml"), accepted=("text", "json")),
    "store_synchronous": Spec('"NORMAL" or "FULL" (any case); SQLite only',
                              refused=("OFF",), accepted=("full", "NORMAL")),
    "audit_log": Spec("a non-empty file path, relative to the config file's directory",
                      refused=("",), accepted=("audit.log",),
                      default="`state_dir/audit.log`"),
    # -- [server] --
    "server.listen": Spec("`HOST:PORT` or `[v6]:PORT`, port 0..65535; beyond loopback only with "
                          "[tls] and client certificates",
                          refused=("0.0.0.0:50051", "localhost", "127.0.0.1:65536"),
                          accepted=("127.0.0.1:0", "[::1]:50051", "localhost:50051")),
    "server.workers": Spec("> 0", refused=(0,), accepted=(1,)),
    "server.max_message_bytes": Spec("> 0 (bytes)", refused=(0,), accepted=(1 << 20,)),
    "server.max_batch_items": Spec("> 0", refused=(0,), accepted=(1,)),
    "server.grace_seconds": Spec("a number of seconds (not range-checked)", accepted=(0, 30)),
    "server.metrics_listen": Spec('`HOST:PORT` (any address: it serves metrics only) or "" '
                                  "(off); with `processes` > 1 port + processes - 1 <= 65535",
                                  refused=("9464", "127.0.0.1:http"),
                                  accepted=("", "0.0.0.0:9464")),
    "server.admin_listen": Spec('"" (on `listen`), `unix:PATH` or a loopback `HOST:PORT`',
                                refused=("0.0.0.0:50052", "unix:", "unix://x"),
                                accepted=("", "unix:/run/ticket-authority/admin.sock",
                                          "127.0.0.1:50052")),
    "server.rate_limit_per_s": Spec("0 (off) or > 0 (requests per second)",
                                    refused=(-1,), accepted=(0, 0.5)),
    "server.rate_burst": Spec("> 0", refused=(0,), accepted=(1,)),
    "server.max_concurrent_rpcs": Spec("> 0", refused=(0,), accepted=(1,)),
    "server.mode": Spec('"auto", "aio" or "threads"', refused=("fast",),
                        accepted=("auto", "aio", "threads")),
    "server.device_calls": Spec('"auto", "inline" or "offload"', refused=("async",),
                                accepted=("auto", "inline", "offload")),
    "server.device_processes": Spec('"auto" or 0..64; with backend tpm "auto", 0 or 1',
                                    refused=(-1, 65, "many"), accepted=("auto", 0, 64)),
    "server.request_timeout": Spec(_SECONDS, refused=(0,), accepted=(0.5,)),
    "server.stream_idle_timeout": Spec(_SECONDS, refused=(0,), accepted=(0.5,)),
    "server.max_calls_per_client": Spec('"auto" or >= 1; on the thread-pool server below '
                                        "`workers`", refused=(0, "none"),
                                        accepted=("auto", 1)),
    "server.max_streams_per_connection": Spec("> 0", refused=(0,), accepted=(1,)),
    "server.connection_idle_timeout": Spec(_NEVER_OR_SECONDS, refused=(-1,), accepted=(0,)),
    "server.connection_max_age": Spec(_NEVER_OR_SECONDS, refused=(-1,), accepted=(0,)),
    "server.connection_age_grace": Spec("0 or > 0 (seconds)", refused=(-1,), accepted=(0,)),
    "server.processes": Spec('"auto" or 1..64; 1 with backend tpm or cluster.per_node_tokens',
                             refused=(0, 65), accepted=("auto", 1, 64)),
    "server.replica_watchdog": Spec('"auto" or 1..86400 (seconds)', refused=(0.5, 86401, "off"),
                                    accepted=("auto", 1, 86400)),
    # -- [tickets] --
    "tickets.default_lifetime": Spec("> 0 (seconds), at most `tickets.max_lifetime`",
                                     refused=(0, 8 * 3600 + 1), accepted=(1, 8 * 3600)),
    "tickets.max_lifetime": Spec("1..604800 (seconds, 7 days), at least "
                                 "`tickets.default_lifetime`",
                                 refused=(0, 604801), accepted=(3600, 604800)),
    # -- [keys] --
    "keys.rotation_period": Spec("0 (never) or > 0 (seconds)", refused=(-1,), accepted=(0,)),
    "keys.max_seals_per_key": Spec("1..2^32 (AES-GCM random-nonce budget)",
                                   refused=(0, 2**32 + 1), accepted=(1, 2**32)),
    "keys.seal_reservation": Spec("> 0", refused=(0,), accepted=(1,)),
    "keys.maintenance_interval": Spec(_SECONDS, refused=(0,), accepted=(0.1,)),
    "keys.publish_delay": Spec("0 (seal at once) or > 0 (seconds)", refused=(-1,),
                               accepted=(0,)),
    # -- [pkcs11] --
    "pkcs11.module": Spec("required: a non-empty path", refused=("",),
                          accepted=("/usr/lib/softhsm/libsofthsm2.so",), type="string (path)"),
    "pkcs11.token_label": Spec("required: a non-empty string", refused=("",),
                               accepted=("ticket-authority",)),
    "pkcs11.pin": Spec(f"{_PIN_ONE_OF}; inline logs a warning (prefer pin_file or pin_env)",
                       default=f"required ({_PIN_ONE_OF})"),
    "pkcs11.pin_file": Spec(f"a readable file; {_PIN_ONE_OF}"),
    "pkcs11.pin_env": Spec(f"the name of a set environment variable; {_PIN_ONE_OF}"),
    "pkcs11.sessions": Spec("> 0", refused=(0,), accepted=(1,)),
    "pkcs11.session_timeout": Spec(_SECONDS, refused=(0,), accepted=(0.1,)),
    "pkcs11.softhsm2_conf": Spec(_PATH, accepted=("/etc/softhsm/softhsm2.conf",)),
    "pkcs11.so_pin_file": Spec("a readable file; not with so_pin_env"),
    "pkcs11.so_pin_env": Spec("the name of a set environment variable; not with so_pin_file"),
    # -- [tpm] --
    "tpm.tcti": Spec("a non-empty TCTI string", refused=("",),
                     accepted=("device:/dev/tpmrm0", "swtpm:port=2321")),
    "tpm.key_dir": Spec("a directory path", accepted=("/var/lib/ticket-authority/tpm-keys",)),
    "tpm.owner_auth_file": Spec("a readable file; not with owner_auth_env"),
    "tpm.owner_auth_env": Spec("the name of a set environment variable; not with "
                               "owner_auth_file", refused=("TICKET_AUTHORITY_UNSET_VARIABLE",)),
    "tpm.retries": Spec(">= 0", refused=(-1,), accepted=(0,)),
    "tpm.queue_size": Spec("> 0", refused=(0,), accepted=(1,)),
    "tpm.call_timeout": Spec(_SECONDS, refused=(0,), accepted=(0.1,)),
    "tpm.parent": Spec("a persistent handle 0x81000000..0x81FFFFFF (a TOML hex integer)",
                       refused=(0x80FFFFFF, 0x82000000, "0x81000001"),
                       accepted=(0x81000000, 0x81FFFFFF)),
    # -- [tls] --
    "tls.cert_file": Spec("required: a PEM certificate chain, relative to the config file's "
                          "directory; its first certificate matches `key_file`"),
    "tls.key_file": Spec("required: an unencrypted PEM private key, relative to the config "
                         "file's directory"),
    "tls.client_ca_file": Spec("required: PEM certificates, relative to the config file's "
                               "directory"),
    "tls.trust_domain": Spec("required: a bare name (no `/` or `:`)",
                             refused=("", "example.org/x", "spiffe:x"),
                             accepted=("example.org",)),
    "tls.require_client_cert": Spec("true, or false on a loopback `server.listen` only",
                                    refused=("yes",), accepted=(True, False)),
    "tls.role_map": Spec('a non-empty table of URI pattern = "gateway" or "admin"; patterns: '
                         "`{trust_domain}` is replaced, `*` matches one path segment; tried in "
                         "order", type="table (pattern = role)", refused=({}, "admin"),
                         accepted=({"spiffe://{trust_domain}/ops/*": "admin"},)),
    "tls.realms": Spec('a table of URI pattern = [realm, ...] ("" is the default realm); '
                       "first match wins", type="table (pattern = list of strings)",
                       refused=(["east"],),
                       accepted=({"spiffe://{trust_domain}/gw/e-*": ["east", ""]},)),
    # -- [postgresql] --
    "postgresql.dsn": Spec("a libpq `key=value ...` string or `postgresql://` URI; "
                           f"{_DSN_ONE_OF}; not with backend tpm", refused=("", "not a dsn"),
                           accepted=("postgresql://db.example.org/authority",),
                           default=f"required ({_DSN_ONE_OF})"),
    "postgresql.dsn_file": Spec(f"a readable file holding a DSN; {_DSN_ONE_OF}"),
    "postgresql.dsn_env": Spec(f"the name of a set environment variable; {_DSN_ONE_OF}"),
    "postgresql.pool_size": Spec("> 0", refused=(0,), accepted=(1,)),
    "postgresql.statement_timeout": Spec(_SECONDS, refused=(0,), accepted=(0.5,)),
    "postgresql.connect_timeout": Spec(_SECONDS, refused=(0,), accepted=(0.5,)),
    # -- [cluster] --
    "cluster.heartbeat_interval": Spec("> 0 (seconds), at most half of `replica_timeout`, "
                                       "`lease_duration` and `store.max_staleness`",
                                       refused=(0,), accepted=(0.5, 2.5)),
    "cluster.replica_timeout": Spec(">= 2 x `heartbeat_interval` (seconds)",
                                    refused=(1.9,), accepted=(2,)),
    "cluster.lease_duration": Spec(">= 2 x `heartbeat_interval` (seconds)",
                                   refused=(1.9,), accepted=(2,)),
    "cluster.per_node_tokens": Spec("true only with [postgresql], backend pkcs11 and "
                                    '`server.processes` 1 or "auto"', refused=(True, "yes"),
                                    accepted=(False,)),
    "cluster.node_name": Spec("any string", accepted=("", "node-a")),
    # -- [store] --
    "store.max_staleness": Spec(">= 2 x `cluster.heartbeat_interval` (seconds)",
                                refused=(1.9,), accepted=(2,)),
}


@dataclass(frozen=True)
class Key:
    """One documented key: its dotted name and the cells of its table."""

    name: str
    type: str
    default: str
    allowed: str
    secret: str
    flag: str
    text: str


@dataclass(frozen=True)
class Table:
    """A TOML table (``[server]``) and its keys; the top level has the name ""."""

    name: str
    text: str
    keys: tuple[Key, ...]


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment after the field: on its line and on the comment-only lines
    right below it indented deeper than the field."""
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            row = item.end_lineno or item.lineno
            if row not in comments:
                continue
            parts = [comments[row][1]]
            row += 1
            while (row in comments and lines[row - 1].lstrip().startswith("#")
                   and comments[row][0] > item.col_offset):
                parts.append(comments[row][1])
                row += 1
            out[(node.name, item.target.id)] = " ".join(parts)
    return out


def _sentence(text: str) -> str:
    """``text`` as a sentence: a capital first letter unless it starts with a literal or a
    label (``aio: ...``), and a final full stop."""
    first = text.split(" ", 1)[0]
    if first.isalpha() and first.islower():
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _markdown(text: str) -> str:
    """reST literals (````x````) as Markdown code."""
    return text.replace("``", "`")


def _toml_value(value: Any) -> str:
    """A default as TOML writes it. Raises: ValueError for a value it cannot write."""
    from authority.config import Secret

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple):
        pairs = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if isinstance(value, Secret) and not value.reveal():
        return ""
    raise ValueError(f"cannot write {value!r} as TOML")


def _type_name(hint: Any, dotted: str) -> str:
    """The TOML type of a field's annotation. Raises: ValueError for one it does not know."""
    from authority import settings_loader
    from authority.config import Secret

    kinds = [a for a in (get_args(hint) if isinstance(hint, types.UnionType) else (hint,))
             if a is not type(None)]
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             Path: "string (path)", Secret: "string"}
    if len(kinds) == 1 and kinds[0] in names:
        return names[kinds[0]]
    if dotted in settings_loader._AUTO_OR_INT:
        return '"auto" or integer'
    if dotted in settings_loader._AUTO_OR_SECONDS:
        return '"auto" or number'
    raise ValueError(f"{dotted}: no TOML type for {hint!r}: give Spec(type=...) in {__file__}")


def override_flags() -> dict[str, str]:
    """Dotted key -> the ``serve`` flag that overrides it: ``load_config``'s keyword
    parameters, each a top-level key or the one section field of that name.

    Raises: ValueError when a parameter has no key or no ``serve`` flag."""
    from authority.cli import build_parser
    from authority.settings_loader import _SECTIONS, load_config

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    options = {a.dest: " ".join(filter(None, (a.option_strings[0], a.metavar)))
               for a in serve._actions if a.option_strings}
    out: dict[str, str] = {}
    for name, param in inspect.signature(load_config).parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        keys = [name] if name in SPECS else [
            f"{section}.{name}" for section, cls in _SECTIONS.items()
            if name in {f.name for f in dataclasses.fields(cls)}]
        if len(keys) != 1 or name not in options:
            raise ValueError(f"load_config({name}=...): no single key or no serve flag")
        out[keys[0]] = f"`serve {options[name]}`"
    return out


def table_classes() -> dict[str, tuple[type, set[str]]]:
    """Table name -> (its dataclass, the keys the loader accepts in it), in Config's order.

    Raises: ValueError for a table of ``_TOP`` this does not know the key set of."""
    from authority import settings_loader as loader
    from authority.config import Config

    explicit = {"pkcs11": loader._PKCS11_KEYS, "tpm": loader._TPM_KEYS,
                "tls": loader._TLS_KEYS, "postgresql": loader._POSTGRES_KEYS}
    hints = get_type_hints(Config)
    out: dict[str, tuple[type, set[str]]] = {}
    for f in dataclasses.fields(Config):
        cls = _dataclass_of(hints[f.name])
        if f.name not in loader._TOP or cls is None:
            continue
        if f.name in loader._SECTIONS:
            out[f.name] = (cls, {g.name for g in dataclasses.fields(cls)})
        elif f.name in explicit:
            out[f.name] = (cls, set(explicit[f.name]))
        else:
            raise ValueError(f"[{f.name}]: add its key set to table_classes() in {__file__}")
    return out


def _dataclass_of(hint: Any) -> type | None:
    kinds = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    found = [k for k in kinds if dataclasses.is_dataclass(k) and isinstance(k, type)]
    return found[0] if found else None


def _ordered(cls: type, accepted: set[str]) -> list[tuple[str, dataclasses.Field[Any]]]:
    """The accepted keys in field order, each with the field it sets (``pin_file`` and
    ``pin_env`` right after ``pin``). Raises: ValueError for a key that sets no field."""
    out = []
    for f in dataclasses.fields(cls):
        out += [(key, f) for key in (f.name, f"{f.name}_file", f"{f.name}_env")
                if key in accepted]
    left = accepted - {key for key, _ in out}
    if left:
        raise ValueError(f"{cls.__name__}: keys {sorted(left)} set no field of the same name")
    return out


class Generator:
    """Builds the document from the loaded modules and ``SPECS``."""

    def __init__(self) -> None:
        self.comments = field_comments(CONFIG_SOURCE.read_text())
        self.flags = override_flags()

    def key(self, dotted: str, owner: type, f: dataclasses.Field[Any]) -> Key:
        """The documented key ``dotted``, which sets field ``f`` of ``owner``.

        Raises: ValueError when ``SPECS`` lacks the key or the field has no comment."""
        from authority.config import Secret

        spec = SPECS.get(dotted)
        if spec is None:
            raise ValueError(f"{dotted}: accepted by the loader but not in SPECS ({__file__}): "
                             "write down what it accepts, then run " + COMMAND)
        text = self.comments.get((owner.__name__, f.name))
        if text is None:
            raise ValueError(f"{dotted}: authority/config.py has no comment after "
                             f"{owner.__name__}.{f.name}")
        hint = get_type_hints(owner)[f.name]
        secret_field = Secret in (get_args(hint) or (hint,))
        name = dotted.rsplit(".", 1)[-1]
        source = name[len(f.name) + 1:]   # "file" for pin_file, "env" for pin_env, else ""
        return Key(dotted, spec.type or self._type(source, hint, dotted),
                   spec.default or self._default(source, f), spec.allowed,
                   self._secret(source, secret_field), self.flags.get(dotted, "none"),
                   self._text(source, text))

    @staticmethod
    def _type(source: str, hint: Any, dotted: str) -> str:
        if source == "file":
            return "string (path)"
        if source == "env":
            return "string (variable name)"
        return _type_name(hint, dotted)

    @staticmethod
    def _default(source: str, f: dataclasses.Field[Any]) -> str:
        if source or f.default is None:
            return "unset"
        if f.default is dataclasses.MISSING:
            return "required"
        value = _toml_value(f.default)
        return f"`{value}`" if value else "unset"

    @staticmethod
    def _secret(source: str, secret_field: bool) -> str:
        if not secret_field:
            return "no"
        if source == "file":
            return "no: names the file holding the secret"
        if source == "env":
            return "no: names the variable holding the secret"
        return "yes: never logged or shown"

    @staticmethod
    def _text(source: str, comment: str) -> str:
        comment = _sentence(comment.replace("None:", "unset:"))
        if source == "file":
            return f"Read from this file (surrounding whitespace stripped): {comment}"
        if source == "env":
            return ("Read once at start from the environment variable named here, which is then "
                    "removed from the environment and zeroed in `/proc/PID/environ`; no child "
                    f"process inherits it: {comment}")
        return comment

    def tables(self) -> list[Table]:
        """The top-level keys, then each table, in Config's field order."""
        from authority import settings_loader as loader
        from authority.config import Config

        classes = table_classes()
        top = [self.key(f.name, Config, f) for f in dataclasses.fields(Config)
               if f.name in loader._TOP and f.name not in classes]
        out = [Table("", "Keys outside any table.", tuple(top))]
        config_fields = {f.name: f for f in dataclasses.fields(Config)}
        for name, (cls, accepted) in classes.items():
            intro = inspect.getdoc(cls) or ""
            note = self.comments.get(("Config", config_fields[name].name))
            if note:
                intro += "\n\n" + _sentence(note.replace("None:", "Without the table:"))
            keys = tuple(self.key(f"{name}.{key}", cls, f) for key, f in _ordered(cls, accepted))
            out.append(Table(name, intro, keys))
        return out


INTRO = f"""\
# Configuration reference

<!-- Generated by tools/gen_config_doc.py from authority/config.py and
authority/settings_loader.py: do not edit; run `{COMMAND}`. -->

Every setting of `ticket-authority serve`, from the settings schema: the keys of the TOML file
given with `--config FILE`, each with its type, its default, the values the validation accepts,
whether it is a secret, the flag that overrides it, and what it does. Precedence: defaults <
the TOML file < flags. An unknown key, a value of the wrong type or one out of range stops
start-up with the setting's name (`ticket-authority: tickets.max_lifetime: must be positive, got
-1`, exit status 2). Secrets (the PIN, the TPM owner authorisation, the PostgreSQL DSN) never
appear in logs, reprs or error messages; prefer their `_file` or `_env` forms to inline values.
An example file: [hsm-config/authority.example.toml](../hsm-config/authority.example.toml).
"""


def render(tables: list[Table]) -> str:
    """The Markdown document."""
    names = ", ".join(f"`[{t.name}]`" for t in tables if t.name)
    out = [INTRO, _paragraphs(f"Top-level keys, then the tables {names}.") + "\n"]
    for table in tables:
        heading = f"`[{table.name}]`" if table.name else "Top-level keys"
        out.append(f"## {heading}\n\n{_paragraphs(table.text)}\n")
        for key in table.keys:
            out.append(_render_key(key))
    return "\n".join(out)


def _render_key(key: Key) -> str:
    cells = [key.type, key.default, key.allowed, key.secret, key.flag]
    row = " | ".join(_markdown(c).replace("|", "\\|") for c in cells)
    return (f"### `{key.name}`\n\n{_paragraphs(_markdown(key.text))}\n\n"
            "| Type | Default | Allowed | Secret | Flag |\n|---|---|---|---|---|\n"
            f"| {row} |\n")


def _paragraphs(text: str) -> str:
    """``text`` wrapped at WIDTH, its blank-line-separated paragraphs kept."""
    return "\n\n".join(textwrap.fill(" ".join(p.split()), WIDTH, break_on_hyphens=False,
                                     break_long_words=False)
                       for p in _markdown(text).split("\n\n"))


def generate() -> str:
    """The document as it should be committed. Raises: ValueError naming what is missing."""
    return render(Generator().tables())


def main() -> int:
    """Write docs/configuration.md; 1 (and why, on stderr) when a key cannot be documented."""
    try:
        text = generate()
    except ValueError as exc:
        print(f"gen_config_doc: {exc}", file=sys.stderr)
        return 1
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
