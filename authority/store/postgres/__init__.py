"""The shared store: one PostgreSQL database that several authority processes (replicas) use at
once, through psycopg 3 and a psycopg_pool connection pool.

Every method is one transaction; most are one statement in autocommit mode, which PostgreSQL
commits before it reports the statement complete: a method that returns has committed (a
consume is acknowledged only after its commit). Whatever fails below (connection refused or
lost, a statement timeout, no free connection in time) is ``DeviceUnavailable`` with a message
that never holds the DSN's password.

The schema is created and migrated by the service: ``MIGRATIONS`` is an ordered list of steps,
each a list of statements; the database records how many it has applied (meta ``schema``). A
start applies the missing ones in one transaction under an advisory lock, so replicas starting
at once do not race; a database migrated by a newer version is refused (an older binary must not
write a schema it does not know). Later steps of the replica work arrive as new migrations: the
audit chain's table (append-only: a trigger refuses UPDATE, DELETE and TRUNCATE); the key
ring's version (the compare-and-swap of every key ring change), the replicas' heartbeats and
the leases; the policy version; per-node tokens' wrapped keys, join requests and nodes; the
cluster KEK and its deliveries to the members.

Replicas learn of each other's revocations and epoch bumps through the policy version (a
counter every such change moves in its transaction) and a notification on ``CHANNEL`` sent
with it: each replica keeps one connection of its own LISTENing (``PostgresChangeFeed``), which
also watches whether the database can be reached. When that connection is lost and cannot be
made again, the store is *down*: every call fails at once (``DeviceUnavailable``) instead of
waiting for a pooled connection, until the feed connects again; the pool is then replaced by
a new one (its connections made after the database's return, none left backing off).

The package's modules: store.py (``PostgresStore``, made of the parts below), connection.py (the
pool, one transaction per method, the down mark), dsn.py (naming the database, scrubbing
secrets), schema.py (``MIGRATIONS``, ``migrate``, meta rows), feed.py (``PostgresChangeFeed``),
and the rows of each kind: ring.py, cluster.py, nodes.py, kek.py, consumed.py, policy.py,
meta.py, audit.py.
"""

from authority.store.postgres.audit import AUDIT_SELECT, audit_entry
from authority.store.postgres.dsn import describe_dsn, scrub_secrets
from authority.store.postgres.feed import (
    CHANNEL,
    FEED_APPLICATION,
    RECONNECT_DELAY,
    PostgresChangeFeed,
)
from authority.store.postgres.meta import HANDLE_KEY_LEN
from authority.store.postgres.schema import MIGRATIONS, SCHEMA_VERSION, migrate
from authority.store.postgres.store import PostgresStore

__all__ = ["AUDIT_SELECT", "CHANNEL", "FEED_APPLICATION", "HANDLE_KEY_LEN", "MIGRATIONS",
           "RECONNECT_DELAY", "SCHEMA_VERSION", "PostgresChangeFeed", "PostgresStore",
           "audit_entry", "describe_dsn", "migrate", "scrub_secrets"]
