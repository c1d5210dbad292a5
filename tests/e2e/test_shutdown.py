"""A stop under load: calls the gateway admitted finish, and every other call is refused
UNAVAILABLE, which clients retry elsewhere; none ends CANCELLED, a code no client retries."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
from orders.v1 import (
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from domain.ports import Commit, RecordedEvent
from server.app import create_server
from server.config import Settings
from server.stores.memory import MemoryEventStore
from tests.clients import item, order_request

CALLERS = 48


class BusyStore(MemoryEventStore):
    """Holds the event loop 2 ms per append, as a loaded process does: calls that come
    meanwhile wait in grpc's queue, not yet handed to the gateway."""

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        time.sleep(0.002)  # noqa: ASYNC251 - blocking the loop is the point
        return await super().append(commit)


def call_until(target: str, stopping: threading.Event, codes: Counter[str]) -> None:
    """CreateOrder after CreateOrder, until a call ends other than OK after ``stopping``."""
    with grpc.insecure_channel(target) as channel:
        orders = order_command_service_pb2_grpc.OrderCommandServiceStub(channel)
        while True:
            try:
                list(orders.CreateOrder(order_request(item("sku-1")), timeout=30))
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            if stopping.is_set():
                codes[code] += 1
                if code != "OK":
                    return


async def test_calls_queued_when_the_stop_begins_are_refused_unavailable() -> None:
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://"), store=BusyStore()
    )
    await gateway.start()
    target = f"127.0.0.1:{gateway.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
        request = inventory_command_service_pb2.RestockProductRequest(
            product_id="sku-1", quantity=1_000_000
        )
        [_ async for _ in inventory.RestockProduct(request)]
    stopping = threading.Event()
    codes: Counter[str] = Counter()
    with ThreadPoolExecutor(CALLERS) as callers:
        loop = asyncio.get_running_loop()
        running = [
            loop.run_in_executor(callers, call_until, target, stopping, codes)
            for _ in range(CALLERS)
        ]
        await asyncio.sleep(1)  # every caller busy
        stopping.set()
        await gateway.stop()
        async with asyncio.timeout(30):
            await asyncio.gather(*running)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] >= CALLERS
