"""The consumer groups of one gateway: their records in the store, their runtimes here."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime as dt
import functools
import logging
import uuid
import weakref
from dataclasses import dataclass

from domain.errors import StoreError, StoreUnavailableError
from domain.ports import EventStore, RecordedEvent
from server.consumer_groups.engine import (
    GroupRuntime,
    GroupTuning,
    Member,
    MemberView,
    PartitionView,
    RuntimeView,
)
from server.consumer_groups.leases import LeaseStore, LiveMember, LocalMember, PartitionLease
from server.consumer_groups.model import (
    GroupClosedError,
    GroupExistsError,
    GroupNotFoundError,
    GroupRecord,
    GroupSettings,
    MemberIdTakenError,
    partition_of,
)
from server.consumer_groups.ports import ConsumerGroupStore
from server.rpc.subscription_hub import EventFilter, SubscriptionHub

log = logging.getLogger("order_gateway.consumer_groups")

SCAN_EVENTS = 10_000
"""At most this many events are read past a group's stored checkpoints per view (or
metrics reading): where the reading stops is still below every unsettled event, and the
next one goes on from there."""
SCAN_PAGE = 1_000
"""Events per ``read_all`` of that reading."""


@dataclass(slots=True)
class _Scan:
    """How far the last reading past a group's stored checkpoints got (``_past_others``)."""

    created_at: dt.datetime
    """The group's: one created again under its name starts afresh."""
    checkpoints: dict[int, int]
    """By partition: every event the group takes at or below it is settled."""
    blocked: set[int]
    """Partitions whose checkpoint is just below an event the group takes: reading on
    cannot move them until their stored checkpoint passes that event."""


@dataclass(frozen=True, slots=True)
class _Storing:
    """The checkpoints a group's runtime here had reached when its last member left, while
    it stops and stores them."""

    created_at: dt.datetime
    checkpoints: dict[int, int]


class _Pages:
    """The pages of the log one reading of many groups has read, the latest kept, so that
    groups share them: pages start at multiples of ``SCAN_PAGE``, whatever position
    a group reads from, and after a first reading every group that has kept up with the
    log stands at its head.

    A reading reads at most ``SCAN_EVENTS`` events from the store, however many groups
    it covers: that many per group would cost a scrape of 60 groups far behind, each at a
    position of its own, about 1.6 s of CPU, at every scrape until they had caught up.
    What one reading leaves unread, the next goes on with."""

    def __init__(self, events: EventStore) -> None:
        self._events = events
        self._pages: dict[int, list[RecordedEvent]] = {}
        self._left = SCAN_EVENTS

    async def after(self, position: int) -> list[RecordedEvent]:
        """Events after ``position``, up to the end of its page; none once the reading
        has read its share."""
        start = position - position % SCAN_PAGE
        page = self._pages.get(start)
        if page is None:
            if self._left <= 0:
                return []
            page = await self._events.read_all(start, SCAN_PAGE)
            self._left -= len(page)
            if len(self._pages) >= max(1, SCAN_EVENTS // SCAN_PAGE):
                del self._pages[next(iter(self._pages))]  # the oldest
            self._pages[start] = page
        return page[bisect.bisect_right(page, position, key=_position) :]


def _position(event: RecordedEvent) -> int:
    return event.position


@dataclass(frozen=True, slots=True)
class GroupView:
    """A group as GetConsumerGroup reports it."""

    record: GroupRecord
    checkpoint: int
    head_position: int
    in_flight: int
    parked: int
    redeliveries: int
    members: tuple[MemberView, ...]
    partitions: tuple[PartitionView, ...]


class ConsumerGroups:
    def __init__(
        self,
        store: ConsumerGroupStore,
        events: EventStore,
        hub: SubscriptionHub,
        tuning: GroupTuning | None = None,
        leases: LeaseStore | None = None,
    ) -> None:
        """With ``leases``, members on every replica share each group's partitions."""
        self.store = store
        self._leases = leases
        self.replica_id = str(uuid.uuid4())
        self._events = events
        self._hub = hub
        self._tuning = tuning or GroupTuning()
        self._runtimes: dict[str, GroupRuntime] = {}
        # Starting, stopping and deleting a group's runtime take turns, per group; a lock
        # goes once nothing holds or awaits it (a lock kept per name ever used grew for
        # good with deleted groups and Consume calls on names that do not exist).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._closed = False
        self._deletions: set[asyncio.Task[None]] = set()
        """Ends of groups a lease round found deleted through another replica."""
        self._departures: set[asyncio.Task[None]] = set()
        """Members leaving, whose calls may have been cancelled meanwhile."""
        self._retired: dict[str, tuple[dt.datetime, int]] = {}
        """Redeliveries counted by runtimes that have stopped, per group: the group's
        creation time and the count."""
        self._sweeper: asyncio.Task[None] | None = None
        """Drops the counters of groups deleted through another process (``_sweep``)."""
        self._scans: dict[str, _Scan] = {}
        """Per group, where the last reading past its stored checkpoints got."""
        self._storing: dict[str, _Storing] = {}
        """Per group whose last member here left: what its runtime reached, reported until
        the store has it (``_leave``)."""

    def redeliveries(self) -> dict[str, int]:
        """Redeliveries on this process since it started, per group (a counter)."""
        totals = {name: count for name, (_, count) in self._retired.items()}
        for name, runtime in self._runtimes.items():
            created_at, retired = self._retired.get(name, (runtime.record.created_at, 0))
            # A retired count of a group deleted since is not the new group's.
            totals[name] = runtime.redeliveries + (
                retired if created_at == runtime.record.created_at else 0
            )
        return totals

    def _retire(self, runtime: GroupRuntime) -> None:
        name, created_at = runtime.record.name, runtime.record.created_at
        retired_at, count = self._retired.get(name, (created_at, 0))
        if retired_at != created_at:
            count = 0  # a deleted group's
        self._retired[name] = (created_at, count + runtime.redeliveries)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="group-counters")

    def _forget_retired(self, name: str, deleted: dt.datetime) -> None:
        """The counter of the group ``name`` created at ``deleted``, which is deleted, or
        of one of that name created before it (deleted too, for the other to be made)."""
        retired = self._retired.get(name)
        if retired is not None and retired[0] <= deleted:
            del self._retired[name]

    async def _sweep(self) -> None:
        """While groups with no member here keep their counters, look every
        ``retired_check`` seconds whether they still exist: a group deleted through
        another replica (or worker) runs no lease round here to say so, and its series
        would stay for good."""
        while not self._closed:
            idle = [(n, at) for n, (at, _) in self._retired.items() if n not in self._runtimes]
            if not idle:
                return
            await asyncio.sleep(self._tuning.retired_check)
            for name, created_at in idle:
                try:
                    record = await self.store.get_group(name)
                except StoreError as error:
                    log.debug("consumer groups: checking group %r failed (%s)", name, error)
                    break  # the next check tries again
                if record is None or record.created_at != created_at:
                    # Gone, or another group of that name made since: this one is deleted.
                    self._forget_retired(name, created_at)

    @property
    def runtimes(self) -> dict[str, GroupRuntime]:
        return self._runtimes

    async def create(self, name: str, settings: GroupSettings) -> GroupRecord:
        """The group, created unless it exists with equal settings (else GroupExistsError)."""
        existing = await self.store.get_group(name)
        if existing is None:
            start = (
                await self._events.head_position()
                if settings.start_from_end
                else settings.start_after_position
            )
            existing = await self.store.create_group(
                GroupRecord(name, settings, dt.datetime.now(dt.UTC), start)
            )
        if existing.settings != settings:
            raise GroupExistsError(name)
        return existing

    async def record(self, name: str) -> GroupRecord:
        found = await self.store.get_group(name)
        if found is None:
            raise GroupNotFoundError(name)
        return found

    async def view(self, name: str) -> GroupView:
        return await self.view_of(await self.record(name))

    async def views(self, after: str = "", limit: int = 0) -> tuple[list[GroupView], bool]:
        """The groups named after ``after`` in code point order, at most ``limit`` of them
        (0: every one), and whether more follow.

        Ordered here, not by the store: PostgreSQL orders text by its database's
        collation, which may put ``a`` before ``B``, and a page must begin where the
        previous one ended whatever the store."""
        records = await self.store.list_groups()
        self._forget_scans(records)
        page = sorted((r for r in records if r.name > after), key=lambda r: r.name)
        more = 0 < limit < len(page)
        if limit:
            page = page[:limit]
        pages = _Pages(self._events)
        return [await self.view_of(record, pages) for record in page], more

    def delivering(self) -> frozenset[str]:
        """The groups this process delivers a partition of."""
        return frozenset(name for name, runtime in self._runtimes.items() if runtime.delivering)

    async def unserved_figures(self) -> tuple[int, dict[str, tuple[int, int]]]:
        """The committed head, and (lag, parked) of each group this process delivers no
        partition of (no member is connected here, or its members here stand by or wait
        for their partitions): the head minus its checkpoint as ``view_of`` reports it
        (moved past the events the group does not take, below a replayed parked event),
        and its parked events.

        Read for every group each time the metrics are scraped: the reading past the
        stored checkpoints goes on from the last one, and the groups share its pages and
        its bound (``_Pages``)."""
        head = await self._events.head_position()
        figures: dict[str, tuple[int, int]] = {}
        delivering = self.delivering()
        records = await self.store.list_groups()
        self._forget_scans(records)
        pages = _Pages(self._events)
        for record in records:
            if record.name in delivering:
                continue
            reached = self._reached_here(record)
            stored = await self.store.load_checkpoints(record.name)
            past = _raised(
                await self._past_others(record, self._all_stored(record, stored), head, pages),
                reached,
            )
            replaying = await self.store.lowest_replaying(record.name)
            checkpoint = min(
                min(past[p], replaying.get(p, head + 1) - 1)
                for p in range(record.settings.partitions)
            )
            lag = max(0, head - checkpoint)
            figures[record.name] = (lag, await self.store.parked_count(record.name))
        return head, figures

    @staticmethod
    def _all_stored(record: GroupRecord, stored: dict[int, int]) -> dict[int, int]:
        """Every partition's stored checkpoint, the group's start for one with none."""
        return {p: stored.get(p, record.start_position) for p in range(record.settings.partitions)}

    async def view_of(self, record: GroupRecord, pages: _Pages | None = None) -> GroupView:
        """The group ``record`` names as it stands (its state when deleted meanwhile);
        ``pages``: the log as read for the other groups of the same reading."""
        head = await self._events.head_position()
        parked = await self.store.parked_count(record.name)
        runtime = self._current_runtime(record)
        # Taken before the stored checkpoints are read: what this process has reached and
        # stores meanwhile is then in one or the other.
        reached = self._reached_here(record)
        stored = await self.store.load_checkpoints(record.name)
        here = runtime.view() if runtime is not None else None
        local = {p.partition: p for p in here.partitions} if here is not None else {}
        redeliveries = here.redeliveries if here is not None else 0
        live: list[LiveMember] = []
        if self._leases is None:
            leases = {
                p: PartitionLease(view.member_id, view.in_flight) for p, view in local.items()
            }
        else:
            live, leases = await self._leases.snapshot(record.name)
        elsewhere = {m.member_id for m in live if m.replica_id != self.replica_id}
        # Every partition, whoever delivers it: the events the group does not take since
        # its stored checkpoint are settled whether anyone delivers it or not. Passed
        # only while nobody delivers it, a partition that gets a member would step back
        # to its stored checkpoint (or to where its new owner has read) until the owner
        # had read past them again.
        past = _raised(
            await self._past_others(
                record, self._all_stored(record, stored), head, pages or _Pages(self._events)
            ),
            reached,
        )
        partitions: list[PartitionView] = []
        for p in range(record.settings.partitions):
            lease = leases.get(p, PartitionLease("", 0))
            view = local.get(p)
            if view is not None and lease.member_id not in elsewhere:
                # Delivered here, to the member this process gives it to: until the next
                # lease round, the lease may still name one of its members that left,
                # and the partition's checkpoint is this process's all the same (the
                # store has it only up to the last flush).
                checkpoint = max(view.checkpoint, past[p])
                partitions.append(PartitionView(p, checkpoint, view.member_id, view.in_flight))
            else:
                # Delivered by another replica (its stored checkpoint, and what its replica
                # had in flight when it last renewed the lease), or by nobody.
                partitions.append(PartitionView(p, past[p], lease.member_id, lease.in_flight))
        # Replayed parked events lie below the checkpoints that passed them when they were
        # parked; reported, a checkpoint stays below them until they are settled again.
        replaying = await self.store.lowest_replaying(record.name)
        partitions = [
            dataclasses.replace(p, checkpoint=min(p.checkpoint, replaying[p.partition] - 1))
            if p.partition in replaying
            else p
            for p in partitions
        ]
        if self._leases is None:
            members = here.members if here is not None else ()
        else:
            members = self._everywhere(live, here, partitions)
        return GroupView(
            record=record,
            checkpoint=min(min(p.checkpoint for p in partitions), head),
            head_position=head,
            in_flight=sum(p.in_flight for p in partitions),
            parked=parked,
            redeliveries=redeliveries,
            members=members,
            partitions=tuple(
                PartitionView(p.partition, min(p.checkpoint, head), p.member_id, p.in_flight)
                for p in partitions
            ),
        )

    def _reached_here(self, record: GroupRecord) -> dict[int, int]:
        """The checkpoints the group's runtime here has reached, by partition: those it
        delivers, those it has given up and is storing (``GroupRuntime.reached``), and,
        once its last member here left, those it reached then while it stops and stores
        them. Until stored, the store has less, and such a partition would be reported
        behind where it was a moment before."""
        runtime = self._current_runtime(record)
        reached = runtime.reached() if runtime is not None else {}
        storing = self._storing.get(record.name)
        if storing is not None and storing.created_at == record.created_at:
            for p, checkpoint in storing.checkpoints.items():
                reached[p] = max(reached.get(p, -1), checkpoint)
        return reached

    async def _past_others(
        self, record: GroupRecord, stored: dict[int, int], head: int, pages: _Pages
    ) -> dict[int, int]:
        """The partitions' checkpoints (``stored``: theirs in the store) moved past the
        events the group does not take, which are settled by definition: each up to its
        first event the group takes, or to the head. Otherwise a group that nobody has
        consumed yet, or whose members all left, would report its stored checkpoint and
        overstate its lag by every event of other types since.

        The reading goes on from where the last one of the group stopped: what it found
        of a partition holds as long as the partition's stored checkpoint has not passed
        it (checkpoints only move up, and the log only grows). So a reading costs the
        events committed since the last one, not everything since the stored checkpoints,
        and what one reading found of a partition no later one finds lower."""
        scan = self._scans.get(record.name)
        if scan is None or scan.created_at != record.created_at:
            scan = _Scan(record.created_at, {}, set())
        checkpoints: dict[int, int] = {}
        open_partitions: set[int] = set()
        for p, checkpoint in stored.items():
            known = scan.checkpoints.get(p, -1)
            if known >= checkpoint:
                checkpoints[p] = known
                if p not in scan.blocked:
                    open_partitions.add(p)
            else:
                checkpoints[p] = checkpoint
                open_partitions.add(p)
        wanted = EventFilter(frozenset(record.settings.event_types))
        partitions = record.settings.partitions
        position = min((checkpoints[p] for p in open_partitions), default=head)
        read = 0
        while open_partitions and position < head and read < SCAN_EVENTS:
            events = await pages.after(position)
            if not events:
                break
            for event in events:
                # The type first: most events a group reads past are of other types.
                if wanted.matches(event):
                    p = partition_of(event.stream_id, partitions)
                    if p in open_partitions and event.position > checkpoints[p]:
                        checkpoints[p] = event.position - 1
                        open_partitions.discard(p)
            position = events[-1].position
            read += len(events)
        # Every event of these partitions up to where the reading stopped is one the group
        # does not take.
        for p in open_partitions:
            checkpoints[p] = max(checkpoints[p], min(position, head))
        self._remember_scan(record, checkpoints, set(stored) - open_partitions)
        return checkpoints

    def _remember_scan(
        self, record: GroupRecord, checkpoints: dict[int, int], blocked: set[int]
    ) -> None:
        # Another reading of the group (a view beside a metrics reading) may have got
        # further meanwhile: what each partition's furthest reading found is kept.
        latest = self._scans.get(record.name)
        if latest is not None and latest.created_at == record.created_at:
            for p, known in latest.checkpoints.items():
                if known > checkpoints.get(p, -1):
                    checkpoints[p] = known
                    if p in latest.blocked:
                        blocked.add(p)
                    else:
                        blocked.discard(p)
        self._scans[record.name] = _Scan(record.created_at, checkpoints, blocked)

    def known_checkpoints(self, record: GroupRecord) -> dict[int, int]:
        """The group's partitions' checkpoints as the last reading past its stored ones
        found them (none read yet: empty)."""
        scan = self._scans.get(record.name)
        if scan is None or scan.created_at != record.created_at:
            return {}
        return dict(scan.checkpoints)

    def _forget_scans(self, records: list[GroupRecord]) -> None:
        """Drop the readings of groups deleted (here or through another process)."""
        current = {record.name: record.created_at for record in records}
        for name in [n for n, scan in self._scans.items() if current.get(n) != scan.created_at]:
            del self._scans[name]

    def _everywhere(
        self, live: list[LiveMember], here: RuntimeView | None, partitions: list[PartitionView]
    ) -> tuple[MemberView, ...]:
        """The live members of every replica, each with the partitions reported as its
        own. Not those of this process that left: the leases name them until its next
        lease round."""
        local = {m.member_id: m for m in here.members} if here is not None else {}
        return tuple(
            MemberView(
                m.member_id,
                m.user_id,
                tuple(p.partition for p in partitions if p.member_id == m.member_id),
                local[m.member_id].in_flight if m.member_id in local else m.in_flight,
                m.joined_at,
            )
            for m in live
            if m.member_id in local or m.replica_id != self.replica_id
        )

    async def delete(self, name: str) -> None:
        async with self._lock(name):
            # Its counter goes with it: a deleted group's series would stay for good.
            self._retired.pop(name, None)
            self._scans.pop(name, None)
            runtime = self._runtimes.pop(name, None)
            if runtime is not None:
                await _end_deleted(runtime)
            if not await self.store.delete_group(name):
                raise GroupNotFoundError(name)

    async def deleted_elsewhere(self, name: str, created_at: dt.datetime) -> None:
        """Another process deleted the group created at ``created_at``: its members here
        end with NOT_FOUND (a group created since under the same name is left alone)."""
        async with self._lock(name):
            runtime = self._runtimes.get(name)
            if runtime is not None and runtime.record.created_at == created_at:
                await self._end_deleted_elsewhere(runtime)
            self._forget_retired(name, created_at)

    async def _end_deleted_elsewhere(self, runtime: GroupRuntime) -> None:
        """Under the group's lock."""
        del self._runtimes[runtime.record.name]
        self._forget_retired(runtime.record.name, runtime.record.created_at)
        await _end_deleted(runtime)

    def _deleted_by_another_replica(self, name: str, created_at: dt.datetime) -> None:
        task = asyncio.create_task(self.deleted_elsewhere(name, created_at))
        self._deletions.add(task)
        task.add_done_callback(self._deletions.discard)

    async def replay_parked(self, name: str, limit: int) -> int:
        record = await self.record(name)
        replayed = await self.store.replay_parked(name, limit)
        runtime = self._current_runtime(record)
        if runtime is not None:
            await runtime.poll_replays()
        return replayed

    def _current_runtime(self, record: GroupRecord) -> GroupRuntime | None:
        """This process's runtime of the group ``record`` stores, if any: not one of a
        group of that name deleted through another process, which it learns of only at
        its next lease round (the group created again since reads as the new one)."""
        runtime = self._runtimes.get(record.name)
        if runtime is None or runtime.record.created_at != record.created_at:
            return None
        return runtime

    async def join(
        self, name: str, member_id: str, user_id: str, max_in_flight: int
    ) -> tuple[GroupRuntime, Member]:
        async with self._lock(name):
            if self._closed:
                raise GroupClosedError
            record = await self.record(name)
            runtime = self._runtimes.get(name)
            if runtime is not None and runtime.record.created_at != record.created_at:
                # The group was deleted and created again through another process, which
                # this one learns of only at its next lease round (or the supervisor's
                # word): that runtime is the deleted group's, not one to join.
                await self._end_deleted_elsewhere(runtime)
                runtime = None
            if runtime is None:
                runtime = GroupRuntime(
                    record,
                    self.store,
                    self._events,
                    self._hub,
                    self._tuning,
                    self._leases,
                    self.replica_id,
                    functools.partial(self._deleted_by_another_replica, name, record.created_at),
                    functools.partial(self.known_checkpoints, record),
                )
                await self._started(runtime)
                self._runtimes[name] = runtime
            member_id = member_id or str(uuid.uuid4())
            if member_id in runtime.members:
                raise MemberIdTakenError(name, member_id)
            joined_at = dt.datetime.now(dt.UTC)
            if self._leases is not None:
                # Across replicas an id is taken while any replica has it live.
                try:
                    await self._leases.register(
                        name, self.replica_id, LocalMember(member_id, user_id, joined_at, 0)
                    )
                except BaseException:
                    # Refused (the id is live elsewhere) or failed: a runtime this join
                    # started has no member, and would go on reading and flushing.
                    await self._stop_if_unused(name, runtime)
                    raise
            if self._closed:
                # The gateway began to stop while this join awaited: ``stop`` has passed
                # the runtime by, or stopped it.
                await self._stop_if_unused(name, runtime)
                raise GroupClosedError
            return runtime, runtime.join(member_id, user_id, max_in_flight, joined_at)

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _started(self, runtime: GroupRuntime) -> None:
        """``runtime`` started, or stopped again: when its start fails or is cancelled
        midway (it had begun reading and flushing, and nothing would have stopped it), or
        when the gateway began to stop meanwhile (``stop`` has passed it by)."""
        try:
            await runtime.start()
        except BaseException:
            await self._stop_quietly(runtime)
            raise
        if self._closed:
            await self._stop_quietly(runtime)
            raise GroupClosedError

    async def _stop_if_unused(self, name: str, runtime: GroupRuntime) -> None:
        if not runtime.members and self._runtimes.get(name) is runtime:
            del self._runtimes[name]
            if runtime.redeliveries:
                self._retire(runtime)  # its last member's departure, waiting, will not
            await self._stop_quietly(runtime)

    @staticmethod
    async def _stop_quietly(runtime: GroupRuntime) -> None:
        """Stop ``runtime``, which no member uses; a failure to store its state (which no
        member changed) is logged, not raised over the error being answered."""
        try:
            await runtime.stop_and_store(GroupClosedError())
        except Exception as error:
            log.warning(
                "consumer group %r: stopping a runtime no member uses: %s",
                runtime.record.name,
                error,
            )

    async def leave(self, runtime: GroupRuntime, member: Member) -> None:
        """The member's departure, carried to its end even if the awaiting call is
        cancelled (a client that disconnects can have its handler cancelled again while
        the departure of a group's last member stores its parks and checkpoints)."""
        departure = asyncio.create_task(self._leave(runtime, member))
        self._departures.add(departure)
        departure.add_done_callback(self._departures.discard)
        await asyncio.shield(departure)

    async def _leave(self, runtime: GroupRuntime, member: Member) -> None:
        reached = runtime.reached()
        runtime.leave(member)
        name = runtime.record.name
        if runtime.members or self._runtimes.get(name) is not runtime:
            return
        # Once the runtime is dropped below, until its checkpoints are stored, the group is
        # reported from the store, which has them only up to the last flush: reported
        # with what the runtime reached instead. Should storing fail, the stored ones are
        # where delivery resumes, and are reported again.
        storing = self._storing[name] = _Storing(runtime.record.created_at, reached)
        try:
            async with self._lock(name):
                # Nobody joined while the lock was awaited: stop reading for this group.
                if not runtime.members and self._runtimes.get(name) is runtime:
                    del self._runtimes[name]
                    self._retire(runtime)
                    await runtime.stop_and_store(GroupClosedError())
        finally:
            if self._storing.get(name) is storing:
                del self._storing[name]

    async def stop(self) -> None:
        """Shutdown: end every member's stream (UNAVAILABLE), store the checkpoints, and
        close the group records' store."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await asyncio.gather(*self._departures, return_exceptions=True)
        runtimes = list(self._runtimes.values())
        self._runtimes.clear()
        outcomes = await asyncio.gather(
            *(runtime.stop_and_store(GroupClosedError()) for runtime in runtimes),
            return_exceptions=True,
        )
        for runtime, outcome in zip(runtimes, outcomes, strict=True):
            if isinstance(outcome, StoreUnavailableError):
                # Expected when the store (or a worker's supervisor) is gone: no traceback.
                log.error(
                    "consumer group %r: storing its state on shutdown failed (%s); its"
                    " members resume from the last stored checkpoint",
                    runtime.record.name,
                    outcome,
                )
            elif isinstance(outcome, Exception):
                log.error(
                    "consumer group %r: storing its state on shutdown failed",
                    runtime.record.name,
                    exc_info=outcome,
                )
        await self.store.close()


async def _end_deleted(runtime: GroupRuntime) -> None:
    """The group is deleted: its members end with NOT_FOUND, nothing is stored, and its
    lease rounds stop (they would otherwise go on for a group nobody consumes)."""
    await runtime.stop(GroupNotFoundError(runtime.record.name))
    if runtime.coordinator is not None:
        await runtime.coordinator.stop()


def _raised(checkpoints: dict[int, int], reached: dict[int, int]) -> dict[int, int]:
    """``checkpoints``, each raised to the one ``reached`` has for its partition."""
    return {p: max(checkpoint, reached.get(p, -1)) for p, checkpoint in checkpoints.items()}
