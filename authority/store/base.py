"""The state store interface: key ring metadata and the consumed-ticket set.

The embedded implementation is SQLite (authority/store/sqlite.py); replicas will share another
implementation of the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from authority.keys import KeyRecord


class Store(Protocol):
    """Durable, thread-safe state. Every method raises DeviceUnavailable if storage fails."""

    def load_keys(self) -> list[KeyRecord]:
        """Return every key record, oldest first."""
        ...

    def save_keys(self, records: list[KeyRecord]) -> None:
        """Insert or replace the given records in one transaction (all or nothing)."""
        ...

    def consume_many(self, entries: Sequence[tuple[bytes, int]], now: float) -> list[bool]:
        """Mark tickets (ticket_id, expires_at) used until they expire, in one transaction.

        Returns, per entry in order, True if it was newly consumed, False if it already was
        (a repeated id within the batch counts as already consumed).
        """
        ...

    def consumed_among(self, ticket_ids: Sequence[bytes], now: float) -> set[bytes]:
        """Return the ids among ``ticket_ids`` that have a live (unexpired) consumed entry."""
        ...

    def purge_expired(self, now: float) -> int:
        """Delete consumed entries whose tickets have expired; return how many."""
        ...

    def consumed_count(self, now: float) -> int:
        """Return the number of live consumed entries."""
        ...

    def close(self) -> None:
        """Flush and close."""
        ...
