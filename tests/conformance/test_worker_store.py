"""The conformance suite against a worker's store under ``serve --workers N`` on SQLite:
it reads and writes the file itself, taking turns at the write lock with the other
processes, and tells the supervisor's hub of its commits over a unix socket. Then what
the hub tells workers of each other's commits, and the hub's stream locks, with which
workers take turns at a contended stream."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from domain.aggregates import Product
from domain.errors import ConcurrencyConflictError, DuplicateCommandError
from domain.mapper import to_new_event
from domain.ports import Commit, EventStore
from domain.unit_of_work import AggregateCache
from server.stores.sqlite import SQLiteEventStore
from server.workers import hub_client
from server.workers.cache_follower import CacheFollower
from server.workers.hub import WorkerHub
from server.workers.hub_client import HubClient, HubLockingWorkerStore
from server.workers.hub_protocol import decode_events
from tests.conformance.contract import TIMEOUT, EventStoreContract, commit_of


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: a unix socket's path may not exceed ~107 bytes, and pytest's tmp_path
    # can be longer.
    with tempfile.TemporaryDirectory(prefix="og-") as folder:
        yield Path(folder)


async def start_hub(socket_dir: Path) -> WorkerHub:
    hub = WorkerHub(socket_dir / "hub.sock")
    await hub.start()
    return hub


class Worker:
    """A worker's store, and its aggregate cache kept up to date by a follower."""

    def __init__(self, store: HubLockingWorkerStore, client: HubClient) -> None:
        self.store = store
        self.client = client
        self.cache = AggregateCache()
        self.follower = CacheFollower(self.cache)
        self.closed = False

    @classmethod
    async def open(cls, database: Path, hub: WorkerHub) -> Worker:
        client = await HubClient.connect(hub.path)
        inner = await SQLiteEventStore.open(database, writer_turns=True)
        worker = cls(HubLockingWorkerStore(inner, client, groups_via_hub=False), client)
        client.on_others = worker.follower.committed_elsewhere
        return worker

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.store.close()


OpenWorker = Callable[[], Awaitable[Worker]]


@pytest.fixture
async def open_worker(tmp_path: Path, socket_dir: Path) -> AsyncIterator[OpenWorker]:
    """Opens workers of one gateway on one file, each with its own store; all closed at
    the end, with the hub."""
    hub = await start_hub(socket_dir)
    opened: list[Worker] = []

    async def open_one() -> Worker:
        worker = await Worker.open(tmp_path / "events.db", hub)
        opened.append(worker)
        return worker

    try:
        yield open_one
    finally:
        for worker in opened:
            await worker.close()
        await hub.close()


class TestWorkerStoreTakingTurns(EventStoreContract):
    # Other processes (and threads) open the same file as plain SQLite stores: they write
    # beside the worker's writer, through SQLite's own lock.
    supports_processes: ClassVar[bool] = True
    shares_across_threads: ClassVar[bool] = False

    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'events.db'}"

    @pytest.fixture
    async def store(self, tmp_path: Path, socket_dir: Path) -> AsyncIterator[EventStore]:
        hub = await start_hub(socket_dir)
        worker = await Worker.open(tmp_path / "events.db", hub)
        try:
            yield worker.store
        finally:
            await worker.close()
            await hub.close()


# -- what workers hear of each other ------------------------------------------------


def restocked(product: Product, quantity: int) -> Commit:
    """``product`` restocked by ``quantity``, as the command's unit of work commits it."""
    product.restock(quantity)
    event = to_new_event(product.pending[0], str(uuid.uuid4()), product.stream_id, product.version)
    template = commit_of([(product.stream_id, product.version)])
    return dataclasses.replace(template, events=[event])


async def test_a_commit_through_one_worker_wakes_the_others_and_brings_their_cache_up_to_date(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    product = Product("p")
    appended = await first.store.append(restocked(product, 5))
    product.mark_committed()
    # The second worker has used it since; the first keeps its own up to date.
    second.cache.refresh(product.clone(), appended[-1].event_id)
    first.cache.refresh(product.clone(), appended[-1].event_id)
    woke = asyncio.Event()
    second.store.add_commit_listener(woke.set)

    appended += await first.store.append(restocked(product, 7))
    mine = first.cache.get(product.stream_id)
    assert mine is not None
    mine.head = product.clone()  # as the first worker's unit of work leaves it

    await asyncio.wait_for(woke.wait(), TIMEOUT)
    assert await second.store.read_all() == appended
    async with asyncio.timeout(TIMEOUT):
        # The first commit's wake-up may be the one that set ``woke``.
        while (cached := second.cache.get(product.stream_id)) and not (  # noqa: ASYNC110
            cached.committed and cached.committed.version == 2
        ):
            await asyncio.sleep(0.01)
    # The wake-up carried the commit: the second worker holds the new state, unread.
    assert cached is not None and not cached.stale
    assert isinstance(cached.committed, Product)
    assert (cached.committed.version, cached.committed.available) == (2, 12)
    assert cached.head is cached.committed
    assert cached.committed_event == appended[-1].event_id
    assert first.cache.get(product.stream_id) is mine and not mine.stale


async def test_a_wake_up_carries_the_commits_of_the_other_workers_only(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    heard: dict[str, list[tuple[str, int]]] = {"first": [], "second": []}

    def hear(worker: str) -> Callable[[list[bytes]], None]:
        def notices(commits: list[bytes]) -> None:
            heard[worker] += [(e[1], e[2]) for commit in commits for e in decode_events(commit)]

        return notices

    first.store._hub.on_others = hear("first")
    second.store._hub.on_others = hear("second")
    await first.store.append(commit_of([("a", 1), ("a", 2), ("b", 1)]))
    await first.store.append(commit_of([("b", 2)]))
    async with asyncio.timeout(TIMEOUT):
        while dict(heard["second"]).get("b") != 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert heard["second"] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]

    await second.store.append(commit_of([("c", 1)]))
    async with asyncio.timeout(TIMEOUT):
        while not heard["first"]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    # Each heard only of the other's commits: its own leave its cache up to date.
    assert heard["first"] == [("c", 1)]
    assert heard["second"] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


async def test_workers_racing_on_one_stream_conflict_and_repeat_ids_are_duplicates(
    open_worker: OpenWorker,
) -> None:
    workers = [await open_worker() for _ in range(3)]
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


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_notices_hurry_only_for_a_worker_that_listens_or_commits_too(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    third = await open_worker()
    # Nobody listens and nobody commits: notices may wait.
    assert not any(w.client.hurrying for w in (first, second, third))

    second.client.listening(True)
    await eventually(lambda: first.client.hurrying and third.client.hurrying)
    assert not second.client.hurrying  # its own subscriptions are woken locally

    # The listener goes: no one listens any more.
    await second.close()
    await eventually(lambda: not first.client.hurrying and not third.client.hurrying)

    # A worker that commits too makes the others hurry, not itself.
    await third.store.append(commit_of([("b", 1)]))
    await eventually(lambda: first.client.hurrying)
    assert not third.client.hurrying


@pytest.fixture
def quiet_for_an_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quiet notices wait an hour: one that arrives was sent for another reason."""
    monkeypatch.setattr(hub_client, "QUIET_NOTICE_DELAY_SECONDS", 3600.0)


@pytest.mark.usefixtures("quiet_for_an_hour")
async def test_a_new_listener_does_not_wait_out_a_quiet_notice(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    woke = asyncio.Event()
    second.store.add_commit_listener(woke.set)
    await first.store.append(commit_of([("a", 1)]))
    # Nobody listens: the notice waits (here for an hour) for more commits.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(woke.wait(), 0.3)

    second.client.listening(True)
    await asyncio.wait_for(woke.wait(), TIMEOUT)
    assert [event.stream_id for event in await second.store.read_all()] == ["a"]


@pytest.mark.usefixtures("quiet_for_an_hour")
async def test_a_stopping_worker_sends_the_notices_still_waiting(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    heard: list[str] = []
    second.client.on_others = lambda notices: heard.extend(
        event[1] for notice in notices for event in decode_events(notice)
    )
    await first.store.append(commit_of([("a", 1)]))
    await first.close()
    await eventually(lambda: bool(heard))
    assert heard == ["a"]


# -- turns at a contended stream ----------------------------------------------------


async def test_workers_get_a_streams_lock_first_come_first_served(
    open_worker: OpenWorker,
) -> None:
    first, second, third = [await open_worker() for _ in range(3)]
    assert not (await first.store.lock_stream("hot")).waited
    second_turn = asyncio.ensure_future(second.store.lock_stream("hot"))
    await asyncio.sleep(0.05)  # asked before the third worker
    third_turn = asyncio.ensure_future(third.store.lock_stream("hot"))
    # Another stream's lock is nobody else's business.
    assert not (await third.store.lock_stream("cold")).waited
    await asyncio.sleep(0.1)
    assert not second_turn.done() and not third_turn.done()

    await first.store.unlock_stream("hot")
    assert (await asyncio.wait_for(second_turn, TIMEOUT)).waited
    await asyncio.sleep(0.1)
    assert not third_turn.done()
    await second.store.unlock_stream("hot")
    assert (await asyncio.wait_for(third_turn, TIMEOUT)).waited


async def test_a_turn_that_begins_reads_what_the_worker_before_it_wrote(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    await first.store.lock_stream("hot")
    turn = asyncio.ensure_future(second.store.lock_stream("hot", after_version=0))
    written = await first.store.append(commit_of([("hot", 1), ("hot", 2)]))
    await first.store.unlock_stream("hot")

    locked = await asyncio.wait_for(turn, TIMEOUT)
    assert locked.waited
    assert locked.events_after == written


async def test_a_worker_gone_in_its_turn_leaves_the_stream_to_the_next(
    open_worker: OpenWorker,
) -> None:
    first = await open_worker()
    second = await open_worker()
    await first.store.lock_stream("hot")
    turn = asyncio.ensure_future(second.store.lock_stream("hot"))
    await asyncio.sleep(0.05)
    assert not turn.done()

    await first.close()  # as a killed worker's connection closes
    assert (await asyncio.wait_for(turn, TIMEOUT)).waited


async def test_a_turn_given_up_while_waiting_is_never_granted(
    open_worker: OpenWorker,
) -> None:
    first, second, third = [await open_worker() for _ in range(3)]
    await first.store.lock_stream("hot")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(second.store.lock_stream("hot"), 0.1)  # a deadline
    turn = asyncio.ensure_future(third.store.lock_stream("hot"))
    await asyncio.sleep(0.05)

    await first.store.unlock_stream("hot")
    # The second worker gave up: the lock goes to the third, not to nobody.
    assert (await asyncio.wait_for(turn, TIMEOUT)).waited


async def test_contention_announced_by_one_worker_reaches_the_others(
    open_worker: OpenWorker,
) -> None:
    first, second, third = [await open_worker() for _ in range(3)]
    heard: dict[str, list[str]] = {"first": [], "second": [], "third": []}
    for name, worker in (("first", first), ("second", second), ("third", third)):
        worker.store.add_contention_listener(heard[name].append)

    await first.store.announce_contention("hot")
    await eventually(lambda: bool(heard["second"]) and bool(heard["third"]))
    assert heard == {"first": [], "second": ["hot"], "third": ["hot"]}
