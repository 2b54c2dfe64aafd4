"""docs/configuration.md: exactly what tools/gen_config_doc.py writes, every key the loader
accepts in it, and the values it says are allowed the ones the loader accepts."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest

from authority import settings_loader as loader
from authority.certs import init_dev_pki
from authority.config import Config
from authority.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
REFRESH = "regenerate with: python tools/gen_config_doc.py"


def _generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_doc",
                                                  ROOT / "tools" / "gen_config_doc.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_doc"] = module
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def accepted_keys() -> set[str]:
    """Every dotted key load_config accepts, from the loader's own sets and dataclasses: a
    top-level name of ``_TOP`` whose Config field is not a settings table, and each table's
    keys (``_SECTIONS``: the dataclass's fields; the others: their key sets). A table this
    does not know fails the test until it is added here and documented."""
    key_sets = {"pkcs11": loader._PKCS11_KEYS, "tpm": loader._TPM_KEYS,
                "tls": loader._TLS_KEYS, "postgresql": loader._POSTGRES_KEYS}
    hints = get_type_hints(Config)
    keys: set[str] = set()
    for name in loader._TOP:
        hint = hints[name]
        kinds = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not any(dataclasses.is_dataclass(k) for k in kinds):
            keys.add(name)
        elif name in loader._SECTIONS:
            keys |= {f"{name}.{f.name}" for f in dataclasses.fields(loader._SECTIONS[name])}
        else:
            assert name in key_sets, f"[{name}]: a new table; add its key set to this test"
            keys |= {f"{name}.{key}" for key in key_sets[name]}
    return keys


def documented_keys(text: str) -> list[str]:
    """The keys with a heading of their own in the document."""
    return re.findall(r"^### `([a-z0-9_.]+)`$", text, flags=re.MULTILINE)


def test_the_committed_document_is_what_the_generator_writes() -> None:
    fresh = GEN.generate()
    assert DOC.read_text() == fresh, f"docs/configuration.md is stale: {REFRESH}"


def test_every_key_the_loader_accepts_is_documented_once() -> None:
    documented = documented_keys(DOC.read_text())
    accepted = accepted_keys()
    assert len(accepted) > 60
    assert len(documented) == len(set(documented)), "a key documented twice"
    missing = sorted(accepted - set(documented))
    assert not missing, f"not in docs/configuration.md: {missing}; {REFRESH}"
    stale = sorted(set(documented) - accepted)
    assert not stale, f"documented but not accepted by the loader: {stale}; {REFRESH}"


def test_every_documented_key_has_a_type_default_allowed_values_and_a_description() -> None:
    blocks = DOC.read_text().split("\n### ")[1:]
    assert len(blocks) == len(accepted_keys())
    for block in blocks:
        name, text, table = _block(block)
        cells = table[2].strip("|").split(" | ")
        assert table[0] == "| Type | Default | Allowed | Secret | Flag |", name
        assert len(cells) == 5 and all(c.strip() for c in cells), name
        assert len(text) >= 10, f"{name}: no description"


def _block(block: str) -> tuple[str, str, list[str]]:
    head, text, table = block.split("\n\n")[:3]
    return head.strip("`"), text, table.splitlines()


def test_secrets_and_flags_are_marked() -> None:
    cells = {name: table[2] for name, _, table in map(_block, DOC.read_text().split("\n### ")[1:])}
    for secret in ("pkcs11.pin", "postgresql.dsn"):
        assert "| yes: never logged or shown |" in cells[secret]
    assert "names the variable holding the secret" in cells["tpm.owner_auth_env"]
    assert "| no |" in cells["server.workers"]
    assert cells["server.listen"].endswith("| `serve --listen HOST:PORT` |")
    assert cells["state_dir"].endswith("| `serve --state-dir DIR` |")
    assert cells["server.workers"].endswith("| none |")


def test_every_accepted_key_has_a_spec_and_no_spec_is_stale() -> None:
    assert set(GEN.SPECS) == accepted_keys()


def test_a_key_without_a_spec_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = dict(GEN.SPECS)
    del specs["server.workers"]
    monkeypatch.setattr(GEN, "SPECS", specs)
    with pytest.raises(ValueError, match=r"server\.workers: accepted by the loader but not in "
                                         r"SPECS"):
        GEN.generate()


def test_comments_are_read_with_their_continuation_lines_only() -> None:
    source = ("class A:\n"
              "    x: int = 1   # first line\n"
              "                 # second line\n"
              "    # -- a heading, not x's --\n"
              "    y: str = '#not a comment'\n"
              "    z: int = 2  # z\n")
    assert GEN.field_comments(source) == {("A", "x"): "first line second line",
                                          ("A", "z"): "z"}


# -- the allowed values, checked against the loader --

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The other required keys of each table, so that one key can be probed alone."""
    tmp = tmp_path_factory.mktemp("config-doc")
    pki = init_dev_pki(tmp / "pki")
    pin = tmp / "pin"
    pin.write_text("1234\n")
    return {
        "pkcs11": {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t",
                   "pin_file": str(pin)},
        "tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                "client_ca_file": str(pki.ca_cert), "trust_domain": pki.trust_domain},
        "postgresql": {"dsn": "host=localhost dbname=authority"},
    }


def _load(tmp_path: Path, bases: dict[str, dict[str, Any]], key: str, value: Any) -> Config:
    """load_config on a file that sets ``key`` to ``value`` (and its table's required keys).
    Raises: ConfigError from the loader."""
    table, _, name = key.rpartition(".")
    if not table:
        body = f"{name} = {_toml(value)}\n"
    else:
        items = {**bases.get(table, {}), name: value}
        body = f"[{table}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in items.items())
    path = tmp_path / "authority.toml"
    path.write_text(body)
    return loader.load_config(path, state_dir=tmp_path / "state")


def _probes(kind: str) -> list[Any]:
    return [pytest.param(key, value, id=f"{key}={value!r}")
            for key, spec in GEN.SPECS.items() for value in getattr(spec, kind)]


@pytest.mark.parametrize(("key", "value"), _probes("refused"))
def test_a_value_the_document_excludes_is_refused(tmp_path: Path, bases: dict[str, Any],
                                                  key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, bases, key, value)
    assert caught.value.setting == key


@pytest.mark.parametrize(("key", "value"), _probes("accepted"))
def test_a_value_the_document_allows_is_accepted(tmp_path: Path, bases: dict[str, Any],
                                                 key: str, value: Any) -> None:
    _load(tmp_path, bases, key, value)


def test_every_numeric_range_has_probes() -> None:
    """Each key whose allowed values are a range or a choice carries examples either side."""
    for key, spec in GEN.SPECS.items():
        if re.search(r"[<>]|\d\.\.\d|\bor \"", spec.allowed):
            assert spec.refused and spec.accepted, f"{key}: no examples to check"


def test_every_documented_key_is_one_the_loader_knows(tmp_path: Path) -> None:
    """Each documented key, set alone, is not refused as unknown (whatever else is wrong with
    a placeholder value); a key the document lacks is."""
    for key in documented_keys(DOC.read_text()):
        try:
            _load(tmp_path, {}, key, "placeholder")
        except ConfigError as exc:
            assert "unknown setting" not in str(exc), key
    with pytest.raises(ConfigError, match="unknown setting"):
        _load(tmp_path, {}, "server.no_such_setting", 1)
