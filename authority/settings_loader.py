"""Build a validated ``Config`` from defaults, an optional TOML file and command-line flags."""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from contextvars import ContextVar
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from authority.config import (
    DEFAULT_ROLE_MAP,
    ROLES,
    ClusterSettings,
    Config,
    KeyPolicy,
    Pkcs11Settings,
    PostgresSettings,
    Secret,
    ServerSettings,
    StoreSettings,
    TicketPolicy,
    TlsSettings,
    TpmSettings,
)
from authority.environ import take_variable
from authority.errors import ConfigError, InvalidArgument
from authority.policy import check_realm

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
#: settings that take "auto" or an integer
_AUTO_OR_INT = {"server.device_processes", "server.max_calls_per_client",
                "server.processes"}
#: settings that take "auto" or a number of seconds
_AUTO_OR_SECONDS = {"server.replica_watchdog"}
_SECTIONS = {"server": ServerSettings, "tickets": TicketPolicy, "keys": KeyPolicy,
             "cluster": ClusterSettings, "store": StoreSettings}
_TOP = {"state_dir", "backend", "log_level", "log_format", "store_synchronous", "pkcs11", "tpm",
        "tls", "audit_log", "postgresql", *_SECTIONS}
_BACKENDS = ("pkcs11", "tpm")
_PKCS11_KEYS = {"module", "token_label", "pin", "pin_file", "pin_env", "sessions",
                "session_timeout", "softhsm2_conf", "so_pin_file", "so_pin_env"}
_TPM_KEYS = {"tcti", "key_dir", "owner_auth_file", "owner_auth_env", "retries", "queue_size",
             "call_timeout", "parent"}
_POSTGRES_KEYS = {"dsn", "dsn_file", "dsn_env", "pool_size", "statement_timeout",
                  "connect_timeout"}
_PERSISTENT = range(0x81000000, 0x82000000)
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "trust_domain", "require_client_cert",
             "role_map", "realms"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
_LOG_FORMATS = ("text", "json")


def default_state_dir() -> Path:
    """``$TICKET_AUTHORITY_STATE_DIR``, else ``$XDG_STATE_HOME/ticket-authority``."""
    env = os.environ.get("TICKET_AUTHORITY_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "ticket-authority"


def load_config(config_file: Path | None = None, *, listen: str | None = None,
                state_dir: Path | None = None, log_level: str | None = None,
                backend: str | None = None, metrics_listen: str | None = None) -> Config:
    """Return the validated settings: defaults < TOML file < flags.

    Raises: ConfigError naming the first wrong setting.
    """
    data = _read_toml(config_file) if config_file else {}
    unknown = set(data) - _TOP
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown setting")
    base = Path(state_dir or data.get("state_dir") or default_state_dir())
    cfg = Config(state_dir=base.expanduser().resolve())
    for name, cls in _SECTIONS.items():
        cfg = replace(cfg, **{name: _section(name, cls, data.get(name, {}))})
    if listen is not None:
        cfg = replace(cfg, server=replace(cfg.server, listen=listen))
    if metrics_listen is not None:
        cfg = replace(cfg, server=replace(cfg.server, metrics_listen=metrics_listen))
    cfg = replace(cfg, backend=str(backend or data.get("backend", "pkcs11")),
                  log_level=str(log_level or data.get("log_level", "INFO")).upper(),
                  log_format=data.get("log_format", "text"),
                  store_synchronous=str(data.get("store_synchronous", "NORMAL")).upper())
    if "pkcs11" in data:
        cfg = replace(cfg, pkcs11=_pkcs11(data["pkcs11"]))
    if "tpm" in data:
        cfg = replace(cfg, tpm=_tpm(data["tpm"]))
    if "tls" in data:
        cfg = replace(cfg, tls=_tls(data["tls"], config_file))
    if "postgresql" in data:
        cfg = replace(cfg, postgresql=_postgresql(data["postgresql"]))
    if "audit_log" in data:
        value = data["audit_log"]
        if not isinstance(value, str) or not value:
            raise ConfigError("audit_log", "a file path (default: state_dir/audit.log)")
        base_dir = config_file.parent if config_file else Path.cwd()
        cfg = replace(cfg, audit_log=(base_dir / Path(value).expanduser()).resolve())
    validate(cfg)
    return cfg


#: set while ``load_config_for_checks`` loads: the [tls] files are left to the caller
_TLS_FILES_LEFT: ContextVar[bool] = ContextVar("tls_files_left", default=False)


def load_config_for_checks(config_file: Path | None = None, *,
                           state_dir: Path | None = None, backend: str | None = None) -> Config:
    """``load_config`` without reading or checking the ``[tls]`` files (validate_tls):
    ``doctor`` checks them itself, one by one, and runs its other checks either way.

    Raises: ConfigError naming the first wrong setting."""
    token = _TLS_FILES_LEFT.set(True)
    try:
        return load_config(config_file, state_dir=state_dir, backend=backend)
    finally:
        _TLS_FILES_LEFT.reset(token)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc


def _section(name: str, cls: type[Any], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(name, "must be a table")
    allowed = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{name}.{key}", "unknown setting")
        default = getattr(cls(), key)
        if f"{name}.{key}" in _AUTO_OR_INT:
            values[key] = _auto_or_int(f"{name}.{key}", value)
            continue
        if f"{name}.{key}" in _AUTO_OR_SECONDS:
            values[key] = _auto_or_seconds(f"{name}.{key}", value)
            continue
        values[key] = _coerce(f"{name}.{key}", value, type(default))
    return cls(**values)


def _auto_or_int(setting: str, value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # type: ignore[no-any-return]
    raise ConfigError(setting, f"expected auto or a whole number, got {value!r}")


def _auto_or_seconds(setting: str, value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(setting, f"expected auto or a number of seconds, got {value!r}")


def _coerce(setting: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(setting, f"must be a {kind.__name__}, got {value!r}")
    return value


def _table(name: str, data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(name, "must be a table")
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}", "unknown setting")
    return data


def _tpm(data: Any) -> TpmSettings:
    data = _table("tpm", data, _TPM_KEYS)
    tcti = data.get("tcti")
    if tcti is not None and (not isinstance(tcti, str) or not tcti):
        raise ConfigError("tpm.tcti", "a TCTI string such as 'device:/dev/tpmrm0'")
    key_dir = _path_text("tpm.key_dir", data.get("key_dir"))
    auth = Secret("")
    if "owner_auth_file" in data or "owner_auth_env" in data:
        auth = _secret("tpm.owner_auth", data, file_key="owner_auth_file",
                       env_key="owner_auth_env")
    parent = data.get("parent")
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int)
                               or parent not in _PERSISTENT):
        raise ConfigError("tpm.parent", "a persistent handle 0x81000000..0x81FFFFFF "
                                        "(write it as a TOML hex integer, e.g. 0x81000001)")
    defaults = TpmSettings()
    return TpmSettings(
        tcti=tcti, key_dir=Path(key_dir) if key_dir else None, owner_auth=auth, parent=parent,
        retries=_coerce("tpm.retries", data.get("retries", defaults.retries), int),
        queue_size=_coerce("tpm.queue_size", data.get("queue_size", defaults.queue_size), int),
        call_timeout=_coerce("tpm.call_timeout",
                             data.get("call_timeout", defaults.call_timeout), float))


def _tls(data: Any, config_file: Path | None) -> TlsSettings:
    """The ``[tls]`` table; relative paths are relative to the config file's directory."""
    data = _table("tls", data, _TLS_KEYS)
    base = config_file.parent if config_file else Path.cwd()
    paths: dict[str, Path] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"tls.{key}", "required (a path to a PEM file)")
        paths[key] = (base / Path(value).expanduser()).resolve()
    domain = data.get("trust_domain")
    if not isinstance(domain, str) or not domain:
        raise ConfigError("tls.trust_domain", "required (such as 'example.org')")
    role_map = DEFAULT_ROLE_MAP
    if "role_map" in data:
        table = data["role_map"]
        if not isinstance(table, dict) or not table:
            raise ConfigError("tls.role_map", "a table of URI pattern = role")
        role_map = tuple((str(k), v) for k, v in table.items())
    return TlsSettings(
        cert_file=paths["cert_file"], key_file=paths["key_file"],
        client_ca_file=paths["client_ca_file"], trust_domain=domain,
        require_client_cert=_coerce("tls.require_client_cert",
                                    data.get("require_client_cert", True), bool),
        role_map=role_map, realms=_realms(data.get("realms", {})))


def _realms(table: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``[tls.realms]``: gateway URI pattern = [allowed realm, ...]."""
    if not isinstance(table, dict):
        raise ConfigError("tls.realms", "a table of gateway URI pattern = [realm, ...]")
    out: list[tuple[str, tuple[str, ...]]] = []
    for pattern, realms in table.items():
        if not isinstance(realms, list) or not all(isinstance(r, str) for r in realms):
            raise ConfigError(f"tls.realms.{pattern}",
                              f"a list of realm names (\"\" is the default realm), got {realms!r}")
        for realm in realms:
            try:
                check_realm(realm, f"tls.realms.{pattern}")
            except InvalidArgument as exc:
                raise ConfigError(f"tls.realms.{pattern}", exc.message.split(": ", 1)[1]) from exc
        out.append((str(pattern), tuple(realms)))
    return tuple(out)


def _pkcs11(data: Any) -> Pkcs11Settings:
    data = _table("pkcs11", data, _PKCS11_KEYS)
    for key in ("module", "token_label"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"pkcs11.{key}", "required (a non-empty string)")
    conf = _path_text("pkcs11.softhsm2_conf", data.get("softhsm2_conf"))
    return Pkcs11Settings(
        module=Path(data["module"]), token_label=data["token_label"], pin=_pin(data),
        sessions=_coerce("pkcs11.sessions", data.get("sessions", Pkcs11Settings.sessions), int),
        session_timeout=_coerce("pkcs11.session_timeout", data.get("session_timeout", 5.0),
                                float),
        softhsm2_conf=Path(conf) if conf else None, so_pin=_so_pin(data))


def _so_pin(data: dict[str, Any]) -> Secret | None:
    """The optional SO PIN, from so_pin_file or so_pin_env (never inline). Raises: ConfigError."""
    if "so_pin_file" not in data and "so_pin_env" not in data:
        return None
    return _secret("pkcs11.so_pin", data, file_key="so_pin_file", env_key="so_pin_env")


def _pin(data: dict[str, Any]) -> Secret:
    sources = [k for k in ("pin", "pin_file", "pin_env") if k in data]
    if len(sources) != 1:
        raise ConfigError("pkcs11.pin", "give exactly one of pin_file, pin_env or pin")
    if "pin" in data:
        log.warning("pkcs11.pin is inline in the config file; prefer pin_file or pin_env")
        return Secret(str(data["pin"]))
    return _secret("pkcs11.pin", data, file_key="pin_file", env_key="pin_env")


def _postgresql(data: Any) -> PostgresSettings:
    """The ``[postgresql]`` table: the DSN from exactly one of dsn, dsn_file, dsn_env (as the
    PIN), checked to parse without showing it. Raises: ConfigError naming the setting."""
    data = _table("postgresql", data, _POSTGRES_KEYS)
    sources = [k for k in ("dsn", "dsn_file", "dsn_env") if k in data]
    if len(sources) != 1:
        raise ConfigError("postgresql.dsn", "give exactly one of dsn_file, dsn_env or dsn")
    if "dsn" in data:
        if not isinstance(data["dsn"], str):
            raise ConfigError("postgresql.dsn", "must be a string (a libpq connection string "
                                                "or postgresql:// URI)")
        dsn = Secret(data["dsn"])
    else:
        dsn = _secret("postgresql.dsn", data, file_key="dsn_file", env_key="dsn_env")
    _check_dsn(f"postgresql.{sources[0]}", dsn, inline="dsn" in data)
    defaults = PostgresSettings(dsn=Secret(""))
    return PostgresSettings(
        dsn=dsn,
        pool_size=_coerce("postgresql.pool_size", data.get("pool_size", defaults.pool_size),
                          int),
        statement_timeout=_coerce("postgresql.statement_timeout",
                                  data.get("statement_timeout", defaults.statement_timeout),
                                  float),
        connect_timeout=_coerce("postgresql.connect_timeout",
                                data.get("connect_timeout", defaults.connect_timeout), float))


def _check_dsn(setting: str, dsn: Secret, *, inline: bool) -> None:
    """A DSN libpq parses (libpq's message is not repeated: it may quote the password).
    Raises: ConfigError naming ``setting``."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    if not dsn.reveal().strip():
        raise ConfigError(setting, "empty (a libpq connection string such as \"host=db.example"
                                   ".org dbname=authority user=authority\" or a postgresql:// "
                                   "URI)")
    try:
        params = conninfo_to_dict(dsn.reveal())
    except psycopg.Error:
        raise ConfigError(setting, "not a libpq connection string (key=value ...) or "
                                   "postgresql:// URI (not shown: it may hold a password)"
                          ) from None
    if inline and params.get("password"):
        log.warning("postgresql.dsn holds a password inline in the config file; prefer "
                    "dsn_file or dsn_env (or libpq's ~/.pgpass)")


def _secret(setting: str, data: dict[str, Any], *, file_key: str, env_key: str) -> Secret:
    """A secret read from a file or an environment variable (exactly one of them).

    The variable (``pkcs11.pin_env``, ``tpm.owner_auth_env``) is removed from ``os.environ``
    once read, so that no process started afterwards inherits it (children get a minimal
    environment anyway: authority/backends/processes/environment.py), and its value is zeroed
    in this process's ``/proc/<pid>/environ`` (authority/environ.py); a second load in the same
    process finds it unset. Raises: ConfigError naming the setting."""
    prefix = setting.rsplit(".", 1)[0]
    if file_key in data and env_key in data:
        raise ConfigError(setting, f"give {file_key} or {env_key}, not both")
    if file_key in data:
        path = _path_text(f"{prefix}.{file_key}", data[file_key])
        try:
            return Secret(Path(path or "").read_text().strip())
        except OSError as exc:
            raise ConfigError(f"{prefix}.{file_key}", f"cannot read: {exc.strerror}") from exc
    value = take_variable(str(data[env_key]))
    if value is None:
        raise ConfigError(f"{prefix}.{env_key}", f"environment variable {data[env_key]} unset "
                                                 "(it is removed from the environment once read)")
    return Secret(value)


def validate(cfg: Config) -> None:
    """Check cross-field rules.

    Raises: ConfigError naming the setting.
    """
    mutual = cfg.tls is not None and cfg.tls.require_client_cert
    parse_listen(cfg.server.listen, loopback_only=not mutual)
    if cfg.tls is not None and not _TLS_FILES_LEFT.get():
        validate_tls(cfg.tls)
    if cfg.server.admin_listen:
        admin_listen_path(cfg.server.admin_listen)
    if cfg.server.metrics_listen:
        parse_listen(cfg.server.metrics_listen, setting="server.metrics_listen",
                     loopback_only=False)
    _positive("server.workers", cfg.server.workers)
    _positive("server.max_message_bytes", cfg.server.max_message_bytes)
    _positive("server.max_batch_items", cfg.server.max_batch_items)
    if cfg.server.rate_limit_per_s < 0:
        raise ConfigError("server.rate_limit_per_s", "must be 0 (off) or positive")
    _positive("server.rate_burst", cfg.server.rate_burst)
    _positive("server.max_concurrent_rpcs", cfg.server.max_concurrent_rpcs)
    if not cfg.server.grace_seconds >= 0:
        raise ConfigError("server.grace_seconds", "must be 0 or more seconds, got "
                          f"{cfg.server.grace_seconds}")
    if cfg.server.mode not in ("auto", "aio", "threads"):
        raise ConfigError("server.mode",
                          f"expected auto, aio or threads, got {cfg.server.mode!r}")
    if cfg.server.device_calls not in ("auto", "inline", "offload"):
        raise ConfigError("server.device_calls",
                          f"expected auto, inline or offload, got {cfg.server.device_calls!r}")
    processes = cfg.server.device_processes
    if processes != "auto" and not (isinstance(processes, int) and 0 <= processes <= 64):
        raise ConfigError("server.device_processes",
                          f"expected auto or 0..64, got {cfg.server.device_processes!r}")
    if cfg.backend == "tpm" and cfg.server.device_processes not in ("auto", 0, 1):
        raise ConfigError("server.device_processes", "0 or 1 for backend tpm (a TPM is one "
                                                     "device: one process owns it)")
    _validate_call_limits(cfg)
    _validate_processes(cfg)
    _validate_replica_watchdog(cfg.server.replica_watchdog)
    _validate_postgresql(cfg)
    _positive("tickets.default_lifetime", cfg.tickets.default_lifetime)
    _positive("tickets.max_lifetime", cfg.tickets.max_lifetime)
    if cfg.tickets.default_lifetime > cfg.tickets.max_lifetime:
        raise ConfigError("tickets.default_lifetime", "must not exceed tickets.max_lifetime")
    if cfg.tickets.max_lifetime > 7 * 24 * 3600:
        raise ConfigError("tickets.max_lifetime", "at most 7 days (604800 s)")
    if cfg.keys.rotation_period < 0:
        raise ConfigError("keys.rotation_period", "must be 0 (never) or positive")
    if not 1 <= cfg.keys.max_seals_per_key <= 2**32:
        raise ConfigError("keys.max_seals_per_key", "must be in 1..2^32 (AES-GCM nonce budget)")
    _positive("keys.seal_reservation", cfg.keys.seal_reservation)
    if cfg.keys.maintenance_interval <= 0:
        raise ConfigError("keys.maintenance_interval", "must be positive")
    if cfg.keys.publish_delay < 0:
        raise ConfigError("keys.publish_delay", "must be 0 (seal at once) or positive")
    _validate_cluster(cfg.cluster)
    _validate_per_node_tokens(cfg)
    _validate_store(cfg)
    if cfg.backend not in _BACKENDS:
        raise ConfigError("backend", f"unknown backend {cfg.backend!r} (supported: "
                                     f"{', '.join(_BACKENDS)})")
    if cfg.tpm.retries < 0:
        raise ConfigError("tpm.retries", "must not be negative")
    _positive("tpm.queue_size", cfg.tpm.queue_size)
    _positive("tpm.call_timeout", cfg.tpm.call_timeout)
    if cfg.log_level not in _LOG_LEVELS:
        raise ConfigError("log_level", f"one of {', '.join(sorted(_LOG_LEVELS))}")
    if cfg.log_format not in _LOG_FORMATS:
        raise ConfigError("log_format", f"one of {', '.join(_LOG_FORMATS)}")
    if cfg.store_synchronous not in {"NORMAL", "FULL"}:
        raise ConfigError("store_synchronous", "NORMAL or FULL")
    if cfg.pkcs11 is not None:
        _positive("pkcs11.sessions", cfg.pkcs11.sessions)
        if cfg.pkcs11.session_timeout <= 0:
            raise ConfigError("pkcs11.session_timeout", "must be positive")


def _validate_processes(cfg: Config) -> None:
    """``server.processes``: auto or 1..64; 1 for the TPM; with a fixed metrics port, one
    port per replica must fit. Raises: ConfigError naming the setting."""
    processes = cfg.server.processes
    if processes == "auto":
        return
    if not isinstance(processes, int) or not 1 <= processes <= 64:
        raise ConfigError("server.processes", f"expected auto or 1..64, got {processes!r}")
    if cfg.backend == "tpm" and processes > 1:
        raise ConfigError("server.processes", "must be 1 with backend tpm: a TPM is one "
                          "device that one process owns (its sessions and loaded keys), so "
                          "several server processes cannot share it; use backend pkcs11 (a "
                          "token every process opens) for several processes")
    if cfg.server.metrics_listen and processes > 1:
        port = parse_listen(cfg.server.metrics_listen, setting="server.metrics_listen",
                            loopback_only=False)[1]
        if port and port + processes - 1 > 65535:
            raise ConfigError("server.metrics_listen", f"replica {processes - 1} would "
                              f"listen on port {port + processes - 1} (port + replica index)")


def _validate_replica_watchdog(seconds: float | str) -> None:
    """``server.replica_watchdog``: auto or 1..86400 seconds. Raises: ConfigError."""
    if seconds != "auto" and not (isinstance(seconds, float) and 1.0 <= seconds <= 86400.0):
        raise ConfigError("server.replica_watchdog",
                          f"expected auto or 1..86400 seconds, got {seconds!r}")


def _validate_postgresql(cfg: Config) -> None:
    """``[postgresql]``: sizes and timeouts, and a backend replicas can share.
    Raises: ConfigError naming the setting."""
    settings = cfg.postgresql
    if settings is None:
        return
    check_shared_backend(cfg)
    _positive("postgresql.pool_size", settings.pool_size)
    _positive("postgresql.statement_timeout", settings.statement_timeout)
    _positive("postgresql.connect_timeout", settings.connect_timeout)


def _validate_cluster(cluster: ClusterSettings) -> None:
    """``[cluster]`` timings. Raises: ConfigError naming the setting."""
    _positive("cluster.heartbeat_interval", cluster.heartbeat_interval)
    for setting in ("replica_timeout", "lease_duration"):
        if getattr(cluster, setting) < 2 * cluster.heartbeat_interval:
            raise ConfigError(f"cluster.{setting}", "must be at least twice "
                              f"cluster.heartbeat_interval ({cluster.heartbeat_interval} s), "
                              f"got {getattr(cluster, setting)}")


def _validate_per_node_tokens(cfg: Config) -> None:
    """``cluster.per_node_tokens`` only with ``[postgresql]`` (replicas on several machines)
    and backend pkcs11 (the token wraps and unwraps the keys). Raises: ConfigError."""
    if not cfg.cluster.per_node_tokens:
        return
    if cfg.postgresql is None:
        raise ConfigError("cluster.per_node_tokens", "needs [postgresql]: the replicas with "
                          "their own tokens share the key ring and its wrapped keys there")
    if cfg.backend != "pkcs11":
        raise ConfigError("cluster.per_node_tokens", "needs backend pkcs11 (keys wrapped under "
                          f"a cluster KEK in each token), not {cfg.backend!r}")
    if cfg.server.processes not in ("auto", 1):
        raise ConfigError("server.processes", "must be 1 (or auto) with "
                          "cluster.per_node_tokens: each replica process unwraps the keys its "
                          "token lacks, and two on one token could unwrap one key twice; run "
                          "one process per node's token")


def _validate_store(cfg: Config) -> None:
    """``[store]``: ``max_staleness`` at least twice ``cluster.heartbeat_interval`` (the
    revocations are re-read that often: a healthy replica must never look stale).
    Raises: ConfigError naming the setting."""
    staleness, interval = cfg.store.max_staleness, cfg.cluster.heartbeat_interval
    if not staleness >= 2 * interval:
        raise ConfigError("store.max_staleness", "must be at least twice "
                          f"cluster.heartbeat_interval ({interval} s), got {staleness}")


def check_shared_backend(cfg: Config) -> None:
    """Refuse ``[postgresql]`` with ``backend = "tpm"``. Raises: ConfigError."""
    if cfg.postgresql is not None and cfg.backend == "tpm":
        raise ConfigError(
            "postgresql", "cannot be used with backend \"tpm\": a TPM binds its keys to one "
            "chip, so replicas sharing this database could not open each other's tickets; use "
            "backend \"pkcs11\" with a token every replica reaches (a network HSM), or drop "
            "[postgresql] to keep the state in state_dir (SQLite)")


def _validate_call_limits(cfg: Config) -> None:
    """What one client may hold (authority/service/admission.py). Raises: ConfigError."""
    server = cfg.server
    _positive("server.request_timeout", server.request_timeout)
    _positive("server.stream_idle_timeout", server.stream_idle_timeout)
    _positive("server.max_streams_per_connection", server.max_streams_per_connection)
    for setting in ("connection_idle_timeout", "connection_max_age", "connection_age_grace"):
        if getattr(server, setting) < 0:
            raise ConfigError(f"server.{setting}", "must be 0 (never) or positive")
    cap = server.max_calls_per_client
    if cap == "auto":
        return
    if not isinstance(cap, int) or cap < 1:
        raise ConfigError("server.max_calls_per_client", f"expected auto or a positive whole "
                                                         f"number, got {cap!r}")
    # the thread-pool server: server.mode "threads", or "auto" for the TPM (app.server_mode)
    threads = server.mode == "threads" or (server.mode == "auto" and cfg.backend == "tpm")
    if threads and cap >= server.workers:
        raise ConfigError("server.max_calls_per_client",
                          f"must be below server.workers ({server.workers}) on the thread-pool "
                          f"server, so that one client cannot hold every worker; got {cap}")


def admin_listen_path(admin_listen: str) -> Path | None:
    """The socket path of a ``unix:PATH`` admin listener (None for HOST:PORT, which must be
    loopback: the admin listener is plaintext and has no roles).

    Raises: ConfigError naming ``server.admin_listen``."""
    if admin_listen.startswith("unix:"):
        path = admin_listen[len("unix:"):]
        if not path or path.startswith("//"):
            raise ConfigError("server.admin_listen", f"expected unix:PATH, got {admin_listen!r}")
        return Path(path)
    parse_listen(admin_listen, setting="server.admin_listen")
    return None


def validate_tls(tls: TlsSettings) -> None:
    """Files readable and PEM, the key matching the certificate, roles known.

    Raises: ConfigError naming the setting.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem: dict[str, bytes] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, key)
        try:
            pem[key] = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"tls.{key}", f"cannot read {path}: {exc.strerror}") from exc
    try:
        chain = x509.load_pem_x509_certificates(pem["cert_file"])
    except ValueError as exc:
        raise ConfigError("tls.cert_file", f"{tls.cert_file}: not PEM certificates") from exc
    try:
        x509.load_pem_x509_certificates(pem["client_ca_file"])
    except ValueError as exc:
        raise ConfigError("tls.client_ca_file",
                          f"{tls.client_ca_file}: not PEM certificates") from exc
    try:
        private_key = serialization.load_pem_private_key(pem["key_file"], password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("tls.key_file", f"{tls.key_file}: not an unencrypted PEM private "
                                          "key") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private_key.public_key().public_bytes(der, public) != chain[0].public_key().public_bytes(
            der, public):
        raise ConfigError("tls.key_file", f"{tls.key_file} does not match the first "
                                          f"certificate of {tls.cert_file}")
    if "/" in tls.trust_domain or ":" in tls.trust_domain:
        raise ConfigError("tls.trust_domain", f"a bare name such as example.org, got "
                                              f"{tls.trust_domain!r}")
    for pattern, role in tls.role_map:
        if role not in ROLES:
            raise ConfigError(f"tls.role_map.{pattern}",
                              f"unknown role {role!r} (roles: {', '.join(ROLES)})")


def _path_text(setting: str, value: Any) -> str | None:
    """A path setting's text (None when unset). Raises: ConfigError naming ``setting`` when it
    is not a non-empty string (a number would crash pathlib with a TypeError)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(setting, f"must be a path (a non-empty string), got {value!r}")
    return value


def _positive(setting: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(setting, f"must be positive, got {value}")


def parse_listen(listen: str, setting: str = "server.listen",
                 loopback_only: bool = True) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); with ``loopback_only`` refuse non-loopback
    hosts (the gRPC listener without ``[tls]`` and client certificates).

    Raises: ConfigError naming ``setting``.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(setting, f"expected HOST:PORT, got {listen!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if loopback_only and not _is_loopback(bare):
        hint = ("needs TLS with client certificates: configure [tls]"
                if setting == "server.listen" else
                "is plaintext: use a loopback address or unix:PATH")
        raise ConfigError(setting, f"{host} is beyond loopback; listening there {hint}")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
