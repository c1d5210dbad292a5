"""The conformance suite against a worker's store under ``serve --workers N`` on SQLite:
it reads the file itself and hands its appends to the supervisor's writer over the hub's
unix socket. Then what the hub tells workers of each other's commits."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from domain.errors import ConcurrencyConflictError, DuplicateCommandError, StoreUnavailableError
from domain.ports import EventStore
from server.stores.sqlite import SQLiteEventStore
from server.workers.hub import WorkerHub
from server.workers.hub_client import HubClient, WorkerStore
from tests.conformance.contract import TIMEOUT, EventStoreContract, commit_of


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: a unix socket's path may not exceed ~107 bytes, and pytest's tmp_path
    # can be longer.
    with tempfile.TemporaryDirectory(prefix="og-") as folder:
        yield Path(folder)


async def start_hub(database: Path, socket_dir: Path, shared_writer: bool = True) -> WorkerHub:
    writer = await SQLiteEventStore.open(database) if shared_writer else None
    hub = WorkerHub(socket_dir / "hub.sock", writer)
    await hub.start()
    return hub


class Worker:
    """A worker's store, and the streams the hub told it to forget."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []
        self.store: WorkerStore

    @classmethod
    async def open(cls, database: Path, hub: WorkerHub) -> Worker:
        worker = cls()
        client = await HubClient.connect(hub.path, worker.forgotten.extend)
        inner = await SQLiteEventStore.open(database)
        worker.store = WorkerStore(inner, client, shared_writer=hub.writer is not None)
        return worker


class TestWorkerStoreOnSharedWriter(EventStoreContract):
    # Other processes (and threads) open the same file as plain SQLite stores: they write
    # beside the shared writer, through SQLite's own lock.
    supports_processes: ClassVar[bool] = True
    shares_across_threads: ClassVar[bool] = False

    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'events.db'}"

    @pytest.fixture
    async def store(self, tmp_path: Path, socket_dir: Path) -> AsyncIterator[EventStore]:
        hub = await start_hub(tmp_path / "events.db", socket_dir)
        worker = await Worker.open(tmp_path / "events.db", hub)
        try:
            yield worker.store
        finally:
            await worker.store.close()
            await hub.close()


# -- what workers hear of each other ------------------------------------------------


@pytest.mark.parametrize("shared_writer", [True, False], ids=["sqlite-writer", "own-appends"])
async def test_a_commit_through_one_worker_wakes_the_others_and_names_its_streams(
    tmp_path: Path, socket_dir: Path, shared_writer: bool
) -> None:
    hub = await start_hub(tmp_path / "events.db", socket_dir, shared_writer)
    first = await Worker.open(tmp_path / "events.db", hub)
    second = await Worker.open(tmp_path / "events.db", hub)
    try:
        woke = asyncio.Event()
        second.store.add_commit_listener(woke.set)

        appended = await first.store.append(commit_of([("a", 1), ("b", 1)]))

        await asyncio.wait_for(woke.wait(), TIMEOUT)
        assert await second.store.read_all() == appended
        assert sorted(second.forgotten) == ["a", "b"]
        assert first.forgotten == []  # its own commit: its cache is up to date
    finally:
        await first.store.close()
        await second.store.close()
        await hub.close()


async def test_workers_racing_on_one_stream_conflict_and_repeat_ids_are_duplicates(
    tmp_path: Path, socket_dir: Path
) -> None:
    hub = await start_hub(tmp_path / "events.db", socket_dir)
    workers = [await Worker.open(tmp_path / "events.db", hub) for _ in range(3)]
    try:
        commits = [commit_of([("hot", 1)]) for _ in workers]
        results = await asyncio.gather(
            *(w.store.append(c) for w, c in zip(workers, commits, strict=True)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, list)]
        assert len(winners) == 1
        assert all(isinstance(r, ConcurrencyConflictError) for r in results if r not in winners)

        won = commits[results.index(winners[0])]
        with pytest.raises(DuplicateCommandError):
            await workers[0].store.append(commit_of([("other", 1)], command_id=won.command_id))
    finally:
        for worker in workers:
            await worker.store.close()
        await hub.close()


async def test_appends_fail_as_unavailable_once_the_supervisor_is_gone(
    tmp_path: Path, socket_dir: Path
) -> None:
    hub = await start_hub(tmp_path / "events.db", socket_dir)
    worker = await Worker.open(tmp_path / "events.db", hub)
    client = worker.store
    try:
        await hub.close()
        with pytest.raises(StoreUnavailableError):
            # The first append may go out before the end of the connection is seen.
            for _ in range(100):
                await client.append(commit_of([("a", 1)]))
                await asyncio.sleep(0.01)
    finally:
        await client.close()
