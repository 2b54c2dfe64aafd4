"""``PostgresStore``: the store backed by one PostgreSQL database shared by every replica, made of
its parts (connection.py and the rows of each kind: ring.py, cluster.py, nodes.py, kek.py,
consumed.py, policy.py, meta.py, audit.py).
"""

from __future__ import annotations

from authority.store.postgres.audit import AuditRows
from authority.store.postgres.cluster import ClusterRows
from authority.store.postgres.consumed import ConsumedRows
from authority.store.postgres.feed import PostgresChangeFeed
from authority.store.postgres.kek import KekRows
from authority.store.postgres.meta import MetaRows
from authority.store.postgres.nodes import NodeRows
from authority.store.postgres.policy import PolicyRows
from authority.store.postgres.ring import RingRows


class PostgresStore(RingRows, ClusterRows, NodeRows, KekRows, ConsumedRows, PolicyRows,
                    MetaRows, AuditRows):
    """Store backed by a PostgreSQL database shared by every replica. Thread-safe (a pool)."""

    def changes(self) -> PostgresChangeFeed:
        """A new LISTEN connection's feed (connected at its first ``wait``)."""
        return PostgresChangeFeed(self)
