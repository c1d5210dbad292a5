"""Helpers for tests of consumer groups with the memory stores and no server."""

from __future__ import annotations

import asyncio
import dataclasses

from server.consumer_groups.engine import Member
from server.stores.memory import MemoryEventStore
from tests.conformance.contract import commit_of


async def restock(events: MemoryEventStore, product: str) -> str:
    """A ProductRestocked event of ``product`` committed to ``events``; its id."""
    commit = commit_of([(f"product-{product}", 1)])
    event = dataclasses.replace(
        commit.events[0],
        event_type="ProductRestocked",
        data=b'{"product_id": "%s", "quantity": 1, "available_after": 1}' % product.encode(),
    )
    await events.append(dataclasses.replace(commit, events=[event]))
    return event.event_id


async def delivered(member: Member, count: int) -> list[str]:
    """The ids of the next ``count`` events delivered to ``member``, in order."""
    ids: list[str] = []
    async with asyncio.timeout(20):
        async for message in member.messages():
            if message.WhichOneof("message") == "delivery":
                ids.append(message.delivery.event.event_id)
                if len(ids) == count:
                    break
    return ids
