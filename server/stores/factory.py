"""Opens the event store named by a ``--store`` URL."""

from __future__ import annotations

import os
from pathlib import Path

from domain.ports import EventStore
from server.stores.memory import MemoryEventStore
from server.stores.sqlite import SQLiteEventStore
from server.stores.urls import StoreURLError, redacted_url


class UnsupportedStoreURLError(StoreURLError):
    """``--store`` names no backend this gateway has."""


def sqlite_path(url: str) -> Path | None:
    """The file a sqlite:/// URL names, or None for any other URL.

    sqlite:///relative.db is relative to the working directory; sqlite:////abs.db keeps
    the fourth slash, making the path absolute.
    """
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        if "?" in url or "#" in url:
            # Taken as part of the file name, "?mode=ro" would make a file of that name.
            raise StoreURLError(
                f"invalid SQLite store URL {redacted_url(url)!r}: it names a file,"
                " with no query (?…) or fragment (#…)"
            )
        named = url.removeprefix("sqlite:///")
        # Checked on the string: Path() drops a trailing "/" and "/.", and "dir/" would
        # make a file named dir.
        if os.path.basename(named) in ("", ".", ".."):
            raise StoreURLError(
                f"invalid SQLite store URL {redacted_url(url)!r}: it names a directory, not a file"
            )
        return Path(named)
    return None


def is_memory_url(url: str) -> bool:
    """Whether ``url`` names the memory store (``memory://``, for tests): one that lives
    and dies with the process that opens it."""
    return url.startswith("memory:")


async def open_store(
    url: str, *, pool_size: int = 10, writer_turns: bool = False, writable: bool = True
) -> EventStore:
    """Open (and migrate) the store at ``url``: memory://, sqlite:///…, postgresql://….

    ``pool_size``: the most connections to PostgreSQL (``--store-pool-size``);
    ``writer_turns``: other processes write the SQLite file too (``sqlite_turns``);
    ``writable``: refuse a SQLite file that cannot be written (False: only read from,
    never migrated nor created: a schema other than this release's is refused).
    """
    if is_memory_url(url):
        return MemoryEventStore()
    if (path := sqlite_path(url)) is not None:
        return await SQLiteEventStore.open(path, writer_turns=writer_turns, writable=writable)
    if url.startswith(("postgresql://", "postgres://")):
        # Imported here so that processes on other stores never load the driver.
        from server.stores.postgres import PostgresEventStore

        return await PostgresEventStore.open(url, max_connections=pool_size, migrate=writable)
    raise unsupported_url(url)


def unsupported_url(url: str) -> UnsupportedStoreURLError:
    """The error for a ``url`` that names no store this gateway has (a usage error)."""
    return UnsupportedStoreURLError(
        f"unsupported store URL {redacted_url(url)!r}: use sqlite:///file.db, postgresql://…, or memory://"
    )


async def holds_a_store(url: str) -> bool:
    """Whether ``url`` names a store that exists, without creating it (``open_store``
    would): a file that records a gateway schema version, or a database that holds the
    gateway's schema."""
    if (path := sqlite_path(url)) is not None:
        return await SQLiteEventStore.holds_a_store(path)
    if url.startswith(("postgresql://", "postgres://")):
        from server.stores.postgres import PostgresEventStore

        return await PostgresEventStore.holds_a_store(url)
    return True


async def migrate(url: str) -> None:
    """Create or upgrade the schema of the store at ``url``, then close it."""
    store = await open_store(url)
    await store.close()
