"""The conformance suite against the SQLite store (a file in a temporary directory)."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from multiprocessing import get_context
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import ClassVar

import pytest

from domain.errors import ConcurrencyConflictError, DuplicateCommandError, StoreError
from domain.ports import EventStore
from server.stores.factory import UnsupportedStoreURLError, open_store, sqlite_path
from server.stores.sqlite import READ_STREAM, SQLiteEventStore
from server.stores.sqlite_schema import LATEST_VERSION, migrate
from server.stores.urls import StoreURLError
from tests.conformance.contract import (
    TIMEOUT,
    EventStoreContract,
    assert_counted_history,
    commit_of,
    write_in_process,
)


class TestSQLiteEventStore(EventStoreContract):
    supports_processes: ClassVar[bool] = True
    shares_across_threads: ClassVar[bool] = True

    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'events.db'}"


class TestSQLiteEventStoreCommittingOnTheLoop(TestSQLiteEventStore):
    """Every append that finds the writer idle committed on the caller's event loop, as the
    gateway commits a command that is alone in flight."""

    @pytest.fixture
    async def store(self, store_url: str) -> AsyncIterator[EventStore]:
        opened = await open_store(store_url)
        assert isinstance(opened, SQLiteEventStore)
        opened.commit_on_loop_when(lambda: True)
        try:
            yield opened
        finally:
            await opened.close()


# -- SQLite only: schema, files, driver errors ---------------------------------------


async def test_a_new_file_gets_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'new.db'}")
    await store.close()

    with closing(sqlite3.connect(tmp_path / "new.db")) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (LATEST_VERSION,)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_reopening_keeps_events_and_continues_positions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = await open_store(url)
    first = await store.append(commit_of([("a", 1), ("b", 1)]))
    await store.close()

    store = await open_store(url)
    try:
        assert await store.read_all() == first
        assert [e.position for e in await store.append(commit_of([("a", 2)]))] == [3]
    finally:
        await store.close()


async def test_several_processes_create_one_new_file_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'raced.db'}"
    writers, commits = 4, 3
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(writers, mp_context=get_context("spawn")) as pool:
        children = [
            loop.run_in_executor(pool, write_in_process, url, f"p{n}", commits)
            for n in range(writers)
        ]
        done = await asyncio.wait_for(asyncio.gather(*children), TIMEOUT)

    store = await open_store(url)
    try:
        await assert_counted_history(store, list(itertools.chain(*done)), writers, commits)
    finally:
        await store.close()


def open_fresh_files_at_once(
    folder: Path, files: int, barrier: Barrier, outcomes: Queue[str]
) -> None:
    """In a child process: open each new file of ``folder`` as the others do, together."""
    for n in range(files):
        barrier.wait(TIMEOUT)
        try:
            asyncio.run(_open_and_close(folder / f"{n}.db"))
            outcomes.put("opened")
        except StoreError as error:
            outcomes.put(str(error))


async def _open_and_close(path: Path) -> None:
    store = await SQLiteEventStore.open(path)
    await store.close()


def test_processes_opening_new_files_together_all_open_them(tmp_path: Path) -> None:
    # Racing to switch a new file to WAL, a loser used to get SQLITE_BUSY at once ("database
    # is locked"), without SQLite's busy wait.
    processes, files = 6, 50
    context = get_context("spawn")
    barrier = context.Barrier(processes)
    outcomes: Queue[str] = context.Queue()
    children = [
        context.Process(target=open_fresh_files_at_once, args=(tmp_path, files, barrier, outcomes))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        opened = [outcomes.get(timeout=TIMEOUT) for _ in range(processes * files)]
    finally:
        for child in children:
            child.join(TIMEOUT)
    assert [o for o in opened if o != "opened"] == []


async def test_a_schema_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")

    with pytest.raises(StoreError, match="newer"):
        await open_store(f"sqlite:///{path}")


async def test_a_store_that_lost_a_table_is_refused_at_open(tmp_path: Path) -> None:
    # Was served (and reported SERVING) until the first command failed on the table.
    path = tmp_path / "events.db"
    await (await open_store(f"sqlite:///{path}")).close()
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("DROP TABLE commands")

    with pytest.raises(StoreError, match=r"lacks tables or columns that version has \(commands\)"):
        await open_store(f"sqlite:///{path}")


async def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not SQLite" * 100)

    with pytest.raises(StoreError) as raised:
        await open_store(f"sqlite:///{path}")
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)


async def test_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await open_store(f"sqlite:///{tmp_path / 'absent' / 'events.db'}")


async def test_a_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///relative.db")
    await store.close()
    assert (tmp_path / "relative.db").is_file()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/events.db"])
async def test_malformed_sqlite_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsupportedStoreURLError):
        await open_store(url)


@pytest.mark.parametrize("name", ["events/", "events/.", "events/.."])
def test_a_url_naming_a_directory_is_refused(tmp_path: Path, name: str) -> None:
    # Path() drops the trailing "/" or "/.": "events/" made a file named events.
    with pytest.raises(StoreURLError, match="it names a directory, not a file"):
        sqlite_path(f"sqlite:///{tmp_path}/{name}")


async def test_a_commit_the_driver_rejects_fails_alone(tmp_path: Path) -> None:
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    try:
        good = [commit_of([(f"good-{n}", 1)]) for n in range(5)]
        unbindable = commit_of([("bad", 1)], data=[b""])
        object.__setattr__(unbindable.events[0], "data", object())
        appends = [store.append(c) for c in (*good[:2], unbindable, *good[2:])]

        results = await asyncio.gather(*appends, return_exceptions=True)

        failure = results.pop(2)
        assert isinstance(failure, StoreError)
        assert isinstance(failure.__cause__, sqlite3.Error)
        assert all(isinstance(result, list) for result in results)
        assert await store.find_command(unbindable.command_id) is None
        assert sorted(e.stream_id for e in await store.read_all()) == sorted(
            f"good-{n}" for n in range(5)
        )
        assert [e.position for e in await store.read_all()] == [1, 2, 3, 4, 5]
    finally:
        await store.close()


async def test_failures_in_one_batch_do_not_affect_the_others(tmp_path: Path) -> None:
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    try:
        first = commit_of([("a", 1)])
        commits = [
            first,
            commit_of([("b", 1)], command_id=first.command_id),
            commit_of([("a", 1)]),
            commit_of([("c", 1)]),
        ]

        results = await asyncio.gather(*(store.append(c) for c in commits), return_exceptions=True)

        assert isinstance(results[1], DuplicateCommandError)
        assert isinstance(results[2], ConcurrencyConflictError)
        assert [(e.stream_id, e.position) for e in await store.read_all()] == [
            ("a", 1),
            ("c", 2),
        ]
    finally:
        await store.close()


async def test_appending_to_a_closed_store_is_a_store_error(tmp_path: Path) -> None:
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    await store.close()
    with pytest.raises(StoreError):
        await store.append(commit_of([("a", 1)]))
    with pytest.raises(StoreError):
        await store.read_all()


def test_reading_a_stream_tail_searches_the_stream_version_index(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        migrate(connection)
        plan = " ".join(
            row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {READ_STREAM}", ("p", 5))
        )
    # A SEARCH on both key columns: cost grows with the tail read, not the stream length.
    assert "SEARCH events USING INDEX events_stream_version" in plan
    assert "stream_id=? AND stream_version>?" in plan
    assert "TEMP B-TREE" not in plan
