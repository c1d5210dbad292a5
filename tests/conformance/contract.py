"""What every ``EventStore`` backend must do, written once and run against each backend.

A backend's test module subclasses ``EventStoreContract`` with a ``Test…`` name and provides:

- ``store_url``: a fixture returning a URL that ``open_store`` accepts and that names a fresh,
  empty store (it calls ``pytest.skip`` for a backend without one, such as memory);
- ``store``: an async fixture yielding an opened store; the default opens ``store_url``
  and closes it afterwards, so only a backend without a URL needs to override it;
- ``supports_processes``: True if several OS processes may open ``store_url`` and append
  at once (those tests are skipped otherwise);
- ``shares_across_threads``: True if one store object may be used from several threads,
  each running its own event loop; if False the thread test gives each thread its own
  store opened from ``store_url`` instead.

``close()`` may be called more than once (the fixture closes a store a test closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import os
import threading
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import ClassVar

import pytest

from domain.errors import ConcurrencyConflictError, DuplicateCommandError
from domain.ports import (
    Commit,
    EventStore,
    NewEvent,
    RecordedEvent,
    Snapshot,
    SnapshotStore,
    event_payload,
)
from server.stores.factory import open_store

OCCURRED_AT = dt.datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=dt.UTC)
SHARED = "counter-shared"
"""The one stream every concurrent writer appends to, to provoke version conflicts."""
TIMEOUT = 120.0
"""Upper bound for any multi-writer test, so that a deadlock fails instead of hanging."""


def commit_of(
    events: Sequence[tuple[str, int]],
    *,
    command_id: str | None = None,
    expected: Mapping[str, int] | None = None,
    data: Sequence[bytes] | None = None,
    occurred_at: dt.datetime = OCCURRED_AT,
    user_id: str = "user-1",
    correlation_id: str = "correlation-1",
    server_chose_id: bool = False,
) -> Commit:
    """A commit with one event per ``(stream_id, stream_version)``.

    By default every stream is expected at the version just before its first event.
    """
    if expected is None:
        firsts: dict[str, int] = {}
        for stream_id, version in events:
            firsts.setdefault(stream_id, version)
        expected = {stream_id: version - 1 for stream_id, version in firsts.items()}
    payloads = data if data is not None else [b'{"n": %d}' % n for n in range(len(events))]
    return Commit(
        command_id=command_id or str(uuid.uuid4()),
        fingerprint=f"fingerprint-{len(events)}",
        correlation_id=correlation_id,
        user_id=user_id,
        occurred_at=occurred_at,
        expected_versions=expected,
        events=[
            NewEvent(str(uuid.uuid4()), stream_id, version, "TestEvent", payload)
            for (stream_id, version), payload in zip(events, payloads, strict=True)
        ],
        server_chose_id=server_chose_id,
    )


async def append_counted(store: EventStore, own_stream: str, own_version: int) -> Commit:
    """Append one event to ``own_stream`` and one to the shared stream, as one commit.

    Reads the shared stream's version and retries on conflict, like the command bus does,
    so concurrent writers serialise through optimistic concurrency alone.
    """
    for _ in range(1000):
        shared_version = len(await store.read_stream(SHARED))
        commit = commit_of([(own_stream, own_version), (SHARED, shared_version + 1)])
        try:
            await store.append(commit)
        except ConcurrencyConflictError:
            await asyncio.sleep(0.001)
            continue
        return commit
    raise AssertionError(f"{own_stream} v{own_version} never won the shared stream")


async def _write_counted(store: EventStore, writer: str, commits: int) -> list[str]:
    done = [await append_counted(store, f"own-{writer}", n) for n in range(1, commits + 1)]
    return [commit.command_id for commit in done]


async def _open_and_write(url: str, writer: str, commits: int) -> list[str]:
    store = await open_store(url)
    try:
        return await _write_counted(store, writer, commits)
    finally:
        await store.close()


def write_in_process(url: str, writer: str, commits: int) -> list[str]:
    """Entry point of a child process: open the store at ``url`` and append ``commits``."""
    return asyncio.run(_open_and_write(url, writer, commits))


async def assert_counted_history(
    store: EventStore, command_ids: Sequence[str], writers: int, commits: int
) -> None:
    """Every counted commit is there exactly once, positions 1..N with no gap."""
    everything = await read_everything(store)
    assert [e.position for e in everything] == list(range(1, 2 * writers * commits + 1))
    assert await store.head_position() == len(everything)
    shared = await store.read_stream(SHARED)
    assert [e.stream_version for e in shared] == list(range(1, writers * commits + 1))
    assert len({e.command_id for e in shared}) == len(shared)
    assert sorted(e.command_id for e in shared) == sorted(command_ids)
    for command_id in command_ids:
        record = await store.find_command(command_id)
        assert record is not None
        assert [e.stream_id for e in record.events][1] == SHARED
        first = record.events[0].position
        assert [e.position for e in record.events] == [first, first + 1]


async def tail(store: EventStore, writers_done: asyncio.Event) -> list[RecordedEvent]:
    """Follow ``read_all`` from position 0 while others write, as a subscriber does.

    A tailer never looks below the last position it saw, so an event that became
    visible only after a higher one (the classic sequence race) shows up as a gap.
    """
    seen: list[RecordedEvent] = []
    while True:
        finished = writers_done.is_set()
        batch = await store.read_all(seen[-1].position if seen else 0, 50)
        seen.extend(batch)
        if not batch:
            if finished:
                return seen
            await asyncio.sleep(0.001)


async def read_everything(store: EventStore, page: int = 7) -> list[RecordedEvent]:
    """All events through ``read_all`` in small pages, checking each page's order."""
    events: list[RecordedEvent] = []
    while batch := await store.read_all(events[-1].position if events else 0, page):
        assert len(batch) <= page
        events.extend(batch)
    return events


class EventStoreContract:
    supports_processes: ClassVar[bool] = False
    shares_across_threads: ClassVar[bool] = True

    @pytest.fixture
    async def store(self, store_url: str) -> AsyncIterator[EventStore]:
        opened = await open_store(store_url)
        try:
            yield opened
        finally:
            await opened.close()

    # -- append and read ------------------------------------------------------------

    async def test_empty_store_has_nothing(self, store: EventStore) -> None:
        assert await store.head_position() == 0
        assert await store.read_all() == []
        assert await store.read_stream("nothing-here") == []
        assert await store.find_command(str(uuid.uuid4())) is None

    async def test_append_returns_recorded_events_in_commit_order(self, store: EventStore) -> None:
        commit = commit_of([("order-1", 1), ("product-a", 1), ("product-b", 1)])
        recorded = await store.append(commit)

        assert [e.position for e in recorded] == [1, 2, 3]
        for new, got in zip(commit.events, recorded, strict=True):
            assert (got.event_id, got.stream_id, got.stream_version) == (
                new.event_id,
                new.stream_id,
                new.stream_version,
            )
            assert (got.event_type, got.data) == (new.event_type, new.data)
            assert (got.command_id, got.correlation_id, got.user_id) == (
                commit.command_id,
                "correlation-1",
                "user-1",
            )
            assert got.occurred_at == OCCURRED_AT
        assert await store.read_all() == recorded
        assert await store.read_stream("product-a") == [recorded[1]]

    async def test_read_stream_after_version(self, store: EventStore) -> None:
        for version in (1, 2, 3):
            await store.append(commit_of([("a", version), (f"other-{version}", 1)]))

        assert [e.stream_version for e in await store.read_stream("a")] == [1, 2, 3]
        assert [e.stream_version for e in await store.read_stream("a", 1)] == [2, 3]
        assert [e.position for e in await store.read_stream("a", 1)] == [3, 5]
        assert await store.read_stream("a", 3) == []

    async def test_read_all_pages_with_limit(self, store: EventStore) -> None:
        for n in range(1, 11):
            await store.append(commit_of([(f"s-{n}", 1)]))

        assert [e.position for e in await store.read_all(0, 3)] == [1, 2, 3]
        assert [e.position for e in await store.read_all(3, 3)] == [4, 5, 6]
        assert [e.position for e in await store.read_all(9, 5)] == [10]
        assert await store.read_all(10) == []
        assert await read_everything(store, page=3) == await store.read_all(0, 100)

    async def test_head_position_is_the_last_committed_position(self, store: EventStore) -> None:
        await store.append(commit_of([("a", 1), ("b", 1)]))
        assert await store.head_position() == 2
        await store.append(commit_of([("a", 2)]))
        assert await store.head_position() == 3

    # -- optimistic concurrency -----------------------------------------------------

    async def test_conflict_when_the_stream_moved_on(self, store: EventStore) -> None:
        first = await store.append(commit_of([("a", 1)]))
        stale = commit_of([("a", 1)], expected={"a": 0})

        with pytest.raises(ConcurrencyConflictError):
            await store.append(stale)

        assert await store.read_all() == first
        assert await store.find_command(stale.command_id) is None

    async def test_conflict_when_expected_version_is_ahead(self, store: EventStore) -> None:
        with pytest.raises(ConcurrencyConflictError):
            await store.append(commit_of([("a", 4)], expected={"a": 3}))
        assert await store.head_position() == 0

    async def test_conflict_on_one_stream_appends_on_none(self, store: EventStore) -> None:
        before = await store.append(commit_of([("a", 1), ("b", 1)]))
        # "a" is expected correctly, "b" is stale: nothing at all may be appended.
        mixed = commit_of([("a", 2), ("b", 2)], expected={"a": 1, "b": 0})

        with pytest.raises(ConcurrencyConflictError):
            await store.append(mixed)

        assert await store.read_all() == before
        assert await store.read_stream("a", 1) == []
        assert await store.find_command(mixed.command_id) is None

    async def test_conflict_on_a_stream_the_commit_only_read(self, store: EventStore) -> None:
        await store.append(commit_of([("a", 1)]))
        depends_on_a = commit_of([("b", 1)], expected={"a": 0, "b": 0})

        with pytest.raises(ConcurrencyConflictError):
            await store.append(depends_on_a)
        assert await store.read_stream("b") == []

    async def test_failed_append_leaves_no_gap_in_positions(self, store: EventStore) -> None:
        await store.append(commit_of([("a", 1)]))
        with pytest.raises(ConcurrencyConflictError):
            await store.append(commit_of([("a", 1), ("c", 1)], expected={"a": 0, "c": 0}))
        after = await store.append(commit_of([("b", 1)]))
        assert [e.position for e in after] == [2]

    # -- commits that follow one another (a hot stream's pipelined commands) ----------

    async def test_a_commit_naming_another_last_event_conflicts(self, store: EventStore) -> None:
        first = commit_of([("s", 1)])
        await store.append(first)

        stale = dataclasses.replace(commit_of([("s", 2)]), follows={"s": str(uuid.uuid4())})
        with pytest.raises(ConcurrencyConflictError):
            await store.append(stale)

        fresh = dataclasses.replace(commit_of([("s", 2)]), follows={"s": first.events[0].event_id})
        assert [e.stream_version for e in await store.append(fresh)] == [2]

    async def test_appends_started_in_order_commit_in_order(self, store: EventStore) -> None:
        """Each commit expects the state the one before it leaves, and all are started
        before any is answered: all of them commit, one after another."""
        commits = [commit_of([("s", 1)])]
        for version in range(2, 6):
            follows = {"s": commits[-1].events[0].event_id}
            commits.append(dataclasses.replace(commit_of([("s", version)]), follows=follows))
        appends = [asyncio.ensure_future(store.append(commit)) for commit in commits]

        recorded = await asyncio.gather(*appends)

        assert [events[0].stream_version for events in recorded] == [1, 2, 3, 4, 5]
        assert [events[0].position for events in recorded] == [1, 2, 3, 4, 5]

    async def test_a_commit_following_a_failed_one_conflicts_where_another_filled_its_version(
        self, store: EventStore
    ) -> None:
        """The failed commit's version is taken by other events meanwhile: the commit
        decided on the failed one's state expects that version, but follows the failed
        one's event, so it must still conflict."""
        first = commit_of([("s", 1)])
        await store.append(first)
        after_first = {"s": first.events[0].event_id}
        failed = dataclasses.replace(
            commit_of([("s", 2)], command_id=first.command_id), follows=after_first
        )
        other = dataclasses.replace(commit_of([("s", 2)]), follows=after_first)
        decided_on_failed = dataclasses.replace(
            commit_of([("s", 3)]), follows={"s": failed.events[0].event_id}
        )
        decided_on_other = dataclasses.replace(
            commit_of([("s", 3)]), follows={"s": other.events[0].event_id}
        )
        appends = [
            asyncio.ensure_future(store.append(commit))
            for commit in (failed, other, decided_on_failed, decided_on_other)
        ]

        outcomes = await asyncio.gather(*appends, return_exceptions=True)

        assert isinstance(outcomes[0], DuplicateCommandError)
        assert isinstance(outcomes[2], ConcurrencyConflictError)
        stream = await store.read_stream("s")
        assert [e.event_id for e in stream] == [
            first.events[0].event_id,
            other.events[0].event_id,
            decided_on_other.events[0].event_id,
        ]

    # -- idempotency records --------------------------------------------------------

    async def test_find_command_returns_the_committed_events(self, store: EventStore) -> None:
        commit = commit_of([("order-1", 1), ("product-a", 1)])
        recorded = await store.append(commit)

        record = await store.find_command(commit.command_id)
        assert record is not None
        assert (record.command_id, record.fingerprint) == (commit.command_id, commit.fingerprint)
        assert list(record.events) == recorded

    async def test_duplicate_command_id_is_rejected_and_appends_nothing(
        self, store: EventStore
    ) -> None:
        first = commit_of([("a", 1)])
        recorded = await store.append(first)
        again = commit_of([("b", 1)], command_id=first.command_id)

        with pytest.raises(DuplicateCommandError):
            await store.append(again)

        assert await store.read_all() == recorded
        record = await store.find_command(first.command_id)
        assert record is not None and list(record.events) == recorded

    async def test_a_command_id_the_server_chose_is_recorded_like_any_other(
        self, store: EventStore
    ) -> None:
        """A store need not look such an id up, but the caller learns it from the answer
        and may retry with it."""
        fresh = commit_of([("a", 1)], server_chose_id=True)
        recorded = await store.append(fresh)

        record = await store.find_command(fresh.command_id)
        assert record is not None and list(record.events) == recorded
        with pytest.raises(DuplicateCommandError):
            await store.append(commit_of([("b", 1)], command_id=fresh.command_id))
        assert await store.read_all() == recorded

    async def test_a_command_id_said_to_be_fresh_but_recorded_is_still_a_duplicate(
        self, store: EventStore
    ) -> None:
        stored = commit_of([("a", 1)])
        recorded = await store.append(stored)
        again = commit_of([("b", 1)], command_id=stored.command_id, server_chose_id=True)

        with pytest.raises(DuplicateCommandError):
            await store.append(again)

        assert await store.read_all() == recorded
        assert (await store.append(commit_of([("b", 1)], server_chose_id=True)))[0].position == 2

    async def test_retries_among_concurrent_commits_are_rejected_and_the_rest_commit(
        self, store: EventStore
    ) -> None:
        """The command bus may append a client's retry of a committed command before it
        looks the id up, so retries arrive among new commits, in the same batches."""
        stored = [commit_of([(f"stored-{n}", 1)]) for n in range(3)]
        for commit in stored:
            await store.append(commit)
        fresh = [commit_of([(f"fresh-{n}", 1)]) for n in range(12)]
        retries = [
            commit_of([(f"retry-{n}", 1)], command_id=c.command_id) for n, c in enumerate(stored)
        ]
        commits = fresh[:4] + retries[:1] + fresh[4:8] + retries[1:] + fresh[8:]

        results = await asyncio.wait_for(
            asyncio.gather(*(store.append(c) for c in commits), return_exceptions=True), TIMEOUT
        )

        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(refused) == len(retries)
        assert all(isinstance(r, DuplicateCommandError) for r in refused)
        assert sorted(e.position for r in results if isinstance(r, list) for e in r) == list(
            range(len(stored) + 1, len(stored) + len(fresh) + 1)
        )
        assert {e.stream_id for e in await store.read_all()} == {
            *(f"stored-{n}" for n in range(3)),
            *(f"fresh-{n}" for n in range(12)),
        }

    async def test_a_failed_command_is_not_recorded_and_can_run_again(
        self, store: EventStore
    ) -> None:
        await store.append(commit_of([("a", 1)]))
        command_id = str(uuid.uuid4())
        with pytest.raises(ConcurrencyConflictError):
            await store.append(commit_of([("a", 1)], command_id=command_id, expected={"a": 0}))

        retried = await store.append(commit_of([("a", 2)], command_id=command_id))

        record = await store.find_command(command_id)
        assert record is not None and list(record.events) == retried

    # -- what is stored comes back exactly ------------------------------------------

    async def test_data_bytes_round_trip_exactly(self, store: EventStore) -> None:
        payloads = [b"", bytes(range(256)), b"\x00\xff\xfe not utf-8 \xc3", os.urandom(100_000)]
        commit = commit_of([(f"bytes-{n}", 1) for n in range(len(payloads))], data=payloads)
        await store.append(commit)

        assert [e.data for e in await store.read_all()] == payloads
        record = await store.find_command(commit.command_id)
        assert record is not None and [e.data for e in record.events] == payloads

    async def test_each_event_keeps_its_schema_version(self, store: EventStore) -> None:
        plain = commit_of([("versions", 1), ("versions", 2), ("versions", 3)])
        commit = dataclasses.replace(
            plain,
            events=[
                dataclasses.replace(event, schema_version=version)
                for event, version in zip(plain.events, (1, 7, 2), strict=True)
            ],
        )
        appended = await store.append(commit)

        assert [e.schema_version for e in appended] == [1, 7, 2]
        assert await store.read_all() == appended
        assert await store.read_stream("versions", 1) == appended[1:]
        record = await store.find_command(commit.command_id)
        assert record is not None and list(record.events) == appended

    async def test_the_latest_snapshot_of_a_stream_is_kept(self, store: EventStore) -> None:
        assert isinstance(store, SnapshotStore)
        assert await store.load_snapshot("snap") is None
        first = Snapshot("snap", 100, 1, b'{"available": 5}')
        await store.save_snapshot(first)
        assert await store.load_snapshot("snap") == first
        later = Snapshot("snap", 200, 2, bytes(range(256)))
        await store.save_snapshot(later)
        await store.save_snapshot(first)  # an older one arriving late
        assert await store.load_snapshot("snap") == later
        assert await store.load_snapshot("other") is None

    async def test_a_snapshot_is_read_with_the_events_after_it(self, store: EventStore) -> None:
        assert isinstance(store, SnapshotStore)
        appended = await store.append(commit_of([("snapped", n) for n in range(1, 6)]))
        payloads = [event_payload(e) for e in appended]
        assert await store.load_snapshot_and_events("snapped") == (None, payloads)
        snapshot = Snapshot("snapped", 3, 1, b'{"available": 3}')
        await store.save_snapshot(snapshot)
        assert await store.load_snapshot_and_events("snapped") == (snapshot, payloads[3:])
        latest = Snapshot("snapped", 5, 1, b'{"available": 5}')
        await store.save_snapshot(latest)
        assert await store.load_snapshot_and_events("snapped") == (latest, [])
        assert await store.load_snapshot_and_events("none") == (None, [])

    async def test_occurred_at_comes_back_as_aware_utc(self, store: EventStore) -> None:
        india = dt.timezone(dt.timedelta(hours=5, minutes=30))
        occurred_at = dt.datetime(2026, 7, 1, 23, 59, 58, 123456, tzinfo=india)
        commit = commit_of([("a", 1)], occurred_at=occurred_at)
        appended = await store.append(commit)
        record = await store.find_command(commit.command_id)
        assert record is not None

        for event in (*appended, *await store.read_all(), *await store.read_stream("a")):
            assert event.occurred_at == occurred_at
            assert event.occurred_at.utcoffset() == dt.timedelta(0)
        assert record.events[0].occurred_at.utcoffset() == dt.timedelta(0)

    async def test_text_fields_round_trip(self, store: EventStore) -> None:
        commit = commit_of(
            [("product-ü-💡", 1)], user_id="Zoë «admin» 用户", correlation_id="corr'; --"
        )
        await store.append(commit)
        (event,) = await store.read_stream("product-ü-💡")
        assert (event.user_id, event.correlation_id) == ("Zoë «admin» 用户", "corr'; --")

    # -- concurrency ----------------------------------------------------------------

    async def test_concurrent_tasks_lose_no_event(self, store: EventStore) -> None:
        commits = [commit_of([(f"order-{n}", 1), (f"product-{n}", 1)]) for n in range(60)]
        written = asyncio.Event()
        tailer = asyncio.ensure_future(tail(store, written))

        results = await asyncio.wait_for(
            asyncio.gather(*(store.append(c) for c in commits)), TIMEOUT
        )
        written.set()

        positions = sorted(e.position for result in results for e in result)
        assert positions == list(range(1, 121))
        for result in results:
            assert result[1].position == result[0].position + 1
        assert len(await read_everything(store)) == 120
        seen = await asyncio.wait_for(tailer, TIMEOUT)
        assert [e.position for e in seen] == list(range(1, 121))

    async def test_concurrent_tasks_serialise_on_one_stream(self, store: EventStore) -> None:
        commits = await asyncio.wait_for(
            asyncio.gather(*(append_counted(store, f"own-{n}", 1) for n in range(20))), TIMEOUT
        )
        await assert_counted_history(store, [c.command_id for c in commits], 20, 1)

    async def test_threads_with_their_own_event_loops(
        self, store: EventStore, request: pytest.FixtureRequest
    ) -> None:
        writers, commits = 4, 10
        url = None if self.shares_across_threads else request.getfixturevalue("store_url")

        def run(writer: str) -> list[str]:
            if url is not None:
                return asyncio.run(_open_and_write(url, writer, commits))
            return asyncio.run(_write_counted(store, writer, commits))

        threads = [asyncio.to_thread(run, f"thread-{n}") for n in range(writers)]
        done = await asyncio.wait_for(asyncio.gather(*threads), TIMEOUT)

        await assert_counted_history(store, list(itertools.chain(*done)), writers, commits)

    async def test_several_processes_append_to_one_store(
        self, store: EventStore, request: pytest.FixtureRequest
    ) -> None:
        if not self.supports_processes:
            pytest.skip("this store lives in one process")
        url: str = request.getfixturevalue("store_url")
        writers, commits = 3, 12
        loop = asyncio.get_running_loop()
        written = asyncio.Event()
        tailer = asyncio.ensure_future(tail(store, written))
        # spawn, not fork: a forked child would inherit this process's threads and locks.
        with ProcessPoolExecutor(writers, mp_context=get_context("spawn")) as pool:
            children = [
                loop.run_in_executor(pool, write_in_process, url, f"process-{n}", commits)
                for n in range(writers)
            ]
            done = await asyncio.wait_for(asyncio.gather(*children), TIMEOUT)
        written.set()

        await assert_counted_history(store, list(itertools.chain(*done)), writers, commits)
        seen = await asyncio.wait_for(tailer, TIMEOUT)
        assert seen == await read_everything(store)

    async def test_another_instance_on_the_same_url_shares_the_log(
        self, store: EventStore, store_url: str
    ) -> None:
        first = await store.append(commit_of([("a", 1)]))
        other = await open_store(store_url)
        try:
            assert await other.read_all() == first
            second = await other.append(commit_of([("a", 2)]))
            assert [e.position for e in second] == [2]
            with pytest.raises(ConcurrencyConflictError):
                await other.append(commit_of([("a", 2)], expected={"a": 1}))
        finally:
            await other.close()
        assert await store.read_stream("a") == [*first, *second]

    # -- wake-ups and shutdown ------------------------------------------------------

    async def test_commit_listener_runs_on_the_loop_after_commit(self, store: EventStore) -> None:
        loop = asyncio.get_running_loop()
        woke = asyncio.Event()
        heads: list[asyncio.Task[int]] = []
        threads: list[int] = []

        def listener() -> None:
            threads.append(threading.get_ident())
            heads.append(loop.create_task(store.head_position()))
            woke.set()

        store.add_commit_listener(listener)
        appended = await store.append(commit_of([("a", 1), ("b", 1)]))
        await asyncio.wait_for(woke.wait(), 10)

        assert set(threads) == {threading.get_ident()}
        assert await heads[0] >= appended[-1].position

    async def test_close_finishes_pending_appends(self, store: EventStore) -> None:
        commits = [commit_of([(f"late-{n}", 1)]) for n in range(30)]
        appends = [asyncio.ensure_future(store.append(c)) for c in commits]
        await asyncio.sleep(0)

        await asyncio.wait_for(store.close(), TIMEOUT)

        results = await asyncio.wait_for(asyncio.gather(*appends), TIMEOUT)
        assert sorted(e.position for result in results for e in result) == list(range(1, 31))
        await store.close()
