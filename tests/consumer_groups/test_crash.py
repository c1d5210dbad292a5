"""kill -9 of a gateway (SQLite) with deliveries in flight and retries pending: nothing is
skipped, nothing lost. The stored checkpoints never passed an event the consumer had not
acked, and after a restart every event is acked, duplicates caught by event_id."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import zlib
from pathlib import Path

import grpc
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import inventory_command_service_pb2 as inventory_pb
from orders.v1 import inventory_command_service_pb2_grpc as inventory_grpc

from tests.group_support import join
from tests.serving import free_port, start_gateway, wait_until_serving

PARTITIONS = 4
EVENTS = 60


async def test_a_killed_gateway_skips_nothing_and_loses_nothing(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    target = f"127.0.0.1:{free_port()}"
    first = start_gateway(["serve", "--listen", target, "--store", f"sqlite:///{database}"])
    positions: dict[str, tuple[int, int]] = {}  # event id: (position, partition)
    acked: set[str] = set()  # the consumer's dedupe records: written before each ack
    try:
        await wait_until_serving(target, first)
        async with grpc.aio.insecure_channel(target) as channel:
            groups = pb_grpc.ConsumerGroupServiceStub(channel)
            inventory = inventory_grpc.InventoryCommandServiceStub(channel)
            await groups.CreateConsumerGroup(
                pb.CreateConsumerGroupRequest(
                    name="g", settings=pb.ConsumerGroupSettings(partitions=PARTITIONS)
                )
            )
            for n in range(EVENTS):
                request = inventory_pb.RestockProductRequest(product_id=f"p{n % 6}", quantity=1)
                async for response in inventory.RestockProduct(request):
                    event = response.event
                    partition = zlib.crc32(event.stream_id.encode()) % PARTITIONS
                    positions[event.event_id] = (event.position, partition)
            consumer = await join(groups, "g", max_in_flight=10)
            handled = 0
            with contextlib.suppress(TimeoutError):
                while handled < 45:
                    delivery = await consumer.delivery(5)
                    event_id = delivery.event.event_id
                    handled += 1
                    if handled % 4 == 0:
                        await consumer.nack(event_id)  # a retry pending at the kill
                    elif handled % 7 == 0:
                        continue  # left in flight
                    else:
                        acked.add(event_id)
                        await consumer.ack(event_id)
            await asyncio.sleep(1.5)  # checkpoints are stored at least once a second
            first.send_signal(signal.SIGKILL)
            first.wait()
            await consumer.close()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    with sqlite3.connect(database) as connection:
        stored = dict(
            connection.execute(
                "SELECT partition, position FROM consumer_group_checkpoints WHERE group_name = 'g'"
            ).fetchall()
        )
    assert stored, "checkpoints were stored while the group moved"
    for event_id, (position, partition) in positions.items():
        if position <= stored.get(partition, 0):
            assert event_id in acked, f"checkpoint of {partition} passed unacked {position}"

    second = start_gateway(["serve", "--listen", target, "--store", f"sqlite:///{database}"])
    try:
        await wait_until_serving(target, second)
        async with grpc.aio.insecure_channel(target) as channel:
            consumer = await join(pb_grpc.ConsumerGroupServiceStub(channel), "g")
            async with asyncio.timeout(60):
                while acked != set(positions):
                    delivery = await consumer.delivery()
                    acked.add(delivery.event.event_id)  # a duplicate is simply acked again
                    await consumer.ack(delivery.event.event_id)
            await consumer.close()
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    assert acked == set(positions)
