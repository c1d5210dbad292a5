"""The consumer groups of one gateway: their records in the store, their runtimes here."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass

from domain.ports import EventStore
from server.consumer_groups.engine import (
    GroupRuntime,
    GroupTuning,
    Member,
    MemberView,
    PartitionView,
)
from server.consumer_groups.model import (
    GroupClosedError,
    GroupExistsError,
    GroupNotFoundError,
    GroupRecord,
    GroupSettings,
)
from server.consumer_groups.ports import ConsumerGroupStore
from server.subscription_hub import SubscriptionHub

log = logging.getLogger("order_gateway.consumer_groups")


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
    ) -> None:
        self.store = store
        self._events = events
        self._hub = hub
        self._tuning = tuning or GroupTuning()
        self._runtimes: dict[str, GroupRuntime] = {}
        # Starting, stopping and deleting a group's runtime take turns, per group.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._closed = False

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
        return await self._view(await self.record(name))

    async def views(self) -> list[GroupView]:
        return [await self._view(record) for record in await self.store.list_groups()]

    async def _view(self, record: GroupRecord) -> GroupView:
        head = await self._events.head_position()
        parked = await self.store.parked_count(record.name)
        runtime = self._runtimes.get(record.name)
        if runtime is not None:
            live = runtime.view()
            partitions, members, redeliveries = live.partitions, live.members, live.redeliveries
        else:
            stored = await self.store.load_checkpoints(record.name)
            partitions = tuple(
                PartitionView(p, stored.get(p, record.start_position), "", 0)
                for p in range(record.settings.partitions)
            )
            members, redeliveries = (), 0
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

    async def delete(self, name: str) -> None:
        async with self._locks[name]:
            runtime = self._runtimes.pop(name, None)
            if runtime is not None:
                await runtime.stop(GroupNotFoundError(name))
            if not await self.store.delete_group(name):
                raise GroupNotFoundError(name)

    async def replay_parked(self, name: str, limit: int) -> int:
        await self.record(name)
        parked = await self.store.replay_parked(name, limit)
        runtime = self._runtimes.get(name)
        if runtime is not None:
            await runtime.take_replays(parked)
        return len(parked)

    async def join(
        self, name: str, member_id: str, user_id: str, max_in_flight: int
    ) -> tuple[GroupRuntime, Member]:
        async with self._locks[name]:
            if self._closed:
                raise GroupClosedError
            runtime = self._runtimes.get(name)
            if runtime is None:
                runtime = GroupRuntime(
                    await self.record(name), self.store, self._events, self._hub, self._tuning
                )
                await runtime.start()
                self._runtimes[name] = runtime
            return runtime, runtime.join(member_id, user_id, max_in_flight)

    async def leave(self, runtime: GroupRuntime, member: Member) -> None:
        runtime.leave(member)
        name = runtime.record.name
        if runtime.members or self._runtimes.get(name) is not runtime:
            return
        async with self._locks[name]:
            # Nobody joined while the lock was awaited: stop reading for this group.
            if not runtime.members and self._runtimes.get(name) is runtime:
                del self._runtimes[name]
                await runtime.stop_and_store(GroupClosedError())

    async def stop(self) -> None:
        """Shutdown: end every member's stream (UNAVAILABLE), store the checkpoints, and
        close the group records' store."""
        self._closed = True
        runtimes = list(self._runtimes.values())
        self._runtimes.clear()
        outcomes = await asyncio.gather(
            *(runtime.stop_and_store(GroupClosedError()) for runtime in runtimes),
            return_exceptions=True,
        )
        for runtime, outcome in zip(runtimes, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error(
                    "consumer group %r: storing its state on shutdown failed",
                    runtime.record.name,
                    exc_info=outcome,
                )
        await self.store.close()
