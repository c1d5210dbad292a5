"""A lone append committed on the event loop (``SQLiteEventStore.commit_on_loop_when``):
the same outcome as through the writer thread, never a wait on the event loop for a lock,
and the writer thread still gathering appends whenever the loop is not alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from domain.errors import ConcurrencyConflictError, DuplicateCommandError
from server.stores.sqlite import Append, SQLiteEventStore
from server.stores.sqlite_turns import WriterTurns
from tests.conformance.contract import TIMEOUT, commit_of


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteEventStore]:
    opened = await SQLiteEventStore.open(tmp_path / "events.db")
    try:
        yield opened
    finally:
        await opened.close()


def writer_threads(store: SQLiteEventStore) -> list[int]:
    """Records the thread of every write the store makes with its writer connection."""
    threads: list[int] = []
    write = store._write

    def spy(batch: list[Append], *, one_by_one: bool = True) -> bool | None:
        threads.append(threading.get_ident())
        return write(batch, one_by_one=one_by_one)

    store._write = spy  # type: ignore[method-assign]
    return threads


async def test_a_lone_append_commits_on_the_callers_thread(store: SQLiteEventStore) -> None:
    threads = writer_threads(store)
    store.commit_on_loop_when(lambda: True)

    recorded = await store.append(commit_of([("a", 1), ("b", 1)]))

    assert threads == [threading.get_ident()]
    assert [e.position for e in recorded] == [1, 2]
    assert await store.read_all() == recorded


async def test_appends_go_through_the_writer_thread_unless_alone(store: SQLiteEventStore) -> None:
    threads = writer_threads(store)
    alone = False
    store.commit_on_loop_when(lambda: alone)

    await store.append(commit_of([("a", 1)]))
    alone = True
    await store.append(commit_of([("a", 2)], expected={"a": 1}))

    assert threads[0] != threading.get_ident()
    assert threads[1] == threading.get_ident()
    assert [e.stream_version for e in await store.read_stream("a")] == [1, 2]


async def test_a_busy_write_lock_is_waited_for_off_the_loop(
    store: SQLiteEventStore, tmp_path: Path
) -> None:
    store.commit_on_loop_when(lambda: True)
    with closing(sqlite3.connect(tmp_path / "events.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        append = asyncio.ensure_future(store.append(commit_of([("a", 1)])))
        # The loop goes on while the append waits for the lock (its busy handler runs in
        # the writer thread, not here): no tick waits anywhere near a busy timeout.
        loop = asyncio.get_running_loop()
        longest = 0.0
        for _ in range(20):
            before = loop.time()
            await asyncio.sleep(0.005)
            longest = max(longest, loop.time() - before)
        assert longest < 1.0
        assert not append.done()
        other.execute("COMMIT")

    recorded = await asyncio.wait_for(append, TIMEOUT)
    assert [e.position for e in recorded] == [1]


async def test_the_busy_timeout_left_off_by_the_loop_is_waited_out_by_the_writer(
    store: SQLiteEventStore, tmp_path: Path
) -> None:
    # A commit on the loop leaves the writer's busy timeout at 0; the writer thread's next
    # BEGIN sets it back, so it waits for another connection's lock instead of failing.
    store.commit_on_loop_when(lambda: True)
    await store.append(commit_of([("a", 1)]))
    with closing(sqlite3.connect(tmp_path / "events.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        append = asyncio.ensure_future(store.append(commit_of([("a", 2)], expected={"a": 1})))
        await asyncio.sleep(0.1)
        assert not append.done()
        other.execute("COMMIT")

    recorded = await asyncio.wait_for(append, TIMEOUT)
    assert [e.position for e in recorded] == [2]
    # And the loop commits alone again once the lock is free.
    threads = writer_threads(store)
    await store.append(commit_of([("a", 3)], expected={"a": 2}))
    assert threads == [threading.get_ident()]


async def test_another_processs_turn_is_waited_for_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = await SQLiteEventStore.open(path, writer_turns=True)
    other_process = WriterTurns(path)  # a descriptor of its own: another holder's turn
    try:
        store.commit_on_loop_when(lambda: True)
        other_process.take()
        append = asyncio.ensure_future(store.append(commit_of([("a", 1)])))
        await asyncio.sleep(0.05)
        assert not append.done()
        other_process.release()

        recorded = await asyncio.wait_for(append, TIMEOUT)
        assert [e.position for e in recorded] == [1]
    finally:
        other_process.close()
        await store.close()


async def test_a_conflict_committed_on_the_loop_is_the_same_error(
    store: SQLiteEventStore,
) -> None:
    store.commit_on_loop_when(lambda: True)
    first = commit_of([("a", 1)])
    await store.append(first)

    with pytest.raises(ConcurrencyConflictError):
        await store.append(commit_of([("a", 1)]))
    with pytest.raises(DuplicateCommandError):
        await store.append(commit_of([("b", 1)], command_id=first.command_id))

    assert [e.stream_id for e in await store.read_all()] == ["a"]


async def test_a_lone_append_that_must_go_commit_by_commit_goes_to_the_writer_thread(
    store: SQLiteEventStore,
) -> None:
    # A commit that expects nothing of a stream is judged by the unique key alone, in a
    # transaction of its own: one that may wait for the write lock, which must never
    # happen on the event loop.
    threads: list[int] = []
    write_once = store._write_once

    def spy(batch: list[Append]) -> Append | None:
        threads.append(threading.get_ident())
        return write_once(batch)

    store._write_once = spy  # type: ignore[method-assign]
    store.commit_on_loop_when(lambda: True)

    recorded = await store.append(commit_of([("a", 1)], expected={}))

    assert [e.position for e in recorded] == [1]
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()
    assert await store.read_all() == recorded
