"""Crashes under ``serve --workers 2``, on SQLite and PostgreSQL: kill -9 one worker, or
the supervisor, while orders are in flight. Nothing acknowledged is lost, nothing is
applied twice, and the gateway serves again (a replaced worker, or a restart), also
when every order is on one product, whose turns the killed worker may have held. The
workers of a killed supervisor stop as a stopping gateway does, with no store fault."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from collections.abc import Sequence

import grpc
import pytest
from orders.v1 import events_pb2, order_command_service_pb2

from server.rpc.status_mapping import STORE_UNAVAILABLE_COMMAND
from tests.clients import Clients, item, order_request
from tests.workers_support import WAIT, alive, spread_clients, until_workers, workers_gateway

ORDERS = 300
ACKNOWLEDGED_BEFORE_KILL = 50
PRODUCTS = 10
STOCK = 1_000_000
CHANNELS = 8
HOT_ACKNOWLEDGED_BEFORE_KILL = 200
"""On one product: by then the workers take turns at it (they do from its first conflict),
and some command waits for one whenever the supervisor is killed."""


def requests(products: int = PRODUCTS) -> list[order_command_service_pb2.CreateOrderRequest]:
    return [
        order_request(item(f"p-{n % products}"), command_id=str(uuid.uuid4()))
        for n in range(ORDERS)
    ]


def identity(events: list[events_pb2.Event]) -> list[tuple[str, int, str]]:
    return [(e.event_id, e.position, e.event_type) for e in events]


async def place_until_killed(
    clients: Sequence[Clients],
    orders: list[order_command_service_pb2.CreateOrderRequest],
    kill: int,
) -> dict[str, list[events_pb2.Event]]:
    """Place every order concurrently; SIGKILL ``kill`` once enough are acknowledged.
    The acknowledged ones."""
    for product in {request.items[0].product_id for request in orders}:
        await clients[0].restock(product, STOCK)
    acknowledged: dict[str, list[events_pb2.Event]] = {}
    enough = asyncio.Event()

    async def place(n: int, request: order_command_service_pb2.CreateOrderRequest) -> None:
        acknowledged[request.command_id] = await clients[n % len(clients)].create(request)
        if len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL:
            enough.set()

    calls = [asyncio.ensure_future(place(n, r)) for n, r in enumerate(orders)]
    await asyncio.wait_for(enough.wait(), WAIT)
    os.kill(kill, signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, grpc.aio.AioRpcError) for o in failed), failed
    assert len(acknowledged) + len(failed) == ORDERS
    return acknowledged


async def assert_retries_complete_exactly_once(
    clients: Sequence[Clients],
    orders: list[order_command_service_pb2.CreateOrderRequest],
    acknowledged: dict[str, list[events_pb2.Event]],
) -> None:
    """Retrying every order (same command_id) replays the acknowledged ones unchanged and
    completes the others; each product then has exactly one reservation per order."""
    for n, request in enumerate(orders):
        retried = await clients[n % len(clients)].create(request)
        if request.command_id in acknowledged:
            assert identity(retried) == identity(acknowledged[request.command_id])
        again = await clients[(n + 1) % len(clients)].create(request)
        assert identity(again) == identity(retried)
    per_product = Counter(request.items[0].product_id for request in orders)
    for product, count in per_product.items():
        (restocked,) = await clients[0].restock(product, 1)
        assert restocked.product_restocked.available_after == STOCK - count + 1


@pytest.mark.parametrize("products", [PRODUCTS, 1], ids=["spread", "hot"])
async def test_a_killed_worker_is_replaced_and_loses_nothing(store_url: str, products: int) -> None:
    orders = requests(products)
    async with workers_gateway(store_url) as gateway:
        before = gateway.workers()
        victim = min(before)
        async with spread_clients(gateway.target, CHANNELS) as clients:
            acknowledged = await place_until_killed(clients, orders, victim)

        after = await until_workers(gateway, 2)
        assert victim not in after and len(after & before) == 1
        assert "starting a replacement" in gateway.log
        assert gateway.process.poll() is None
        async with spread_clients(gateway.target, CHANNELS) as clients:
            await assert_retries_complete_exactly_once(clients, orders, acknowledged)


async def test_a_killed_supervisor_takes_its_workers_along_and_loses_nothing(
    store_url: str,
) -> None:
    orders = requests()
    async with workers_gateway(store_url) as gateway:
        workers = gateway.workers()
        async with spread_clients(gateway.target, CHANNELS) as clients:
            acknowledged = await place_until_killed(clients, orders, gateway.process.pid)
        async with asyncio.timeout(WAIT):
            while any(alive(pid) for pid in workers):  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.05)
        # Each worker says why it stopped, once.
        assert gateway.log.count("the supervisor process is gone; stopping") == len(workers)
        assert "lost the connection to the supervisor" not in gateway.log
        port = int(gateway.target.rpartition(":")[2])

    # Restarted on the same store and address.
    async with (
        workers_gateway(store_url, port=port) as gateway,
        spread_clients(gateway.target, CHANNELS) as clients,
    ):
        await assert_retries_complete_exactly_once(clients, orders, acknowledged)


async def test_commands_waiting_for_a_killed_supervisors_turns_are_refused_as_by_a_stop(
    store_url: str,
) -> None:
    """Every order on one product, through both workers: on SQLite the supervisor grants
    the turns at it. Killed, its workers stop, and the commands then waiting for a turn
    are answered UNAVAILABLE "the server is shutting down", not STORE_UNAVAILABLE, and no
    worker logs a store fault: the store works, the workers stop."""
    failures: Counter[tuple[str, str]] = Counter()
    acknowledged = 0
    enough = asyncio.Event()

    async def place_until_refused(clients: Clients) -> None:
        nonlocal acknowledged
        while True:
            try:
                await clients.create(order_request(item("p-hot")))
            except grpc.aio.AioRpcError as error:
                failures[(error.code().name, error.details() or "")] += 1
                return
            acknowledged += 1
            if acknowledged >= HOT_ACKNOWLEDGED_BEFORE_KILL:
                enough.set()

    async with workers_gateway(store_url) as gateway:
        workers = gateway.workers()
        async with spread_clients(gateway.target, 2 * CHANNELS) as clients:
            await clients[0].restock("p-hot", STOCK)
            callers = [asyncio.ensure_future(place_until_refused(c)) for c in [*clients, *clients]]
            await asyncio.wait_for(enough.wait(), WAIT)
            os.kill(gateway.process.pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*callers), WAIT)
        async with asyncio.timeout(WAIT):
            while any(alive(pid) for pid in workers):  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.05)
        log = gateway.log

    assert not [f for f in failures if f[1] == STORE_UNAVAILABLE_COMMAND], failures
    assert {code for code, _ in failures} <= {"UNAVAILABLE", "CANCELLED"}, failures
    assert "event store fault" not in log
