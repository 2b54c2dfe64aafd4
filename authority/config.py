"""Settings: one frozen, validated object, loaded once from defaults, a TOML file and flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Secret:
    """A secret string (a PIN): never shown by repr, str or logging."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """Return the secret itself; call only where the device needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Pkcs11Settings:
    """How to reach the PKCS#11 token that holds the ticket keys."""

    module: Path                      # the PKCS#11 shared library
    token_label: str                  # the label of the token (slot) that holds the keys
    pin: Secret                       # the user PIN that logs the sessions in (pin_file /
                                      # pin_env; inline pin logs a warning)
    sessions: int = 16                # logged-in sessions in the pool (one per gRPC worker;
                                      # cap at a real HSM's session limit)
    session_timeout: float = 5.0      # seconds to wait for a free session before UNAVAILABLE
    softhsm2_conf: Path | None = None # SOFTHSM2_CONF to set before the module initialises
    release_gil: bool = True          # drop the GIL during C_Encrypt/C_Decrypt; the server
                                      # turns it off when its aio loop makes the calls inline
    per_node_keys: bool = False       # ticket keys may be per-node ones (wrappable originals,
                                      # unwrapped copies: never "always sensitive"); the
                                      # server sets it from cluster.per_node_tokens
                                      # (pkcs11/_keys.use_problems)
    so_pin: Secret | None = None      # the security officer's PIN (so_pin_file / so_pin_env):
                                      # only the cluster commands of per-node tokens use it;
                                      # the embedded token's is state_dir/hsm/so.pin


@dataclass(frozen=True)
class TpmSettings:
    """How to reach the TPM 2.0 that holds the ticket keys."""

    tcti: str | None = None           # "swtpm:port=2321", "device:/dev/tpmrm0", "tabrmd";
                                      # None: an embedded swtpm started in state_dir/tpm
    key_dir: Path | None = None       # TPM-wrapped key blobs; None: state_dir/tpm/keys
    owner_auth: Secret = Secret("")   # authorisation of the owner (storage) hierarchy
    parent: int | None = None         # persistent storage key (e.g. 0x81000001) to create the
                                      # ticket keys under; None: our own ECC P-256 primary
                                      # (owner hierarchy, recreated from a fixed template)
    retries: int = 10                 # attempts on TPM_RC_RETRY / YIELDED / TESTING
    queue_size: int = 1024            # jobs waiting for the TPM worker before UNAVAILABLE
    call_timeout: float = 30.0        # seconds a caller waits for its TPM job


@dataclass(frozen=True)
class PostgresSettings:
    """The PostgreSQL database the state lives in (``[postgresql]``), shared by replicas;
    without it the state is the embedded SQLite file in state_dir."""

    dsn: Secret                       # libpq "key=value ..." or postgresql:// URI; may hold the
                                      # password, so never shown (dsn_file / dsn_env)
    pool_size: int = 10               # connections this process keeps open at most
    statement_timeout: float = 5.0    # seconds one statement may run (set on each connection)
    connect_timeout: float = 5.0      # seconds to connect (libpq, whole seconds, rounded up)
                                      # and to wait for a free pooled connection


@dataclass(frozen=True)
class TicketPolicy:
    """Ticket lifetimes, in seconds."""

    default_lifetime: int = 3600      # seconds a ticket lives when the gateway asks for 0
    max_lifetime: int = 8 * 3600      # longer requests are clamped to it; a retired key is
                                      # kept to open tickets for this long


@dataclass(frozen=True)
class KeyPolicy:
    """When keys rotate and how they are used."""

    rotation_period: int = 6 * 3600       # seconds a key seals before automatic rotation; 0: never
    max_seals_per_key: int = 2**31        # rotate before this many seals (AES-GCM random nonces)
    seal_reservation: int = 4096          # seals reserved per store write (lost on a crash)
    maintenance_interval: float = 5.0     # seconds between rotation/destruction/purge checks
    publish_delay: float = 30.0           # seconds after its creation a new key seals even if a
                                          # live replica has not reported it loaded (PENDING
                                          # until then); 0: seals at once


@dataclass(frozen=True)
class ClusterSettings:
    """How replicas sharing one store keep in step (``[cluster]``); one process alone is a
    cluster of one, on the same code path."""

    heartbeat_interval: float = 1.0   # seconds between a replica's heartbeats: it re-reads the
                                      # key ring if its version moved, reports the keys it has
                                      # loaded, renews or tries to take the maintenance lease
    replica_timeout: float = 5.0      # a replica is live while its last heartbeat is this
                                      # recent; a replica seals only while its key ring was
                                      # confirmed this recently (at least 2 heartbeat intervals)
    lease_duration: float = 5.0       # seconds the maintenance lease lasts unless its holder
                                      # renews it (at each heartbeat); then another replica
                                      # takes it over (at least 2 heartbeat intervals)
    per_node_tokens: bool = False     # each replica has its own token holding the cluster KEK:
                                      # ticket keys are made wrappable, stored wrapped (RFC 3394
                                      # blobs with a check value) and unwrapped into the other
                                      # replicas' tokens; only with [postgresql] and pkcs11
    node_name: str = ""               # this node's name among the members (cluster join /
                                      # list / remove); "": the host name


@dataclass(frozen=True)
class StoreSettings:
    """How long a replica serves from what it has cached when its store cannot be reached
    (``[store]``)."""

    max_staleness: float = 5.0        # seconds after this replica last confirmed its cached
                                      # revocations and realm epochs current (each heartbeat
                                      # interval, or at once on a change notification) it still
                                      # answers redeems without consume when the store cannot be
                                      # reached; beyond: UNAVAILABLE and health NOT_SERVING.
                                      # Default = cluster.replica_timeout, the bound after which
                                      # a replica stops sealing with an unconfirmed key ring (at
                                      # least 2 heartbeat intervals)


GATEWAY = "gateway"
ADMIN = "admin"
ROLES = (GATEWAY, ADMIN)
DEFAULT_ROLE_MAP: tuple[tuple[str, str], ...] = (
    ("spiffe://{trust_domain}/gateway/*", GATEWAY),
    ("spiffe://{trust_domain}/admin/*", ADMIN),
)


@dataclass(frozen=True)
class TlsSettings:
    """TLS on the gRPC listener (``[tls]``), with client certificates and roles.

    ``role_map``: (pattern, role) pairs tried in order against the client certificate's URI
    SAN; ``{trust_domain}`` is replaced, ``*`` matches one path segment.
    ``realms``: (pattern, allowed realms) pairs, same pattern syntax, first match wins: a gateway
    whose URI matches may only issue and redeem in those realms; an unmatched one is unrestricted.
    ``require_client_cert = False`` (TLS without client certificates, every caller may call
    everything) is allowed on a loopback listener only.
    """

    cert_file: Path                   # the server's certificate chain (PEM)
    key_file: Path                    # its private key (PEM)
    client_ca_file: Path              # CA certificates that sign client certificates (PEM)
    trust_domain: str                 # the SPIFFE trust domain of the client URIs (example.org)
    require_client_cert: bool = True  # False: TLS without client certificates and roles
                                      # (every caller may call everything), loopback only
    role_map: tuple[tuple[str, str], ...] = DEFAULT_ROLE_MAP  # client URI pattern -> role
                                      # (gateway: TicketAuthority; admin: TicketAdmin),
                                      # first match wins
    realms: tuple[tuple[str, tuple[str, ...]], ...] = ()  # gateway URI pattern -> the
                                      # realms it may issue and redeem in, first match wins
                                      # (beyond them: PERMISSION_DENIED); unmatched: any


@dataclass(frozen=True)
class ServerSettings:
    """The gRPC listener."""

    listen: str = "127.0.0.1:50051"    # the gRPC listener (TicketAuthority, TicketAdmin,
                                       # health, reflection); beyond loopback only with [tls]
    workers: int = 16                  # threads of the thread-pool server; on aio, threads
                                       # for offloaded device calls
    max_message_bytes: int = 4 << 20   # largest gRPC message in or out, in bytes; the
                                       # default: a full batch of maximum-size tickets fits
    max_batch_items: int = 1000        # items per IssueTickets/RedeemTickets message
    grace_seconds: float = 5.0         # on SIGTERM: seconds calls in flight get to complete
                                       # before the listener closes (the graceful stop)
    metrics_listen: str = "127.0.0.1:9464"  # Prometheus /metrics over HTTP; "" turns it off
    admin_listen: str = ""   # "unix:PATH" or loopback HOST:PORT: TicketAdmin there (plaintext,
                             # no roles) instead of on ``listen``; "": on ``listen``
    rate_limit_per_s: float = 0.0   # per client (cert URI, else peer host); batch items count
                                    # one each; 0: no rate limit (authority/service/ratelimit.py)
    rate_burst: int = 100           # bucket size: requests allowed at once before the rate
    max_concurrent_rpcs: int = 1024  # calls in flight or queued; beyond: RESOURCE_EXHAUSTED
    mode: str = "auto"               # "aio": grpc.aio on one event loop; "threads": a pool of
                                     # ``workers`` threads; "auto": the faster for the backend
                                     # (aio for pkcs11, threads for tpm: docs/benchmarks.md)
    device_calls: str = "auto"       # aio: "inline" in the loop, "offload" to ``workers``
                                     # threads; "auto": inline for pkcs11, offload for tpm
    device_processes: int | str = "auto"  # pkcs11: child processes (own session each) that
                                     # run batches; 0: none; "auto": one per CPU (at most 4)
                                     # on the aio server with 2+ CPUs, else 0. tpm: 1 runs
                                     # the whole TPM backend in a process of its own (fault
                                     # isolation), 0 in the server; "auto": 0
    # -- what one client may hold (authority/service/admission.py) --
    request_timeout: float = 5.0     # seconds a call may take to send its request once it
                                     # started; beyond: the call is ended (DEADLINE_EXCEEDED
                                     # on aio, CANCELLED on threads) and its worker/slot freed
    stream_idle_timeout: float = 60.0  # seconds a request stream may go without a message
                                     # (its first included); beyond: ended likewise
    max_calls_per_client: int | str = "auto"  # with client certificates: calls one client
                                     # (certificate URI, else peer host) may hold at once:
                                     # streams and Health/Watch for their life, unary calls
                                     # once their request is late (0.25 s); beyond:
                                     # RESOURCE_EXHAUSTED. "auto": workers // 4 on threads
                                     # (must stay below ``workers``: a held call holds a
                                     # worker), max_concurrent_rpcs // 8 on aio
    max_streams_per_connection: int = 1024  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls
                                     # open at once on one connection (beyond: they wait).
                                     # Keep it well above what a client keeps in flight on one
                                     # connection: the server counts a stream until it released
                                     # the call, a little after the client saw the answer, so a
                                     # client at the limit sees some calls refused (UNAVAILABLE)
    connection_idle_timeout: float = 300.0  # close a connection without calls for this long;
                                     # 0: never
    connection_max_age: float = 3600.0  # send GOAWAY to a connection this old (clients
                                     # reconnect: a new handshake, the current certificates);
                                     # 0: never
    connection_age_grace: float = 30.0  # calls still open then get this long, then the
                                     # connection is closed
    processes: int | str = "auto"    # server processes on one machine, each a replica on
                                     # ``listen`` (SO_REUSEPORT) sharing the state (SQLite:
                                     # the state dir's database; PostgreSQL: the database);
                                     # > 1: ``serve`` supervises them. "auto": as measured
                                     # (authority/service/supervisor.py). Metrics: replica i
                                     # on metrics_listen's port + i. TPM: 1 only
    replica_watchdog: float | str = "auto"  # with processes > 1: the supervisor kills
                                     # (SIGTERM, SIGKILL 2 s later) and restarts a replica
                                     # that gave no sign of life (a heartbeat its serving
                                     # loop answers) for this many seconds: hung, stopped,
                                     # stuck. "auto": 3 x cluster.replica_timeout, at least
                                     # twice the longest PostgreSQL call (connect + statement
                                     # timeouts). 1..86400 (authority/service/supervisor.py)


@dataclass(frozen=True)
class Config:
    """Every setting of one authority process. Build with ``load_config``."""

    state_dir: Path                        # the token, the SQLite state, the audit log, locks
    server: ServerSettings = ServerSettings()
    tickets: TicketPolicy = TicketPolicy()
    keys: KeyPolicy = KeyPolicy()
    backend: str = "pkcs11"                # the key device: "pkcs11" or "tpm"
    pkcs11: Pkcs11Settings | None = None   # None: the embedded SoftHSM2 token in state_dir/hsm
    tpm: TpmSettings = TpmSettings()       # used when backend == "tpm"
    tls: TlsSettings | None = None         # None: plaintext, loopback only, no roles
    log_level: str = "INFO"                # the lowest level logged
    log_format: str = "text"               # "text" lines, or "json": one event a line
    store_synchronous: str = "NORMAL"      # SQLite's synchronous pragma; FULL: every consume
                                           # survives a power loss too (slower)
    audit_log: Path | None = None          # the hash-chained audit log (JSON lines, fsynced,
                                           # 0600); None: state_dir/audit.log (authority/audit.py)
    postgresql: PostgresSettings | None = None  # None: SQLite in state_dir/authority.db
    cluster: ClusterSettings = ClusterSettings()
    store: StoreSettings = StoreSettings()   # [store]: outage bounds (either store)

    @property
    def embedded_token(self) -> bool:
        """True when the authority provisions and uses its own SoftHSM2 token."""
        return self.backend == "pkcs11" and self.pkcs11 is None
