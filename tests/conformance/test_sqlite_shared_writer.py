"""The conformance suite against SQLite as ``serve --workers N`` uses it: a worker's store
reads the file itself and hands its appends to the supervisor's writer over a unix socket.
"""

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
from server.workers.writer_client import SharedWriterStore
from server.workers.writer_service import WriterService
from tests.conformance.contract import TIMEOUT, EventStoreContract, commit_of


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: a unix socket's path may not exceed ~107 bytes, and pytest's tmp_path
    # can be longer.
    with tempfile.TemporaryDirectory(prefix="og-") as folder:
        yield Path(folder)


async def start_writer(database: Path, socket_dir: Path) -> WriterService:
    writer = WriterService(await SQLiteEventStore.open(database), socket_dir / "writer.sock")
    await writer.start()
    return writer


class TestSharedWriterStore(EventStoreContract):
    # Other processes (and threads) open the same file as plain SQLite stores: they write
    # beside the shared writer, through SQLite's own lock.
    supports_processes: ClassVar[bool] = True
    shares_across_threads: ClassVar[bool] = False

    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'events.db'}"

    @pytest.fixture
    async def store(self, tmp_path: Path, socket_dir: Path) -> AsyncIterator[EventStore]:
        writer = await start_writer(tmp_path / "events.db", socket_dir)
        client = await SharedWriterStore.open(tmp_path / "events.db", writer.path)
        try:
            yield client
        finally:
            await client.close()
            await writer.close()


# -- several workers on one writer --------------------------------------------------


async def test_a_commit_through_one_worker_wakes_the_others(
    tmp_path: Path, socket_dir: Path
) -> None:
    writer = await start_writer(tmp_path / "events.db", socket_dir)
    first = await SharedWriterStore.open(tmp_path / "events.db", writer.path)
    second = await SharedWriterStore.open(tmp_path / "events.db", writer.path)
    try:
        woke = asyncio.Event()
        second.add_commit_listener(woke.set)

        appended = await first.append(commit_of([("a", 1)]))

        await asyncio.wait_for(woke.wait(), TIMEOUT)
        assert await second.read_all() == appended
    finally:
        await first.close()
        await second.close()
        await writer.close()


async def test_workers_racing_on_one_stream_conflict_and_repeat_ids_are_duplicates(
    tmp_path: Path, socket_dir: Path
) -> None:
    writer = await start_writer(tmp_path / "events.db", socket_dir)
    workers = [await SharedWriterStore.open(tmp_path / "events.db", writer.path) for _ in range(3)]
    try:
        commits = [commit_of([("hot", 1)]) for _ in workers]
        results = await asyncio.gather(
            *(w.append(c) for w, c in zip(workers, commits, strict=True)), return_exceptions=True
        )
        winners = [r for r in results if isinstance(r, list)]
        assert len(winners) == 1
        assert all(isinstance(r, ConcurrencyConflictError) for r in results if r not in winners)

        won = commits[results.index(winners[0])]
        with pytest.raises(DuplicateCommandError):
            await workers[0].append(commit_of([("other", 1)], command_id=won.command_id))
    finally:
        for worker in workers:
            await worker.close()
        await writer.close()


async def test_appends_fail_as_unavailable_once_the_writer_is_gone(
    tmp_path: Path, socket_dir: Path
) -> None:
    writer = await start_writer(tmp_path / "events.db", socket_dir)
    client = await SharedWriterStore.open(tmp_path / "events.db", writer.path)
    try:
        await writer.close()
        await asyncio.wait_for(client.lost.wait(), TIMEOUT)

        with pytest.raises(StoreUnavailableError):
            await client.append(commit_of([("a", 1)]))
    finally:
        await client.close()
