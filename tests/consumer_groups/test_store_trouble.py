"""A group's background tasks and a store they cannot reach: one WARNING when their calls
start failing, one INFO when they work again, never a traceback per attempt (a database
down for 45 s logged four 37-line tracebacks per group and process)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from domain.errors import StoreUnavailableError
from server.consumer_groups.engine import GroupTuning
from server.consumer_groups.model import GroupSettings, ParkedEvent
from server.consumer_groups.service import ConsumerGroups
from server.consumer_groups.store_memory import MemoryConsumerGroupStore
from server.rpc.subscription_hub import SubscriptionHub
from server.stores.memory import MemoryEventStore

TUNING = GroupTuning(flush_interval=0.01, retry_base=0.02, trouble_quiet=0.2)


class UnreachableStore(MemoryConsumerGroupStore):
    """Its replays cannot be read while ``down`` (what each flush's look for them meets)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failures = 0

    async def replaying(self, name: str, limit: int) -> list[ParkedEvent]:
        if self.down:
            self.failures += 1
            raise StoreUnavailableError("PostgreSQL is unavailable (consumer groups): refused")
        return await super().replaying(name, limit)


async def test_a_store_down_for_a_while_is_one_warning_and_one_recovery_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = MemoryEventStore()
    hub = SubscriptionHub(events, 100)
    await hub.start()
    store = UnreachableStore()
    groups = ConsumerGroups(store, events, hub, TUNING)
    try:
        await groups.create("g", GroupSettings(partitions=1))
        runtime, member = await groups.join("g", "m", "user", 10)
        with caplog.at_level(logging.DEBUG, logger="order_gateway.consumer_groups"):
            store.down = True
            async with asyncio.timeout(10):
                while store.failures < 5:  # noqa: ASYNC110 - the flushes run on their own
                    await asyncio.sleep(0.01)
            store.down = False
            async with asyncio.timeout(10):
                while "works again" not in caplog.text:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        await groups.leave(runtime, member)
    finally:
        await groups.stop()
        await hub.stop()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            "consumer group 'g': storing its state failed (PostgreSQL is unavailable"
            " (consumer groups): refused); trying again until it works",
        ),
        ("INFO", "consumer group 'g': storing its state works again"),
    ]
    assert not any(r.exc_info for r in caplog.records)
