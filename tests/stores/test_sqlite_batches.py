"""The SQLite writer decides a whole group-committed batch in Python (``sqlite_decide``), and
falls back to one savepoint per commit when it cannot; both must give every commit the
outcome it would have had if appended alone.

To put several commits into one batch for certain, the file's write lock is held from
another connection while the writer is stuck on a first "plug" commit; everything
appended meanwhile queues up and is taken as the next batch.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from domain.errors import (
    ConcurrencyConflictError,
    DomainError,
    DuplicateCommandError,
    StoreError,
)
from domain.ports import Commit, RecordedEvent
from server.stores import sqlite as sqlite_module
from server.stores.sqlite import MAX_LOOKUP, SQLiteEventStore
from server.stores.sqlite_calls import CallQueue, answer
from server.stores.sqlite_decide import decide, stream_ids
from tests.conformance.contract import TIMEOUT, commit_of


@dataclass
class Writes:
    """What the writer thread did: each batch (as command ids), and per-commit fallbacks."""

    batches: list[list[str]] = field(default_factory=list)
    per_commit_transactions: int = 0


@dataclass
class Harness:
    store: SQLiteEventStore
    path: Path
    writes: Writes


@pytest.fixture
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    path = tmp_path / "events.db"
    store = await SQLiteEventStore.open(path)
    writes = Writes()
    write, write_once = store._write, store._write_once

    def spy_write(batch: list[Any], *, one_by_one: bool = True) -> bool | None:
        writes.batches.append([append.work.command_id for append in batch])
        return write(batch, one_by_one=one_by_one)

    def spy_write_once(batch: list[Any]) -> Any:
        writes.per_commit_transactions += 1
        return write_once(batch)

    monkeypatch.setattr(store, "_write", spy_write)
    monkeypatch.setattr(store, "_write_once", spy_write_once)
    try:
        yield Harness(store, path, writes)
    finally:
        await store.close()


async def append_as_one_batch(
    harness: Harness, commits: Sequence[Commit]
) -> list[list[RecordedEvent] | BaseException]:
    """Append ``commits`` so that the writer takes all of them as one batch."""
    store, writes = harness.store, harness.writes
    plugged = len(writes.batches) + 1
    with closing(sqlite3.connect(harness.path, isolation_level=None)) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        plug = asyncio.ensure_future(store.append(commit_of([(f"plug-{plugged}", 1)])))

        def writer_is_stuck() -> bool:
            # The writer has taken the plug and now waits for the lock held above.
            while len(writes.batches) < plugged:
                if plug.done():
                    return False
                threading.Event().wait(0.001)
            return True

        assert await asyncio.wait_for(asyncio.to_thread(writer_is_stuck), TIMEOUT)
        appends = [asyncio.ensure_future(store.append(commit)) for commit in commits]
        await asyncio.sleep(0)  # each append runs to its queue.put()
        blocker.execute("ROLLBACK")
    await asyncio.wait_for(plug, TIMEOUT)
    results = await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), TIMEOUT)
    # The premise of every test here: the commits shared one transaction.
    assert writes.batches[-1] == [commit.command_id for commit in commits]
    return results


def positions(result: list[RecordedEvent] | BaseException) -> list[int]:
    assert isinstance(result, list), result
    return [event.position for event in result]


# -- one batch: duplicates, conflicts and good commits, decided or caught by the keys --------


@pytest.mark.parametrize("path", ["decided in Python", "Python check bypassed"])
async def test_one_batch_of_good_and_bad_commits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    store = harness.store
    stored = commit_of([("a", 1)])
    await store.append(stored)  # position 1; the plug takes 2
    good = commit_of([("b", 1)])
    stale = commit_of([("a", 1)], expected={"a": 0})
    lost_race = commit_of([("b", 2), ("e", 1)], expected={"b": 1, "e": 0})
    batch = [
        good,
        stale,
        commit_of([("b", 2)], expected={"b": 1}),  # follows ``good`` in the same batch
        commit_of([("d", 1)], command_id=good.command_id),  # recorded earlier in the batch
        lost_race,  # "b" was moved on by the commit two before
        commit_of([("a", 2)], command_id=stale.command_id),  # a rejected id stays free
        commit_of([("e", 1)]),  # ``lost_race`` appended nothing to "e"
    ]
    if path == "Python check bypassed":
        # Approve everything: the unique keys must catch what the check would have.
        def approve(commits: Sequence[Commit], *_: object) -> list[DomainError | None]:
            return [None] * len(commits)

        monkeypatch.setattr(sqlite_module, "decide", approve)

    results = await append_as_one_batch(harness, batch)

    assert [type(result) for result in results] == [
        list,
        ConcurrencyConflictError,
        list,
        DuplicateCommandError,
        ConcurrencyConflictError,
        list,
        list,
    ]
    # Positions follow on contiguously, in batch order, skipping the rejected commits.
    assert [positions(results[n]) for n in (0, 2, 5, 6)] == [[3], [4], [5], [6]]
    everything = await store.read_all()
    assert [e.position for e in everything] == [1, 2, 3, 4, 5, 6]
    assert [(e.stream_id, e.stream_version) for e in await store.read_stream("b")] == [
        ("b", 1),
        ("b", 2),
    ]
    assert await store.find_command(lost_race.command_id) is None
    recorded = await store.find_command(good.command_id)
    assert recorded is not None and list(recorded.events) == results[0]
    retried = await store.find_command(stale.command_id)
    assert retried is not None and list(retried.events) == results[5]
    fell_back = harness.writes.per_commit_transactions > 0
    assert fell_back == (path == "Python check bypassed")


async def test_a_command_id_stored_before_the_batch_is_a_duplicate_decided_in_the_batch(
    harness: Harness,
) -> None:
    """A client's retry of a committed command: the command bus runs it before it looks its
    id up, so its commit reaches the writer."""
    store = harness.store
    stored = commit_of([("a", 1)])
    original = await store.append(stored)
    batch = [
        commit_of([("b", 1)]),
        commit_of([("c", 1)], command_id=stored.command_id),
        commit_of([("d", 1)]),
    ]

    results = await append_as_one_batch(harness, batch)

    assert isinstance(results[1], DuplicateCommandError)
    assert [positions(results[0]), positions(results[2])] == [[3], [4]]
    assert await store.read_stream("c") == []
    record = await store.find_command(stored.command_id)
    assert record is not None and list(record.events) == original
    # Looked up with the batch: the others commit in it, not one by one behind a key error.
    assert harness.writes.per_commit_transactions == 0


async def test_only_the_command_ids_the_clients_chose_are_looked_up(harness: Harness) -> None:
    store = harness.store
    statements: list[str] = []
    store._writer.set_trace_callback(statements.append)
    fresh = commit_of([("a", 1)], server_chose_id=True)
    keyed = commit_of([("b", 1)], command_id=fresh.command_id)
    mixed = [commit_of([("c", 1)], server_chose_id=True), commit_of([("d", 1)])]

    await store.append(fresh)
    with pytest.raises(DuplicateCommandError):
        await store.append(keyed)  # a retry with the id the server chose: the client's now
    await append_as_one_batch(harness, mixed)

    def lookups(command_id: str) -> list[str]:
        return [sql for sql in statements if "FROM commands" in sql and command_id in sql]

    assert [len(lookups(c.command_id)) for c in (fresh, *mixed)] == [1, 0, 1]
    assert positions((await store.read_all())[-1:]) == [4]


async def test_a_server_chosen_id_recorded_after_all_is_caught_by_the_key(
    harness: Harness,
) -> None:
    """Not looked up, such an id reaches the commands table's primary key: the batch is
    written again commit by commit, where the key refuses that commit alone."""
    store = harness.store
    stored = commit_of([("a", 1)])
    original = await store.append(stored)
    batch = [
        commit_of([("b", 1)], server_chose_id=True),
        commit_of([("c", 1)], command_id=stored.command_id, server_chose_id=True),
        commit_of([("d", 1)], server_chose_id=True),
    ]

    results = await append_as_one_batch(harness, batch)

    assert isinstance(results[1], DuplicateCommandError)
    assert [positions(results[0]), positions(results[2])] == [[3], [4]]
    assert await store.read_stream("c") == []
    record = await store.find_command(stored.command_id)
    assert record is not None and list(record.events) == original
    assert harness.writes.per_commit_transactions == 1


async def test_a_batch_the_check_cannot_decide_goes_commit_by_commit(harness: Harness) -> None:
    store = harness.store
    # Events on a stream the commit does not name in ``expected_versions``: no version of
    # it was looked up, so only the unique key can say whether the version is free.
    unnamed = [commit_of([("a", 1)], expected={}) for _ in range(2)]
    results = await append_as_one_batch(harness, [unnamed[0], commit_of([("b", 1)]), unnamed[1]])

    assert positions(results[0]) == [2]
    assert positions(results[1]) == [3]
    assert isinstance(results[2], ConcurrencyConflictError)
    assert [e.command_id for e in await store.read_stream("a")] == [unnamed[0].command_id]
    assert harness.writes.per_commit_transactions == 1


async def test_a_commit_naming_more_streams_than_one_lookup_binds(harness: Harness) -> None:
    store = harness.store
    streams = [f"wide-{n}" for n in range(MAX_LOOKUP + 44)]
    first = await store.append(commit_of([(stream, 1) for stream in streams]))

    results = await append_as_one_batch(
        harness,
        [
            commit_of([(stream, 2) for stream in streams]),
            # Stale on one stream of the second lookup only.
            commit_of([(streams[-1], 2)], expected={streams[0]: 2, streams[-1]: 1}),
            commit_of([(streams[-1], 3)], expected={streams[0]: 2, streams[-1]: 2}),
        ],
    )

    start = len(first) + 2  # after the first commit and the plug
    assert positions(results[0]) == list(range(start, start + len(streams)))
    assert isinstance(results[1], ConcurrencyConflictError)
    assert positions(results[2]) == [start + len(streams)]
    assert harness.writes.per_commit_transactions == 0


async def test_listeners_wake_after_a_batch_that_committed_anything(harness: Harness) -> None:
    store = harness.store
    wake_ups: list[None] = []
    store.add_commit_listener(lambda: wake_ups.append(None))
    stored = commit_of([("a", 1)])
    await store.append(stored)  # decided in Python
    unnamed = commit_of([("b", 1)], expected={})
    await store.append(unnamed)  # commit by commit
    assert len(wake_ups) == 2  # run with the answers, before the appends return

    with pytest.raises(DuplicateCommandError):
        await store.append(commit_of([("c", 1)], command_id=stored.command_id))
    with pytest.raises(ConcurrencyConflictError):
        await store.append(commit_of([("b", 1)], expected={}))
    await asyncio.sleep(0.05)  # time for a wake-up that should not come

    assert len(wake_ups) == 2
    assert harness.writes.per_commit_transactions == 2


# -- decide(): the rules on their own -----------------------------------------------------


def test_decide_rejects_stale_versions_and_accepts_the_rest() -> None:
    stale = commit_of([("a", 1), ("b", 1)], expected={"a": 0, "b": 0})
    fine = commit_of([("a", 3)], expected={"a": 2})

    decisions = decide([stale, fine], {"a": 2, "b": 0})

    assert decisions is not None
    assert isinstance(decisions[0], ConcurrencyConflictError)
    assert "a is at version 2, not 0" in str(decisions[0])
    assert decisions[1] is None


def test_decide_sees_the_commits_before_it_in_the_batch() -> None:
    first = commit_of([("a", 1)])
    commits = [
        first,
        commit_of([("a", 1)], expected={"a": 0}),  # lost to ``first``
        commit_of([("a", 2)], expected={"a": 1}),  # follows ``first``
        commit_of([("b", 1)], command_id=first.command_id),
    ]

    decisions = decide(commits, {"a": 0, "b": 0})

    assert decisions is not None
    assert [type(d) for d in decisions] == [
        type(None),
        ConcurrencyConflictError,
        type(None),
        DuplicateCommandError,
    ]


def test_decide_leaves_no_trace_of_a_rejected_commit() -> None:
    rejected = commit_of([("a", 2), ("b", 1)], expected={"a": 5, "b": 0})
    commits = [
        rejected,
        commit_of([("b", 1)]),  # "b" is still at 0
        commit_of([("c", 1)], command_id=rejected.command_id),  # the id is still free
    ]

    decisions = decide(commits, {"a": 1, "b": 0, "c": 0})

    assert decisions is not None
    assert isinstance(decisions[0], ConcurrencyConflictError)
    assert decisions[1:] == [None, None]


def test_decide_rejects_a_command_id_recorded_before_the_batch() -> None:
    retry = commit_of([("a", 1)])
    commits = [retry, commit_of([("a", 1)])]  # "a" is still at 0: the retry wrote nothing

    decisions = decide(commits, {"a": 0}, recorded={retry.command_id})

    assert decisions is not None
    assert isinstance(decisions[0], DuplicateCommandError)
    assert decisions[1] is None


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([("a", 1)], {}),  # a stream the commit does not name
        ([("a", 2)], {"a": 2}),  # a version not above the current one (versions may gap)
        ([("a", 3), ("a", 3)], {"a": 2}),  # two events claiming one version
    ],
)
def test_decide_declines_what_only_the_unique_key_can_judge(
    events: list[tuple[str, int]], expected: dict[str, int]
) -> None:
    commits = [commit_of([("z", 1)]), commit_of(events, expected=expected)]
    versions = {stream: 2 if stream == "a" else 0 for stream in stream_ids(commits)}
    assert decide(commits, versions) is None


def test_stream_ids_names_each_expected_stream_once() -> None:
    commits = [commit_of([("a", 1), ("b", 1)]), commit_of([("b", 2)], expected={"b": 1, "c": 0})]
    assert stream_ids(commits) == ["a", "b", "c"]


# -- handing calls to the store's threads ------------------------------------------------


async def test_a_call_answered_without_an_outcome_fails_as_a_store_error() -> None:
    calls: CallQueue[str, str] = CallQueue()
    forgotten, handled = calls.submit("work"), calls.submit("more")
    batch, stop = calls.take(limit=8)
    assert [call.work for call in batch] == ["work", "more"] and not stop

    batch[1].outcome = "done"
    answer(batch)

    with pytest.raises(StoreError, match="did not handle"):
        await asyncio.wait_for(forgotten, TIMEOUT)
    assert await asyncio.wait_for(handled, TIMEOUT) == "done"
