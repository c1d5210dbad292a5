"""Which store a measurement runs on, each one fresh: the gateway's URL, and the same
backend for the ``eventsourcing`` library.

``--store`` takes ``memory``, ``sqlite`` (every measurement gets a new file in the run's
work folder: ``--workdir`` picks the disk) or a ``postgresql://…`` server URL (every
measurement gets a new database there, dropped afterwards), so that no measurement
inherits another's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from server.stores.factory import UnsupportedStoreURLError, open_store


@dataclass(frozen=True)
class StoreSpec:
    """A ``--store`` value: its kind and how to get a fresh store of that kind."""

    kind: str
    """"memory", "sqlite" or "postgresql"."""
    url: str
    """The server URL for postgresql, "memory://" for memory, "" for sqlite."""

    @classmethod
    def parse(cls, value: str) -> StoreSpec:
        if value in ("memory", "memory://"):
            return cls("memory", "memory://")
        if value == "sqlite":
            return cls("sqlite", "")
        if value.startswith(("postgresql://", "postgres://")):
            return cls("postgresql", value)
        raise ValueError(f"unknown store {value!r}: memory, sqlite or postgresql://…")

    @contextmanager
    def fresh(self, folder: Path, name: str) -> Iterator[str]:
        """A gateway store URL for one measurement, emptied or dropped afterwards."""
        if self.kind == "memory":
            yield self.url
        elif self.kind == "sqlite":
            yield f"sqlite:///{(folder / f'{name}.db').resolve()}"
        else:
            with fresh_postgres_database(self.url) as url:
                yield url


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def eventsourcing_env(url: str) -> dict[str, Any]:
    """The ``eventsourcing`` persistence settings for the same backend as ``url``."""
    if url.startswith("sqlite:///"):
        return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": url[10:]}
    parts = urlsplit(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
    }


async def supported(url: str) -> str | None:
    """None if the gateway can open ``url``, else why not (e.g. the backend is not written yet)."""
    try:
        store = await open_store(url)
    except UnsupportedStoreURLError as error:
        return str(error)
    await store.close()
    return None


def quiet_disks(specs: Sequence[StoreSpec]) -> None:
    """Write out now what earlier measurements left for the disks to write later: the
    page cache (``os.sync``) and each PostgreSQL server's dirty buffers (``CHECKPOINT``,
    skipped without the privilege). In-process throughput on SQLite rests on fsync
    latency (one caller on SQLite: 3,314 commands/s in a run of that section alone,
    2,545 in a full run right after the gRPC section), and those writes would otherwise
    land in the middle of the next measurement."""
    os.sync()
    for spec in specs:
        if spec.kind != "postgresql":
            continue
        with (
            psycopg.connect(spec.url, autocommit=True) as admin,
            suppress(psycopg.errors.InsufficientPrivilege),
        ):
            admin.execute("CHECKPOINT")
