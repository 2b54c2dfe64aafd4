"""The state store interface: key ring metadata and the consumed-ticket set.

The embedded implementation is SQLite (authority/store/sqlite.py); replicas will share another
implementation of the same interface.
"""

from __future__ import annotations

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

    def consume(self, ticket_id: bytes, expires_at: int, now: float) -> bool:
        """Mark a ticket used until it expires. Return True the first time, False after."""
        ...

    def is_consumed(self, ticket_id: bytes, now: float) -> bool:
        """Return whether a live (unexpired) entry for the ticket exists."""
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
