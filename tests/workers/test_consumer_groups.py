"""Consumer groups behind ``serve --workers 2``: shared by the workers on PostgreSQL (as by
replicas), refused with a clear status on SQLite, where each worker would hand out a
group's partitions on its own."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from tests.consumer_groups.test_service import reason_of
from tests.workers_support import workers_gateway

CHANNELS = 8
"""Connections spread over the two workers: all on one is a 2^-7 chance."""


def channels(target: str) -> list[grpc.aio.Channel]:
    # One connection each (no shared subchannel pool), so the kernel spreads them.
    return [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]


async def test_groups_are_shared_by_the_workers_on_postgresql(fresh_postgres_url: str) -> None:
    async with workers_gateway(fresh_postgres_url) as gateway:
        opened = channels(gateway.target)
        try:
            stubs = [pb_grpc.ConsumerGroupServiceStub(channel) for channel in opened]
            await stubs[0].CreateConsumerGroup(pb.CreateConsumerGroupRequest(name="projections"))
            for stub in stubs:
                found = await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name="projections"))
                assert found.group.settings.partitions == 16
        finally:
            for channel in opened:
                await channel.close()


async def test_groups_on_sqlite_with_workers_are_refused(tmp_path: Path) -> None:
    async with workers_gateway(f"sqlite:///{tmp_path / 'events.db'}") as gateway:
        opened = channels(gateway.target)
        try:
            for channel in opened:
                stub = pb_grpc.ConsumerGroupServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.CreateConsumerGroup(pb.CreateConsumerGroupRequest(name="g"))
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "--workers 1" in (refused.value.details() or "")
                assert reason_of(refused.value) == "CONSUMER_GROUPS_UNAVAILABLE"
        finally:
            for channel in opened:
                await channel.close()
