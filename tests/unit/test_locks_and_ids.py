"""Per-stream locks and random ids, the domain's small building blocks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from domain import handlers
from domain.errors import DomainError
from domain.events import StockReserved
from domain.ids import HEX_IDS_PER_BATCH, new_uuid, random_hex_id
from domain.locks import Joined, StreamLocks, StreamTurns
from domain.mapper import to_domain_event
from domain.ports import Commit, RecordedEvent, StreamLocked
from domain.unit_of_work import UnitsOfWork
from server.stores.memory import MemoryEventStore
from tests.unit.test_bus import create, restock


def test_new_uuid_is_a_version_7_uuid_in_canonical_form() -> None:
    ids = [new_uuid() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # lower case, hyphenated, 36 characters
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    # The variant's digit keeps two random bits (74 in all).
    assert {value[19] for value in ids} == set("89ab")


def test_new_uuids_sort_by_creation_time_and_carry_it() -> None:
    """Ids made in different milliseconds sort in creation order (index locality)."""
    before = time.time_ns() // 1_000_000
    first = new_uuid()
    time.sleep(0.002)
    second = new_uuid()
    after = time.time_ns() // 1_000_000
    assert first < second
    stamp = int(first.replace("-", "")[:12], 16)
    assert before <= stamp <= after


def test_ids_made_on_many_threads_at_once_are_all_different() -> None:
    """The random bytes come from one shared pool: no two threads may get the same slice."""
    made: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(len(made))

    def make(into: list[str]) -> None:
        start.wait(timeout=10)
        into.extend(new_uuid() for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(ids,)) for ids in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    ids = [value for ids in made for value in ids]
    assert len(ids) == 20_000
    assert len({value[14:] for value in ids}) == len(ids)  # the random part alone differs


def test_random_hex_ids_are_32_fresh_hex_digits_across_batches() -> None:
    ids = [random_hex_id() for _ in range(3 * HEX_IDS_PER_BATCH + 1)]
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)
    assert all(value == value.lower() for value in ids)
    assert len(set(ids)) == len(ids)


FORK_SCRIPT = """
import os, sys
from domain.ids import new_uuid, random_hex_id
new_uuid(), random_hex_id()  # the parent has a pool and batches with some left in them
reader, writer = os.pipe()
child = os.fork()
if child == 0:
    os.write(writer, f"{new_uuid()} {random_hex_id()}".encode())
    os._exit(0)
os.waitpid(child, 0)
print(os.read(reader, 128).decode(), new_uuid(), random_hex_id())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_does_not_reuse_its_parents_random_bytes() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    child_id, child_hex_id, parent_id, parent_hex_id = result.stdout.split()
    assert child_id[14:] != parent_id[14:]
    assert child_hex_id != parent_hex_id


async def test_a_held_stream_makes_the_next_command_wait_and_others_pass() -> None:
    locks = StreamLocks()
    held = await locks.acquire(["order-1", "product-a"])
    waiting = asyncio.create_task(locks.acquire(["product-a"]))
    other = await asyncio.wait_for(locks.acquire(["product-b"]), 5)
    await asyncio.sleep(0.01)
    assert not waiting.done()
    locks.release(held)
    assert await asyncio.wait_for(waiting, 5) == ("product-a",)
    locks.release(waiting.result())
    locks.release(other)


async def test_locks_are_taken_in_sorted_order_so_crossing_commands_cannot_deadlock() -> None:
    locks = StreamLocks()

    async def command(streams: list[str]) -> None:
        for _ in range(50):
            held = await locks.acquire(streams)
            await asyncio.sleep(0)
            locks.release(held)

    await asyncio.wait_for(
        asyncio.gather(command(["product-a", "product-b"]), command(["product-b", "product-a"])),
        10,
    )


async def test_a_cancelled_wait_releases_what_it_had_taken_and_forgets_unused_locks() -> None:
    locks = StreamLocks()
    blocker = await locks.acquire(["product-b"])
    # Takes product-a, then waits for product-b.
    waiting = asyncio.create_task(locks.acquire(["product-a", "product-b"]))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # product-a was given back: another command takes it at once.
    again = await asyncio.wait_for(locks.acquire(["product-a"]), 5)
    locks.release(again)
    locks.release(blocker)
    # Nobody holds or waits for anything: the table is empty again.
    assert locks._locks == {} and locks._waiters == {}


class SharedLocks:
    """Stands for the database's locks, shared by the ``StreamTurns`` of two replicas
    (asyncio's lock, like PostgreSQL's lock queue, lets its waiters in first come, first
    served)."""

    def __init__(
        self,
        table: dict[str, asyncio.Lock],
        heard: list[Callable[[str], None]] | None = None,
        read: Callable[[str, int], Awaitable[list[RecordedEvent]]] | None = None,
    ) -> None:
        self._table = table
        self._heard = heard if heard is not None else []
        self._own: list[Callable[[str], None]] = []
        self._read = read or MemoryEventStore().read_stream

    async def lock_stream(self, stream_id: str, after_version: int | None = None) -> StreamLocked:
        lock = self._table.setdefault(stream_id, asyncio.Lock())
        waited = lock.locked()
        await lock.acquire()
        if after_version is None:
            return StreamLocked(waited)
        return StreamLocked(waited, await self._read(stream_id, after_version))

    async def unlock_stream(self, stream_id: str) -> None:
        self._table[stream_id].release()

    async def announce_contention(self, stream_id: str) -> None:
        for listener in self._heard:
            if listener not in self._own:
                listener(stream_id)

    def add_contention_listener(self, listener: Callable[[str], None]) -> None:
        self._heard.append(listener)
        self._own.append(listener)


def turns_of(joined: list[Joined]) -> list[tuple[str, bool]]:
    """Each stream joined, and whether its turn began with this command."""
    return [(one.stream_id, one.began) for one in joined]


async def test_replicas_take_turns_at_a_contended_stream_and_neither_keeps_it() -> None:
    table: dict[str, asyncio.Lock] = {}
    first, second = (StreamTurns(SharedLocks(table), quantum=0.05, linger=0) for _ in "ab")
    for turns in (first, second):
        turns.contended(["product-a"])

    mine = await first.join(["product-a"])
    assert turns_of(mine) == [("product-a", True)], "the first command starts the turn"
    joined = await first.join(["product-a"])
    assert turns_of(joined) == [("product-a", False)], "a command while the turn is young joins it"
    theirs = asyncio.create_task(second.join(["product-a"]))
    await asyncio.sleep(0.06)
    assert not theirs.done(), "the other replica waits for the turn to end"
    # The turn is old now: this replica's next command waits behind the other replica.
    late = asyncio.create_task(first.join(["product-a"]))
    first.leave(mine)
    first.leave(joined)
    assert turns_of(await asyncio.wait_for(theirs, 5)) == [("product-a", True)]
    await asyncio.sleep(0.01)
    assert not late.done()
    second.leave(theirs.result())
    assert turns_of(await asyncio.wait_for(late, 5)) == [("product-a", True)]
    first.leave(late.result())


async def test_a_command_that_gives_up_before_its_turn_begins_does_not_keep_the_lock() -> None:
    """A caller's deadline passes while its command waits for the turn another command of
    the same replica is taking: the turn still ends with the last command in it, and lets
    go of the lock for the other replica."""
    table: dict[str, asyncio.Lock] = {}
    mine, theirs = (StreamTurns(SharedLocks(table), linger=0) for _ in "ab")
    mine.contended(["product-a"])
    theirs.contended(["product-a"])
    held = await theirs.join(["product-a"])

    starting = asyncio.create_task(mine.join(["product-a"]))
    await asyncio.sleep(0.01)
    giving_up = asyncio.create_task(mine.join(["product-a"]))
    await asyncio.sleep(0.01)
    giving_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await giving_up
    theirs.leave(held)
    mine.leave(await asyncio.wait_for(starting, 5))

    again = await asyncio.wait_for(theirs.join(["product-a"]), 5)
    assert turns_of(again) == [("product-a", True)], "the other replica gets its turn"
    theirs.leave(again)


async def test_streams_nobody_else_writes_never_take_turns() -> None:
    table: dict[str, asyncio.Lock] = {}
    turns = StreamTurns(SharedLocks(table))
    assert await turns.join(["product-a", "order-1"]) == []
    assert table == {}


async def test_a_replica_that_keeps_winning_hears_that_the_other_takes_turns() -> None:
    """Only the loser of a race learns of it; it tells the others, which take turns too."""
    table: dict[str, asyncio.Lock] = {}
    heard: list[Callable[[str], None]] = []
    loser, winner = (StreamTurns(SharedLocks(table, heard)) for _ in "ab")
    assert await winner.join(["product-a"]) == []

    loser.contended(["product-a"])
    await asyncio.sleep(0)  # the announcement goes out in a task

    joined = await winner.join(["product-a"])
    assert turns_of(joined) == [("product-a", True)]
    winner.leave(joined)


class CountingStore(MemoryEventStore):
    """Counts the reads of each stream (but those of ``read_uncounted``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        self.reads[stream_id] += 1
        return await super().read_stream(stream_id, after_version)

    async def read_uncounted(self, stream_id: str, after_version: int) -> list[RecordedEvent]:
        return await super().read_stream(stream_id, after_version)


async def test_a_turn_begins_with_what_the_other_replica_wrote_read_with_the_lock() -> None:
    """A replica's turn at a stream it has cached begins with the other replica's new
    events, which came with the lock: no read of its own before deciding."""
    store = CountingStore()
    table: dict[str, asyncio.Lock] = {}
    heard: list[Callable[[str], None]] = []
    first, second = (
        UnitsOfWork(store, shared_locks=SharedLocks(table, heard, store.read_uncounted))
        for _ in "ab"
    )
    await first.run(handlers.restock_product, restock("hot", 10))
    # Someone else takes turns at the product: so do both replicas from now on.
    await SharedLocks(table, heard).announce_contention("product-hot")

    theirs = await second.run(handlers.create_order, create(("hot", 3)))
    await asyncio.sleep(0.05)  # the second replica's turn ends
    store.reads.clear()
    mine = await first.run(handlers.create_order, create(("hot", 2)))

    left = [
        event.available_after
        for event in map(to_domain_event, [*theirs, *mine])
        if isinstance(event, StockReserved)
    ]
    assert left == [7, 5], "the first replica decided on the second one's reservation"
    assert store.reads["product-hot"] == 0


class BatchingStore(MemoryEventStore):
    """Group commit as the PostgreSQL store does it: a writer task, started by the first
    append that finds none, takes every append made by the time it runs as one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self._pending: list[tuple[Commit, asyncio.Future[list[RecordedEvent]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self._pending.append((commit, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            self.batches.append(len(batch))
            await asyncio.sleep(0.001)  # the round trip and the flush
            for commit, future in batch:
                try:
                    future.set_result(await super().append(commit))
                except DomainError as error:
                    future.set_exception(error)
        self._writer = None


async def test_commands_waiting_for_a_turn_are_decided_together_and_share_a_batch() -> None:
    """When a replica's turn begins, the commands that waited for it are decided at once,
    so their commits go to the database in one batch (one flush), not the first alone."""
    store = BatchingStore()
    table: dict[str, asyncio.Lock] = {}
    heard: list[Callable[[str], None]] = []
    replica = UnitsOfWork(store, shared_locks=SharedLocks(table, heard, store.read_stream))
    await replica.run(handlers.restock_product, restock("hot", 10))
    await SharedLocks(table, heard).announce_contention("product-hot")
    others_turn = table.setdefault("product-hot", asyncio.Lock())
    await others_turn.acquire()

    store.batches.clear()
    orders = [
        asyncio.ensure_future(replica.run(handlers.create_order, create(("hot", 1))))
        for _ in range(4)
    ]
    await asyncio.sleep(0.01)
    assert not any(order.done() for order in orders), "they wait for the other replica"
    others_turn.release()
    placed = await asyncio.wait_for(asyncio.gather(*orders), 5)

    assert store.batches == [4]
    left = [
        event.available_after
        for events in placed
        for event in map(to_domain_event, events)
        if isinstance(event, StockReserved)
    ]
    assert sorted(left) == [6, 7, 8, 9]


class CommitsStore(MemoryEventStore):
    """Keeps every commit appended."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[Commit] = []

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self.commits.append(commit)
        return await super().append(commit)


async def test_a_commit_says_whether_the_server_chose_its_command_id() -> None:
    store = CommitsStore()
    units = UnitsOfWork(store)
    chosen = str(uuid.uuid4())

    await units.run(handlers.restock_product, restock("a", 5))
    await units.run(handlers.create_order, create(("a", 1), command_id=chosen))
    await units.run(handlers.create_order, create(("a", 1)))

    assert [commit.server_chose_id for commit in store.commits] == [True, False, True]
    assert store.commits[1].command_id == chosen
