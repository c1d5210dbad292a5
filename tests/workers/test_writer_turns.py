"""SQLite writers of several processes (``serve --workers N``) take turns at the file's
write lock in the kernel (``server.stores.sqlite_turns``), not in SQLite's busy handler."""

from __future__ import annotations

import asyncio
from pathlib import Path

from domain.ports import Snapshot
from server.stores.sqlite import SQLiteEventStore
from server.stores.sqlite_turns import WriterTurns
from tests.conformance.contract import TIMEOUT, commit_of

HELD = 0.3
"""How long another writer holds its turn: an append must still be waiting after it."""


async def test_an_append_waits_for_the_turn_another_writer_holds_then_commits(
    tmp_path: Path,
) -> None:
    database = tmp_path / "events.db"
    store = await SQLiteEventStore.open(database, writer_turns=True)
    other = WriterTurns(database)  # another process's writer, as the kernel sees it
    try:
        await asyncio.to_thread(other.take)
        appending = [
            asyncio.ensure_future(store.append(commit_of([(f"s{n}", 1)]))) for n in range(5)
        ]
        await asyncio.sleep(HELD)
        assert not any(append.done() for append in appending)

        other.release()
        recorded = await asyncio.wait_for(asyncio.gather(*appending), TIMEOUT)
        # Queued while the other writer had its turn, they all committed in this one.
        assert sorted(events[0].position for events in recorded) == [1, 2, 3, 4, 5]
    finally:
        other.close()
        await store.close()


async def test_a_snapshot_waits_for_the_turn_another_writer_holds_then_is_saved(
    tmp_path: Path,
) -> None:
    # Written without a turn, a snapshot met the other writer at SQLite's lock and lost
    # to it in the busy handler, this process's appends queued behind it.
    database = tmp_path / "events.db"
    store = await SQLiteEventStore.open(database, writer_turns=True)
    other = WriterTurns(database)
    try:
        await asyncio.to_thread(other.take)
        saving = asyncio.ensure_future(store.save_snapshot(Snapshot("s", 25, 1, b"{}")))
        await asyncio.sleep(HELD)
        assert not saving.done()

        other.release()
        await asyncio.wait_for(saving, TIMEOUT)
        loaded = await store.load_snapshot("s")
        assert loaded is not None and loaded.stream_version == 25
    finally:
        other.close()
        await store.close()


async def test_writers_of_one_file_taking_turns_lose_no_commit_and_leave_no_gap(
    tmp_path: Path,
) -> None:
    database = tmp_path / "events.db"
    stores = [await SQLiteEventStore.open(database, writer_turns=True) for _ in range(3)]
    try:
        commits = [commit_of([(f"s{n}", 1), (f"s{n}", 2)]) for n in range(300)]
        await asyncio.wait_for(
            asyncio.gather(*(stores[n % 3].append(c) for n, c in enumerate(commits))), TIMEOUT
        )
        positions = [event.position for event in await stores[0].read_all(0, 1000)]
        assert positions == list(range(1, 601))
    finally:
        for store in stores:
            await store.close()
