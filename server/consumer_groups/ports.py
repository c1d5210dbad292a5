"""What a store keeps for consumer groups: groups, partition checkpoints, parked events,
and the failed attempts of unsettled events.

Each event store backend has an implementation (``store_memory``, ``store_sqlite``,
``store_postgres``); the rules that use them live once, in ``engine``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from server.consumer_groups.model import FailedAttempts, GroupRecord, ParkedEvent


class ConsumerGroupStore(Protocol):
    async def create_group(self, record: GroupRecord) -> GroupRecord:
        """Store ``record`` unless a group of its name exists; returns the stored group."""
        ...

    async def get_group(self, name: str) -> GroupRecord | None: ...

    async def list_groups(self) -> list[GroupRecord]:
        """Every group, by name."""
        ...

    async def delete_group(self, name: str) -> bool:
        """Remove the group with its checkpoints, parked events and failed attempts; False
        if unknown."""
        ...

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        """The stored checkpoint of each partition that has one."""
        ...

    # The writes a group's runtime makes take the group as it was created, and change
    # nothing unless the group of that name still has that creation time: a runtime may
    # outlive its group (deleted through another process) by up to a lease round, and a
    # group created again under the name meanwhile is another group.

    async def save_checkpoints(self, group: GroupRecord, checkpoints: Mapping[int, int]) -> None:
        """Store these partitions' checkpoints; a stored one is never moved back."""
        ...

    async def save_attempts(self, group: GroupRecord, attempts: Sequence[FailedAttempts]) -> None:
        """Store these events' failed attempts; a stored count never goes down."""
        ...

    async def forget_attempts(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        """Forget the failed attempts of settled events."""
        ...

    async def load_attempts(self, name: str, partitions: Collection[int]) -> list[FailedAttempts]:
        """The stored failed attempts of these partitions' events."""
        ...

    async def park(self, group: GroupRecord, events: Sequence[ParkedEvent]) -> None:
        """Store parked events (again, for a replayed one: ``replaying`` is cleared) and
        forget their failed attempts."""
        ...

    async def unpark(self, group: GroupRecord, event_ids: Sequence[str]) -> None:
        """Forget parked events that were replayed and then settled, with their failed
        attempts."""
        ...

    async def replay_parked(self, name: str, limit: int) -> int:
        """Mark the ``limit`` longest-parked events (0: all) as replaying, their failed
        attempts forgotten (a replay starts again at attempt 1); how many."""
        ...

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        """The ``limit`` longest-parked of the events being replayed."""
        ...

    async def parked_after(self, name: str, after: Mapping[int, int]) -> list[tuple[int, str]]:
        """(partition, event_id) of the parked events, replayed or not, of the partitions
        in ``after``, at positions above the one given for their partition."""
        ...

    async def parked_count(self, name: str) -> int:
        """Parked events not being replayed."""
        ...

    async def lowest_replaying(self, name: str) -> dict[int, int]:
        """By partition, the lowest position of the events being replayed (none: no key)."""
        ...

    async def close(self) -> None: ...
