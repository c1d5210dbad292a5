"""One consumer group's delivery on this process: the rules, in one place for every store.

A ``GroupRuntime`` exists while the group has members here. It reads the log through one
subscription of the process's ``SubscriptionHub`` (the hub's one read of new events,
shared with every Subscribe call and every other group), starting at the lowest partition
checkpoint, and keeps, per partition, the events read but not settled:

- per stream, a queue whose head is the only event of that stream that may be delivered
  (in flight, or waiting for a retry): the next one becomes deliverable only once the
  head is settled, so a stream's events are handled in order and never concurrently;
- a ready queue of deliverable events, handed to the partition's owner while it has
  room below its ``max_in_flight``.

A partition's checkpoint is the position just below its oldest unsettled event (once all
are settled, everything examined): it never passes an event in flight, waiting for a
retry, or being parked (until the park is durable). Replayed parked events live outside
that order: they are durable in the parked table until settled, below the checkpoint.

An event's failed attempts are stored before it is delivered again, and loaded with its
partition, so that the count goes on after a restart and on whichever process delivers
the partition next: a consumer that dies on an event, however often it reconnects and
wherever, sees it parked after ``max_deliveries``. An event delivered and acked at once
costs no write.

Memory is bounded: at most ``window`` unsettled events per group are held; beyond that the
subscription is not read, falls behind the hub, and later re-reads from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import events_pb2

from domain.ports import EventStore
from server.cancellation import raise_if_cancelling
from server.consumer_groups import balance
from server.consumer_groups.leases import LeaseCoordinator, LeaseStore, LocalMember
from server.consumer_groups.model import (
    RETRY_BASE,
    RETRY_CAP,
    FailedAttempts,
    GroupClosedError,
    GroupRecord,
    MemberIdTakenError,
    ParkedEvent,
    partition_of,
    retry_delay,
)
from server.consumer_groups.ports import ConsumerGroupStore
from server.consumer_groups.store_trouble import StoreTrouble
from server.rpc.mapping import proto_event_fields
from server.rpc.subscription_hub import EventFilter, HubClosedError, SubscriptionHub

log = logging.getLogger("order_gateway.consumer_groups")


REPLAY_POLL_EVERY = 4
"""Flush intervals between two looks for more replayed events (started elsewhere, or the
rest of a replay larger than ``replay_batch``), and readings of the parked count."""


@dataclass(frozen=True, slots=True)
class GroupTuning:
    """How often state is stored and how much a group holds. Defaults suit production."""

    flush_interval: float = 0.5
    """Seconds between writes of moved checkpoints and new parked events (at least one
    a second is promised)."""
    window: int = 10_000
    """Most unsettled events a group holds on one process before it stops reading."""
    retry_after_failure: float = 1.0
    """Seconds before reading again after the store failed."""
    replay_batch: int = 1000
    """Most replayed parked events a group holds on one process; the rest of a replay
    waits in the store and is taken up as these are settled."""
    retry_base: float = RETRY_BASE
    """The first retry's delay after a nack, doubled for each later one (1 s, as
    documented; tests shorten it)."""
    trouble_quiet: float = 5.0
    """Seconds without a failure before a store that failed a group's background task is
    said to work again (``store_trouble``)."""
    retired_check: float = 5.0
    """Seconds between looks at whether a group with no member here, whose redeliveries
    counter this process keeps, was deleted through another process."""


class State(enum.Enum):
    WAITING = "waiting"
    """Behind an unsettled event of its stream."""
    READY = "ready"
    IN_FLIGHT = "in flight"
    COUNTING = "counting"
    """Failed; its failed attempts are being stored, then it is ready (or backs off)."""
    BACKOFF = "backoff"
    """Nacked with RETRY; ready again when its delay has passed."""
    PARKING = "parking"
    """Settled by parking; held in the checkpoint until the park is stored."""
    SETTLED = "settled"


@dataclass(eq=False, slots=True)
class Entry:
    """One event on its way through the group."""

    event: events_pb2.Event
    partition: int
    replay: bool = False
    attempt: int = 0
    """Its failed attempts, plus one while it is in flight: the number its delivery bears
    (the stored failed ones, for an event taken in with them)."""
    deliveries: int = 0
    """Deliveries made of it here, moves included: tells a delivery from a later one (a
    move keeps the attempt)."""
    counted: bool = False
    """Its failed attempts are stored: settling it forgets them."""
    retry_at: float = 0.0
    """After a nack, when it may be delivered again (``time.time()``; stored with its
    failed attempts); 0 once it may go at once."""
    state: State = State.WAITING
    member: Member | None = None
    timer: asyncio.TimerHandle | None = None

    @property
    def event_id(self) -> str:
        return self.event.event_id

    @property
    def position(self) -> int:
        return self.event.position

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _newest_first(entry: Entry) -> int:
    return -entry.position


class Member:
    """One connected Consume stream: its partitions, its deliveries, its outgoing messages."""

    def __init__(
        self, member_id: str, user_id: str, max_in_flight: int, joined_at: dt.datetime
    ) -> None:
        self.member_id = member_id
        self.user_id = user_id
        self.max_in_flight = max_in_flight
        self.joined_at = joined_at
        self.partitions: list[int] = []
        self.in_flight: dict[str, Entry] = {}
        # Deliveries are queued as (entry, its deliveries) and built when sent: one that
        # timed out or moved meanwhile is dropped instead of sent late.
        self._outbox: deque[pb.ConsumeResponse | tuple[Entry, int]] = deque()
        self._wake = asyncio.Event()
        self._ended: Exception | None = None

    def send_assignment(self) -> None:
        assignment = pb.ConsumeResponse(
            assignment=pb.Assignment(member_id=self.member_id, partitions=self.partitions)
        )
        # One unsent Assignment at most, the latest, where the first unsent one stood (the
        # deliveries after it are of its partitions, or dropped as moved away): a member
        # that does not read was queued one per rebalance, without end.
        for index, item in enumerate(self._outbox):
            if isinstance(item, pb.ConsumeResponse):
                self._outbox[index] = assignment
                break
        else:
            self._outbox.append(assignment)
        self._wake.set()

    def send_delivery(self, entry: Entry) -> None:
        if len(self._outbox) > 2 * self.max_in_flight + 16:
            # A member that does not read: drop what can no longer be sent, so that its
            # queue stays bounded by its max_in_flight however long it stalls.
            self._outbox = deque(item for item in self._outbox if self._current(item))
        self._outbox.append((entry, entry.deliveries))
        self._wake.set()

    def _sendable(self, item: pb.ConsumeResponse | tuple[Entry, int]) -> pb.ConsumeResponse | None:
        if isinstance(item, pb.ConsumeResponse):
            return item
        return _delivery(item[0]) if self._current(item) else None

    def _current(self, item: pb.ConsumeResponse | tuple[Entry, int]) -> bool:
        if isinstance(item, pb.ConsumeResponse):
            return True
        entry, deliveries = item
        return entry.member is self and entry.deliveries == deliveries

    def end(self, error: Exception) -> None:
        """End the stream with ``error`` once what is queued is sent."""
        if self._ended is None:
            self._ended = error
        self._wake.set()

    async def messages(self) -> AsyncIterator[pb.ConsumeResponse]:
        """Assignments and deliveries, until ``end`` (its error is raised)."""
        while True:
            while self._outbox and self._ended is None:
                # No entry left in a local: the error raised below keeps this frame.
                message = self._sendable(self._outbox.popleft())
                if message is not None:
                    yield message
            if self._ended is not None:
                # Never sent now: not kept either, as long as the error refers to this.
                self._outbox.clear()
                raise self._ended
            self._wake.clear()
            await self._wake.wait()


def _delivery(entry: Entry) -> pb.ConsumeResponse:
    # Filled in place: building it from keyword arguments copies the event twice (into
    # the Delivery, then that into the response), 4.1 against 0.9 us per delivery.
    response = pb.ConsumeResponse()
    delivery = response.delivery
    delivery.event.CopyFrom(entry.event)
    delivery.attempt = entry.attempt
    delivery.partition = entry.partition
    return response


@dataclass(eq=False, slots=True)
class Partition:
    index: int
    read_through: int
    """Every matching event of this partition at or below it has been taken in."""
    owned: bool = False
    """This process may deliver it (always, but for a partition leased elsewhere)."""
    synced: bool = False
    """The current subscription started at or below ``read_through``: every event it
    examined was taken in for this partition too."""
    owner: Member | None = None
    pending: dict[int, Entry] = field(default_factory=dict)
    """Unsettled events (parking ones until stored), by position, in position order."""
    streams: dict[str, deque[Entry]] = field(default_factory=dict)
    ready: deque[Entry] = field(default_factory=deque)
    replays: dict[str, Entry] = field(default_factory=dict)
    attempts: dict[str, FailedAttempts] = field(default_factory=dict)
    """Failed attempts stored for events not taken in yet, by event id: loaded when the
    partition became this process's, each taken with its event."""
    parked: set[str] = field(default_factory=set)
    """Parked events above its checkpoint when it became this process's (parked while an
    earlier event held the checkpoint back): settled, so not taken from the log again;
    ReplayParked delivers them."""

    def checkpoint(self, examined: int) -> int:
        """Every matching event of the partition at or below this is settled."""
        for position in self.pending:
            return position - 1
        return max(self.read_through, examined) if self.synced else self.read_through


@dataclass(frozen=True, slots=True)
class PartitionView:
    partition: int
    checkpoint: int
    member_id: str
    in_flight: int


@dataclass(frozen=True, slots=True)
class MemberView:
    member_id: str
    user_id: str
    partitions: tuple[int, ...]
    in_flight: int
    joined_at: dt.datetime


@dataclass(frozen=True, slots=True)
class RuntimeStats:
    """What the metrics read, without awaiting anything."""

    checkpoint: int | None
    """The lowest of the partitions it delivers; None while it delivers none."""
    in_flight: int
    parked: int
    members: int


@dataclass(frozen=True, slots=True)
class RuntimeView:
    partitions: tuple[PartitionView, ...]
    members: tuple[MemberView, ...]
    redeliveries: int


class GroupRuntime:
    """The live state of one group on this process; start with ``start()``."""

    def __init__(
        self,
        record: GroupRecord,
        store: ConsumerGroupStore,
        events: EventStore,
        hub: SubscriptionHub,
        tuning: GroupTuning,
        leases: LeaseStore | None = None,
        replica_id: str = "",
        gone: Callable[[], None] | None = None,
        known: Callable[[], Mapping[int, int]] | None = None,
    ) -> None:
        """``gone`` is called when a lease round finds the group deleted through another
        replica. ``known``: partitions' checkpoints already reported past their stored
        ones (only events the group does not take lie between), where a partition taken
        up here starts."""
        self.record = record
        self._settings = record.settings
        self._store = store
        self._events = events
        self._hub = hub
        self._tuning = tuning
        self._known = known
        self._filter = EventFilter(frozenset(record.settings.event_types))
        self._loop = asyncio.get_running_loop()
        self.members: dict[str, Member] = {}
        self._partitions: list[Partition] = []
        self._examined = 0
        self._unsettled = 0
        self._room = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._to_fill: set[Member] = set()
        self._fill_scheduled = False
        self._to_park: list[tuple[Entry, str]] = []
        self._to_unpark: list[str] = []
        self._polling_replays = asyncio.Lock()
        """Held by one ``poll_replays`` at a time (ReplayParked's, the flush loop's, a
        lease round's): two at once each read an event from the log while the other took
        it up, delivered it and saw it acked, and took it up again (acked events came
        again, hundreds after one replay)."""
        self._to_count: list[tuple[Entry, bool]] = []
        """Failed events whose attempts are to be stored, each with whether it backs off
        after (a RETRY) or is delivered again at once."""
        self._count_now = asyncio.Event()
        self._to_forget: list[str] = []
        """Settled events whose failed attempts are to be forgotten."""
        self._saved: dict[int, int] = {}
        self._handing_over: dict[int, int] = {}
        """The checkpoints of partitions given up, no longer delivered here, while they are
        stored (``_give_up``)."""
        self._flushing = asyncio.Lock()
        """One flush at a time: a flush that ran beside another storing the parks would
        see them unstored, and the checkpoints they hold back."""
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._owning = asyncio.Event()
        self._closed = False
        quiet = tuning.trouble_quiet
        self._storing_trouble = StoreTrouble(record.name, "storing its state", quiet)
        self._counting_trouble = StoreTrouble(record.name, "storing failed attempts", quiet)
        self._reading_trouble = StoreTrouble(record.name, "reading the log", quiet)
        self.coordinator = (
            LeaseCoordinator(
                leases,
                record.name,
                replica_id,
                record.settings.partitions,
                self._local_members,
                self._apply_leases,
                self._give_up,
                self._in_flight_by_partition,
                created_at=record.created_at,
                gone=gone,
            )
            if leases is not None
            else None
        )
        self.redeliveries = 0
        """Deliveries after the first of an event (timeouts, departures, retries, moves)."""
        self._parked = 0
        """Parked events of the group, as last counted in the store."""

    # -- life -----------------------------------------------------------------------

    async def start(self) -> None:
        stored = await self._store.load_checkpoints(self.record.name)
        self._saved = dict(stored)
        start = self.record.start_position
        known = self._known_checkpoints()
        # On one process every partition is this runtime's; across replicas, only those
        # its leases grant (``_apply_leases``).
        local = self.coordinator is None
        self._partitions = [
            Partition(index, max(stored.get(index, start), known.get(index, -1)), owned=local)
            for index in range(self._settings.partitions)
        ]
        if local:
            await self._load_attempts(self._partitions)
            await self._load_parked(self._partitions)
            self._owning.set()
        await self.poll_replays()
        name = self.record.name
        self._restart_reader()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name=f"group-flush-{name}"),
            asyncio.create_task(self._count_forever(), name=f"group-count-{name}"),
        ]
        if self.coordinator is not None:
            self.coordinator.start()
        self._parked = await self._store.parked_count(name)

    async def stop(self, error: Exception) -> None:
        """End every member's stream with ``error`` and stop reading (a deleted group:
        nothing is stored). The deliveries in flight are not failed attempts: the members
        did not fail them, the gateway ended their streams, as a crash would have."""
        await self._stop_reading(error)
        self._let_go()

    async def stop_and_store(self, error: Exception) -> None:
        """``stop``, then store the checkpoints, parks and failed attempts (shutdown, last
        member gone), and only then give up the leases."""
        await self._stop_reading(error)
        try:
            await self._flush()
        finally:
            if self.coordinator is not None:
                await self.coordinator.stop()
            self._let_go()

    async def _stop_reading(self, error: Exception) -> None:
        self._closed = True
        # First: an ack timer that fired while the tasks end would fail a delivery of a
        # member already gone (KeyError in its callback).
        self._cancel_timers()
        for member in list(self.members.values()):
            member.end(error)
            member.in_flight.clear()
        self.members.clear()
        tasks = [*self._tasks, *([self._reader] if self._reader is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks, self._reader = [], None
        # Timers started by what the tasks did as they ended.
        self._cancel_timers()

    def _let_go(self) -> None:
        """Let go of the events the stopped runtime holds. The streams its members ended
        keep it reachable for a while (the error each raised refers, through its
        traceback, to frames that hold the runtime), so its events would stay in memory
        until Python's cyclic garbage collector ran: about 8 MB more for every group
        created, read from the start of a log of 84,000 events and deleted."""
        for partition in self._partitions:
            partition.owner = None
            for entries in (partition.pending, partition.streams, partition.replays):
                entries.clear()
            partition.ready.clear()
            partition.attempts.clear()
        self._to_fill.clear()
        self._to_park, self._to_count = [], []

    def _cancel_timers(self) -> None:
        for partition in self._partitions:
            for entry in (*partition.pending.values(), *partition.replays.values()):
                entry.cancel_timer()

    def _known_checkpoints(self) -> Mapping[int, int]:
        """Where partitions taken up here start past their stored checkpoints: the
        checkpoints already reported for them (GetConsumerGroup, the metrics), which only
        events the group does not take separate from the stored ones. Started from the
        stored ones instead, a partition that goes from nobody to a member would be
        reported lower until its reader had read past those events again."""
        return self._known() if self._known is not None else {}

    # -- members --------------------------------------------------------------------

    def join(
        self, member_id: str, user_id: str, max_in_flight: int, joined_at: dt.datetime
    ) -> Member:
        if self._closed:
            raise GroupClosedError
        if member_id in self.members:
            raise MemberIdTakenError(self.record.name, member_id)
        member = Member(member_id, user_id, max_in_flight, joined_at)
        self.members[member_id] = member
        self._rebalance(always_tell=member)
        return member

    def leave(self, member: Member) -> None:
        if self.members.get(member.member_id) is not member:
            return
        del self.members[member.member_id]
        self._release(member)
        self._rebalance()
        # Checkpoints are stored when a member leaves (docs/consumer-groups.md).
        self._flush_now.set()

    def _release(self, member: Member) -> None:
        """A departure: each of the member's deliveries is a failed attempt, redelivered
        as soon as it is counted (no backoff)."""
        # Newest first: each goes to the front of its ready queue, so the oldest leads
        # (they are counted in one write, and requeued in this order).
        for entry in sorted(member.in_flight.values(), key=_newest_first):
            self._fail(entry, backoff=False, reason="the member left")
        member.in_flight.clear()
        for index in member.partitions:
            if self._partitions[index].owner is member:
                self._partitions[index].owner = None

    def _rebalance(self, always_tell: Member | None = None) -> None:
        if always_tell is not None:
            always_tell.send_assignment()
        if self.coordinator is not None:
            # Across replicas the leases decide; the coordinator calls back.
            self.coordinator.nudge()
            return
        current = {member_id: m.partitions for member_id, m in self.members.items()}
        plan = balance.assign(current, list(self.members), self._settings.partitions)
        self._assign({p: member_id for member_id, ps in plan.items() for p in ps})

    def _assign(self, owners: dict[int, str]) -> None:
        """Deliver partition p to local member ``owners[p]``; partitions not in ``owners``
        stop being delivered here (across replicas: they are not leased here any more)."""
        for partition in self._partitions:
            member_id = owners.get(partition.index)
            owner = self.members.get(member_id) if member_id is not None else None
            if partition.owned and self.coordinator is not None and member_id is None:
                self._drop(partition)
            elif partition.owner is not None and partition.owner is not owner:
                self._take_back(partition.owner, partition.index)
            partition.owner = owner
        wanted: dict[str, list[int]] = {member_id: [] for member_id in self.members}
        for index, member_id in sorted(owners.items()):
            if member_id in wanted:
                wanted[member_id].append(index)
        for member_id, partitions in wanted.items():
            member = self.members[member_id]
            if partitions != member.partitions:
                member.partitions = partitions
                member.send_assignment()
            self._to_fill.add(member)
        self._schedule_fill()

    def _take_back(self, member: Member, index: int) -> None:
        """The partition moves to another member here: its deliveries go to the new one
        at once, with the attempt they had. The member is still connected, so a move is
        no failed attempt (only a nack, a timeout or a departure is), just as a partition
        that moves to another replica goes on from the failures stored."""
        for entry in sorted(member.in_flight.values(), key=_newest_first):
            if entry.partition == index:
                del member.in_flight[entry.event_id]
                entry.attempt -= 1  # the next delivery bears this one's number again
                self._requeue(entry)

    def _drop(self, partition: Partition) -> None:
        """Forget a partition this process no longer owns: its next owner resumes from
        the stored checkpoint (and the parked events being replayed, from the store)."""
        if partition.owner is not None:
            for entry in list(partition.owner.in_flight.values()):
                if entry.partition == partition.index:
                    del partition.owner.in_flight[entry.event_id]
        for entry in (*partition.pending.values(), *partition.replays.values()):
            entry.cancel_timer()
            entry.member = None
            entry.state = State.SETTLED
        self._unsettled -= len(partition.pending)
        self._room.set()
        partition.pending.clear()
        partition.streams.clear()
        partition.ready.clear()
        partition.replays.clear()
        partition.attempts.clear()
        partition.parked.clear()
        partition.owned = partition.synced = False
        partition.owner = None

    # -- ownership across replicas ----------------------------------------------------

    def _local_members(self) -> list[LocalMember]:
        return [
            LocalMember(m.member_id, m.user_id, m.joined_at, len(m.in_flight))
            for m in self.members.values()
        ]

    async def _apply_leases(self, owners: dict[int, str]) -> None:
        """The coordinator's verdict: deliver exactly these partitions here."""
        acquired = [p for p in self._partitions if p.index in owners and not p.owned]
        if acquired:
            stored = await self._store.load_checkpoints(self.record.name)
            start = self.record.start_position
            known = self._known_checkpoints()
            # Resume where the last owner stored its progress, its count of failures and
            # its parks; owned only then, so that the reader takes nothing before.
            for partition in acquired:
                saved = stored.get(partition.index, start)
                partition.read_through = max(saved, known.get(partition.index, -1))
                self._saved[partition.index] = saved
            await self._load_attempts(acquired)
            await self._load_parked(acquired)
            for partition in acquired:
                partition.owned = True
                partition.synced = False
        self._assign(owners)
        if acquired:
            self._owning.set()
            self._restart_reader()
            await self.poll_replays()

    async def _give_up(self, indexes: set[int]) -> None:
        """Before a lease is released: store the partitions' checkpoints, then forget them."""
        # Parks and failed attempts first: an event being parked holds its partition's
        # checkpoint back until its park is stored, and the checkpoint stored here is where
        # the next owner (or this gateway after a restart) resumes. A store that fails here
        # fails the save below as well, which reports it; what was not stored stays queued
        # for the next flush. The partitions are dropped either way: their leases go.
        with contextlib.suppress(Exception):
            await self._flush()
        checkpoints = {
            p.index: p.checkpoint(self._examined)
            for p in self._partitions
            if p.index in indexes and p.owned
        }
        # Dropped before the write, so that what is stored is the last checkpoint they
        # reach here: an ack taken during the write would move them past it, and the next
        # owner would deliver that event again. Until stored, their checkpoints are
        # reported as reached here (``reached``): the store may have them only up to an
        # earlier flush. Should the write fail, the stored ones are where delivery
        # resumes, and are reported again.
        self._handing_over.update(checkpoints)
        for index in indexes:
            if self._partitions[index].owned:
                self._drop(self._partitions[index])
        try:
            if checkpoints:
                await self._store.save_checkpoints(self.record, checkpoints)
        finally:
            for index in checkpoints:
                self._handing_over.pop(index, None)

    # -- settling -------------------------------------------------------------------

    def ack(self, member: Member, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            entry = member.in_flight.pop(event_id, None)
            if entry is not None:
                self._settle(entry)
        self._wants_fill(member)

    def skip(self, member: Member, event_ids: Sequence[str]) -> None:
        self.ack(member, event_ids)

    def park(self, member: Member, event_ids: Sequence[str], reason: str) -> None:
        for event_id in event_ids:
            entry = member.in_flight.pop(event_id, None)
            if entry is not None:
                entry.cancel_timer()
                self._park(entry, reason)
        self._wants_fill(member)

    def retry(self, member: Member, event_ids: Sequence[str], reason: str) -> None:
        for event_id in event_ids:
            entry = member.in_flight.pop(event_id, None)
            if entry is not None:
                self._fail(entry, backoff=True, reason=reason)
        self._wants_fill(member)

    def extend(self, member: Member, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            entry = member.in_flight.get(event_id)
            if entry is not None:
                entry.cancel_timer()
                entry.timer = self._loop.call_later(
                    self._settings.ack_timeout, self._timed_out, entry, entry.deliveries
                )

    def _settle(self, entry: Entry) -> None:
        entry.cancel_timer()
        entry.member = None
        entry.state = State.SETTLED
        partition = self._partitions[entry.partition]
        if entry.replay:
            del partition.replays[entry.event_id]
            self._to_unpark.append(entry.event_id)  # its failed attempts go with it
            return
        if entry.counted:
            self._to_forget.append(entry.event_id)
        del partition.pending[entry.position]
        self._unsettled -= 1
        if self._unsettled < self._tuning.window:
            self._room.set()
        self._next_of_stream(partition, entry)

    def _next_of_stream(self, partition: Partition, entry: Entry) -> None:
        """``entry`` (its stream's head) is settled: the stream's next event may go."""
        stream_id = entry.event.stream_id
        queue = partition.streams[stream_id]
        queue.popleft()
        if queue:
            self._make_ready(queue[0])
        else:
            del partition.streams[stream_id]

    def _park(self, entry: Entry, reason: str) -> None:
        entry.member = None
        entry.state = State.PARKING
        self._to_park.append((entry, reason))
        # Stored now, not with the next checkpoints (up to flush_interval later): until
        # then GetConsumerGroup did not count it and ReplayParked could not return it.
        # Parks that come while it is stored go together in the next write.
        self._flush_now.set()
        partition = self._partitions[entry.partition]
        if entry.replay:
            del partition.replays[entry.event_id]
        else:
            # Settled for its stream now; for the checkpoint once the park is stored.
            self._next_of_stream(partition, entry)

    def _fail(self, entry: Entry, *, backoff: bool, reason: str) -> None:
        entry.cancel_timer()
        entry.member = None
        if entry.attempt >= self._settings.max_deliveries:
            self._park(entry, reason)  # the park forgets its stored attempts
            return
        # Stored with the count, so that the backoff holds wherever and whenever the
        # event is delivered next (another replica or worker, after a restart).
        entry.retry_at = (
            time.time() + retry_delay(entry.attempt, self._tuning.retry_base) if backoff else 0.0
        )
        # Stored before the next delivery is sent: a crash in between would otherwise
        # forget this failure, and a consumer that dies on the event would never see it
        # parked. ``_counted`` goes on once the count is stored.
        entry.state = State.COUNTING
        entry.counted = True
        self._to_count.append((entry, backoff))
        self._count_now.set()

    def _counted(self, entry: Entry, backoff: bool) -> None:
        if entry.state is not State.COUNTING or self._closed:
            return  # its partition went elsewhere meanwhile, or the group stopped
        if backoff:
            entry.state = State.BACKOFF
            delay = retry_delay(entry.attempt, self._tuning.retry_base)
            entry.timer = self._loop.call_later(delay, self._retry_due, entry)
        else:
            self._requeue(entry)

    def _requeue(self, entry: Entry) -> None:
        entry.cancel_timer()
        entry.member = None
        entry.state = State.READY
        partition = self._partitions[entry.partition]
        # Ahead of new events: it is older than any of them.
        partition.ready.appendleft(entry)
        self._wants_fill(partition.owner)

    def _retry_due(self, entry: Entry) -> None:
        entry.timer = None
        if entry.state is State.BACKOFF:
            entry.retry_at = 0.0  # waited out, as timed here
            self._make_ready(entry)

    def _timed_out(self, entry: Entry, deliveries: int) -> None:
        entry.timer = None
        member = entry.member
        if entry.state is not State.IN_FLIGHT or entry.deliveries != deliveries or member is None:
            return
        del member.in_flight[entry.event_id]
        self._fail(entry, backoff=False, reason="ack timeout")
        # Parked after its last attempt, it leaves room for another delivery.
        self._wants_fill(member)

    # -- delivering -----------------------------------------------------------------

    def _make_ready(self, entry: Entry) -> None:
        if entry.retry_at:
            # Taken in with a backoff stored elsewhere or before a restart: the rest of
            # it (never more than the longest backoff, whatever the clocks say).
            wait = min(entry.retry_at - time.time(), RETRY_CAP)
            entry.retry_at = 0.0
            if wait > 0:
                entry.state = State.BACKOFF
                entry.timer = self._loop.call_later(wait, self._retry_due, entry)
                return
        entry.state = State.READY
        partition = self._partitions[entry.partition]
        partition.ready.append(entry)
        self._wants_fill(partition.owner)

    def _wants_fill(self, member: Member | None) -> None:
        if member is not None:
            self._to_fill.add(member)
            self._schedule_fill()

    def _schedule_fill(self) -> None:
        # Once per loop iteration, however many events, acks or timers asked for it.
        if not self._fill_scheduled and self._to_fill:
            self._fill_scheduled = True
            self._loop.call_soon(self._fill_all)

    def _fill_all(self) -> None:
        self._fill_scheduled = False
        members, self._to_fill = self._to_fill, set()
        for member in members:
            if self.members.get(member.member_id) is member:
                self._fill(member)

    def _fill(self, member: Member) -> None:
        """Deliver ready events of the member's partitions, round robin, up to its room."""
        room = member.max_in_flight - len(member.in_flight)
        queues = [self._partitions[index].ready for index in member.partitions]
        queues = [queue for queue in queues if queue]
        while room > 0 and queues:
            remaining = []
            for queue in queues:
                if room == 0:
                    break
                self._deliver(member, queue.popleft())
                room -= 1
                if queue:
                    remaining.append(queue)
            queues = remaining

    def _deliver(self, member: Member, entry: Entry) -> None:
        entry.state = State.IN_FLIGHT
        entry.member = member
        entry.attempt += 1
        entry.deliveries += 1
        if entry.attempt > 1 or entry.deliveries > 1:
            self.redeliveries += 1
        member.in_flight[entry.event_id] = entry
        entry.timer = self._loop.call_later(
            self._settings.ack_timeout, self._timed_out, entry, entry.deliveries
        )
        member.send_delivery(entry)

    # -- reading the log ------------------------------------------------------------

    def _take(self, event: events_pb2.Event) -> None:
        index = partition_of(event.stream_id, self._settings.partitions)
        partition = self._partitions[index]
        position = event.position
        self._examined = max(self._examined, position)
        if not partition.owned or position <= partition.read_through:
            return
        partition.read_through = position
        if event.event_id in partition.parked:
            partition.parked.discard(event.event_id)
            return
        entry = _with_failures(Entry(event, index), partition.attempts.pop(event.event_id, None))
        partition.pending[position] = entry
        self._unsettled += 1
        queue = partition.streams.get(event.stream_id)
        if queue is None:
            partition.streams[event.stream_id] = deque((entry,))
            self._make_ready(entry)
        else:
            queue.append(entry)

    def _restart_reader(self) -> None:
        """(Re)start following the log from the lowest checkpoint of the owned partitions
        (after gaining a partition whose checkpoint may lie behind the reader)."""
        if self._reader is not None:
            self._reader.cancel()
        self._reader = asyncio.create_task(
            self._read(self._reader), name=f"group-read-{self.record.name}"
        )

    async def _read(self, previous: asyncio.Task[None] | None) -> None:
        """Follow the log through the hub, from the lowest owned partition's checkpoint."""
        if previous is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await previous
        while not self._closed:
            raise_if_cancelling()
            await self._owning.wait()
            owned = [p for p in self._partitions if p.owned]
            if not owned:
                self._owning.clear()
                continue
            start = min(p.checkpoint(self._examined) for p in owned)
            for partition in owned:
                # What the old subscription examined stays known after it ends.
                if partition.synced:
                    partition.read_through = max(partition.read_through, self._examined)
                partition.synced = True
            self._examined = start
            try:
                async with self._hub.subscribe(
                    self._filter, start, False, limited=False
                ) as subscription:
                    async for response in subscription.responses():
                        if self._reading_trouble.failing:
                            self._reading_trouble.worked()
                        if response.WhichOneof("message") == "event":
                            self._take(response.event)
                        else:
                            self._examined = max(self._examined, response.checkpoint.position)
                        while self._unsettled >= self._tuning.window:
                            self._room.clear()
                            await self._room.wait()
            except HubClosedError:
                return
            except Exception as error:
                self._reading_trouble.failed(error)
                await asyncio.sleep(self._tuning.retry_after_failure)

    # -- replaying parked events ----------------------------------------------------

    async def poll_replays(self) -> None:
        """Take up parked events being replayed, at most ``replay_batch`` held at once
        (ReplayParked marks them in the store, here or on another replica, or before a
        restart; more are taken up as these are settled)."""
        async with self._polling_replays:
            batch = self._tuning.replay_batch
            held = sum(len(p.replays) for p in self._partitions)
            if held >= batch:
                return
            # The longest-parked first: those held already lead the list until settled.
            for parked in await self._store.replaying(self.record.name, batch):
                await self._take_replay(parked)

    async def _take_replay(self, parked: ParkedEvent) -> None:
        if not 0 <= parked.partition < len(self._partitions):
            return
        partition = self._partitions[parked.partition]
        if not self._may_take_replay(partition, parked.event_id):
            return
        pending = partition.pending.get(parked.position)
        if pending is not None and pending.event_id == parked.event_id:
            return  # taken from the log as well: held once, as what the log gave
        records = await self._events.read_all(parked.position - 1, 1)
        if not records or records[0].event_id != parked.event_id:
            log.warning("parked event %s is not in the log", parked.event_id)
            return
        if not self._may_take_replay(partition, parked.event_id):
            return  # the read awaited: things may have moved meanwhile
        event = events_pb2.Event(**proto_event_fields(records[0]))
        entry = _with_failures(
            Entry(event, parked.partition, replay=True),
            partition.attempts.pop(parked.event_id, None),
        )
        partition.replays[parked.event_id] = entry
        self._make_ready(entry)

    def _may_take_replay(self, partition: Partition, event_id: str) -> bool:
        """Whether the parked ``event_id`` is one to take up now: not held already, nor
        settled and waiting to be unparked (or parked again) in the store."""
        if not partition.owned or event_id in partition.replays:
            return False
        return event_id not in self._to_unpark and all(
            entry.event_id != event_id for entry, _ in self._to_park
        )

    # -- storing ----------------------------------------------------------------------

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        # By the clock, not by the flushes: parks and departures flush at once, and a
        # burst of them would otherwise look for replays with every few writes.
        period = REPLAY_POLL_EVERY * self._tuning.flush_interval
        next_poll = loop.time() + period
        while True:
            raise_if_cancelling()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tuning.flush_interval):
                    await self._flush_now.wait()
            self._flush_now.clear()
            try:
                if loop.time() >= next_poll:
                    next_poll = loop.time() + period
                    await self.poll_replays()
                    self._parked = await self._store.parked_count(self.record.name)
                await self._flush()
            except Exception as error:
                self._storing_trouble.failed(error)
            else:
                self._storing_trouble.worked()

    async def _load_parked(self, partitions: Iterable[Partition]) -> None:
        by_index = {partition.index: partition for partition in partitions}
        after = {index: partition.read_through for index, partition in by_index.items()}
        for index, event_id in await self._store.parked_after(self.record.name, after):
            by_index[index].parked.add(event_id)

    async def _load_attempts(self, partitions: Iterable[Partition]) -> None:
        by_index = {partition.index: partition for partition in partitions}
        for failed in await self._store.load_attempts(self.record.name, list(by_index)):
            by_index[failed.partition].attempts[failed.event_id] = failed

    async def _count_forever(self) -> None:
        """Store failed attempts as they come: what fails while a write is under way
        goes in the next one."""
        while True:
            raise_if_cancelling()
            await self._count_now.wait()
            self._count_now.clear()
            try:
                await self._store_counts()
            except Exception as error:
                self._counting_trouble.failed(error)
                await asyncio.sleep(self._tuning.retry_after_failure)
                self._count_now.set()
            else:
                self._counting_trouble.worked()

    async def _store_counts(self) -> None:
        counts, self._to_count = self._to_count, []
        if not counts:
            return
        try:
            await self._store.save_attempts(
                self.record,
                [
                    FailedAttempts(e.event_id, e.position, e.partition, e.attempt, e.retry_at)
                    for e, _ in counts
                ],
            )
        except BaseException:
            self._to_count = counts + self._to_count
            raise
        for entry, backoff in counts:
            self._counted(entry, backoff)

    async def _flush(self) -> None:
        """Store failed attempts not stored yet (a partition given up, the group stopped)
        and new parked events, forget the attempts of settled events, then store the
        checkpoints the parks held back, if moved."""
        async with self._flushing:
            await self._flush_alone()

    async def _flush_alone(self) -> None:
        group = self.record
        await self._store_counts()
        parks, self._to_park = self._to_park, []
        if parks:
            now = dt.datetime.now(dt.UTC)
            try:
                await self._store.park(
                    group,
                    [
                        ParkedEvent(e.event_id, e.position, e.partition, reason, now)
                        for e, reason in parks
                    ],
                )
            except BaseException:
                self._to_park = parks + self._to_park
                raise
            for entry, _ in parks:
                if not entry.replay and entry.state is State.PARKING:
                    entry.state = State.SETTLED
                    pending = self._partitions[entry.partition].pending
                    if pending.pop(entry.position, None) is not None:
                        self._unsettled -= 1
            self._room.set()
        unparks, self._to_unpark = self._to_unpark, []
        if unparks:
            try:
                await self._store.unpark(group, unparks)
            except BaseException:
                self._to_unpark = unparks + self._to_unpark
                raise
        # Before the checkpoints: a crash in between delivers an acked event again, from
        # attempt 1, rather than leaving its count behind for good.
        forgets, self._to_forget = self._to_forget, []
        if forgets:
            try:
                await self._store.forget_attempts(group, forgets)
            except BaseException:
                self._to_forget = forgets + self._to_forget
                raise
        moved = {
            p.index: checkpoint
            for p in self._partitions
            if p.owned
            and (checkpoint := p.checkpoint(self._examined)) > self._saved.get(p.index, -1)
        }
        if moved:
            await self._store.save_checkpoints(group, moved)
            self._saved.update(moved)

    # -- reporting --------------------------------------------------------------------

    @property
    def delivering(self) -> bool:
        """It delivers a partition (across replicas, only those its leases grant)."""
        return any(p.owned for p in self._partitions)

    def reached(self) -> dict[int, int]:
        """The checkpoints of the partitions it delivers, as it would store them now, and of
        those it has given up and is storing."""
        delivered = {p.index: p.checkpoint(self._examined) for p in self._partitions if p.owned}
        return {**self._handing_over, **delivered}

    def stats(self) -> RuntimeStats:
        owned = [p.checkpoint(self._examined) for p in self._partitions if p.owned]
        return RuntimeStats(
            checkpoint=min(owned) if owned else None,
            in_flight=sum(len(m.in_flight) for m in self.members.values()),
            parked=self._parked,
            members=len(self.members),
        )

    def _in_flight_by_partition(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for member in self.members.values():
            for entry in member.in_flight.values():
                counts[entry.partition] = counts.get(entry.partition, 0) + 1
        return counts

    def view(self) -> RuntimeView:
        """The partitions this process delivers, and its members. Not the others: one
        given up is forgotten (its unsettled events with it) before its checkpoint is
        stored, and what was read of it would pass them."""
        in_flight = self._in_flight_by_partition()
        return RuntimeView(
            partitions=tuple(
                PartitionView(
                    p.index,
                    p.checkpoint(self._examined),
                    p.owner.member_id if p.owner is not None else "",
                    in_flight.get(p.index, 0),
                )
                for p in self._partitions
                if p.owned
            ),
            members=tuple(
                MemberView(
                    m.member_id, m.user_id, tuple(m.partitions), len(m.in_flight), m.joined_at
                )
                for m in self.members.values()
            ),
            redeliveries=self.redeliveries,
        )


def _with_failures(entry: Entry, failed: FailedAttempts | None) -> Entry:
    """``entry`` as its stored failed attempts left it: the count goes on, and so does the
    backoff of its last nack."""
    if failed is not None:
        entry.attempt = failed.attempts
        entry.counted = failed.attempts > 0
        entry.retry_at = failed.retry_at
    return entry
