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
from server.app import Gateway, create_server
from server.config import Settings
from server.rpc.draining import StopGate
from server.rpc.method_handlers import Interceptors
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


async def busy_gateway_with_stock() -> tuple[Gateway, str]:
    """A started gateway on a ``BusyStore``, with stock enough for every caller; and its
    address."""
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
    return gateway, target


async def test_calls_queued_when_the_stop_begins_are_refused_unavailable() -> None:
    gateway, target = await busy_gateway_with_stock()
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


def call_again_until(
    target: str, stopping: threading.Event, stopped: threading.Event, codes: Counter[str]
) -> None:
    """CreateOrder after CreateOrder, each failure retried after 20 ms (as a client with a
    short backoff does), until the gateway has stopped."""
    with grpc.insecure_channel(target) as channel:
        orders = order_command_service_pb2_grpc.OrderCommandServiceStub(channel)
        while not stopped.is_set():
            try:
                list(orders.CreateOrder(order_request(item("sku-1")), timeout=30))
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
                time.sleep(0.02)
            if stopping.is_set():
                codes[code] += 1


async def test_clients_that_retry_at_once_are_refused_unavailable_not_cancelled() -> None:
    # Refused at once, such clients would call again before grpc's queue ever emptied,
    # and grpc's shutdown would cancel what they left in it.
    gateway, target = await busy_gateway_with_stock()
    stopping = threading.Event()
    stopped = threading.Event()
    codes: Counter[str] = Counter()
    with ThreadPoolExecutor(CALLERS) as callers:
        loop = asyncio.get_running_loop()
        running = [
            loop.run_in_executor(callers, call_again_until, target, stopping, stopped, codes)
            for _ in range(CALLERS)
        ]
        await asyncio.sleep(1)  # every caller busy
        stopping.set()
        await gateway.stop()
        await asyncio.sleep(0.2)  # calls to a port nobody listens on any more
        stopped.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*running)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] >= CALLERS


async def test_a_call_held_by_a_stop_is_refused_before_its_deadline() -> None:
    gate = StopGate()
    answer: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        _accept, response_serializer=lambda _: b"", request_deserializer=bytes
    )
    server = grpc.aio.server(interceptors=[Interceptors([gate])])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Held", {"Call": answer})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await gate.close()  # and never released: grpc's shutdown has not begun
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.Held/Call"
            )
            started = time.monotonic()
            try:
                await call(b"", timeout=4.0)
            except grpc.aio.AioRpcError as error:
                refused = error
            else:
                raise AssertionError("a held call was answered")
            waited = time.monotonic() - started
    finally:
        await server.stop(None)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.details() == "the server is shutting down"
    # Held for most of its time; refused 1 s before its deadline, with time left to retry
    # (how late the client notices is the machine's: a fraction of that, under load).
    assert 2.5 <= waited < 3.8


async def _accept(request: bytes, context: object) -> bytes:
    return b""


async def test_a_stop_is_not_quiet_while_admitted_commands_are_served() -> None:
    # Their clients call again as soon as they are answered: a stop that began grpc's
    # shutdown meanwhile would cancel those calls.
    gate = StopGate()
    served = [True]
    gate.quiet_only_when(lambda: not served[0])
    closing = asyncio.create_task(gate.close(quiet=0.01, most=5))
    await asyncio.sleep(0.2)
    assert not closing.done()
    served[0] = False
    async with asyncio.timeout(1):
        await closing
