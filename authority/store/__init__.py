"""Durable state: key ring metadata and the consumed-ticket set."""

from authority.store.base import RevocationRecord, Store
from authority.store.sqlite import SqliteStore

__all__ = ["RevocationRecord", "SqliteStore", "Store"]
