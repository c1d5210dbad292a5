"""What a store keeps for consumer groups: groups, partition checkpoints, parked events.

Each event store backend has an implementation (``store_memory``, ``store_sqlite``,
``store_postgres``); the rules that use them live once, in ``engine``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from server.consumer_groups.model import GroupRecord, ParkedEvent


class ConsumerGroupStore(Protocol):
    async def create_group(self, record: GroupRecord) -> GroupRecord:
        """Store ``record`` unless a group of its name exists; returns the stored group."""
        ...

    async def get_group(self, name: str) -> GroupRecord | None: ...

    async def list_groups(self) -> list[GroupRecord]:
        """Every group, by name."""
        ...

    async def delete_group(self, name: str) -> bool:
        """Remove the group with its checkpoints and parked events; False if unknown."""
        ...

    async def load_checkpoints(self, name: str) -> dict[int, int]:
        """The stored checkpoint of each partition that has one."""
        ...

    async def save_checkpoints(self, name: str, checkpoints: Mapping[int, int]) -> None:
        """Store these partitions' checkpoints; a stored one is never moved back."""
        ...

    async def park(self, name: str, events: Sequence[ParkedEvent]) -> None:
        """Store parked events (again, for a replayed one: ``replaying`` is cleared)."""
        ...

    async def unpark(self, name: str, event_ids: Sequence[str]) -> None:
        """Forget parked events that were replayed and then settled."""
        ...

    async def replay_parked(self, name: str, limit: int) -> int:
        """Mark the ``limit`` longest-parked events (0: all) as replaying; how many."""
        ...

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        """The ``limit`` longest-parked of the events being replayed."""
        ...

    async def parked_count(self, name: str) -> int:
        """Parked events not being replayed."""
        ...

    async def close(self) -> None: ...
