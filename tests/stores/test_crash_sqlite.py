"""Crash safety on SQLite: SIGKILL the real server while orders are in flight, restart it on
the same file, and check that nothing acknowledged was lost and nothing is half-applied.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import (
    event_stream_service_pb2_grpc,
    events_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
)

from domain.ports import RecordedEvent
from server.stores.sqlite import SQLiteEventStore
from tests.clients import Clients, item, order_request

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0
ORDERS = 400
ACKNOWLEDGED_BEFORE_KILL = 60
STOCK = 1_000_000
SERVE = (sys.executable, "-m", "server.cli", "serve")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fail_with_log(message: str, log: Path) -> NoReturn:
    pytest.fail(f"{message}; its output:\n{log.read_text()}")


@contextmanager
def gateway_process(db: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The real ``order-gateway serve`` in a child process; killed on the way out."""
    target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_GATEWAY_")}
    with log.open("ab") as output:
        process = subprocess.Popen(
            [*SERVE, "--listen", target, "--store", f"sqlite:///{db}"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, target
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=READY_TIMEOUT)


@asynccontextmanager
async def connected(
    process: subprocess.Popen[bytes], target: str, log: Path
) -> AsyncIterator[Clients]:
    """Clients for the gateway at ``target``, once its health service says SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while True:
            if process.poll() is not None:
                fail_with_log(f"the gateway exited with {process.returncode}", log)
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                fail_with_log(f"the gateway was not ready within {READY_TIMEOUT} s", log)
            await asyncio.sleep(0.05)
        yield Clients(
            channel=channel,
            orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
            inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
            events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
        )


def requests() -> list[order_command_service_pb2.CreateOrderRequest]:
    return [
        order_request(item("hot", 1), item(f"cold-{n % 4}", 2), command_id=str(uuid.uuid4()))
        for n in range(ORDERS)
    ]


async def read_log(db: Path) -> list[RecordedEvent]:
    store = await SQLiteEventStore.open(db)
    try:
        return await store.read_all(0, 100 * ORDERS)
    finally:
        await store.close()


def identity(events: list[events_pb2.Event]) -> list[tuple[str, int, str]]:
    return [(e.event_id, e.position, e.event_type) for e in events]


async def test_sigkill_loses_no_acknowledged_command_and_splits_none(tmp_path: Path) -> None:
    db, log = tmp_path / "g.db", tmp_path / "gateway.log"
    orders = requests()
    acknowledged: dict[str, list[events_pb2.Event]] = {}

    with gateway_process(db, log) as (process, target):
        async with connected(process, target, log) as clients:
            for product in ("hot", "cold-0", "cold-1", "cold-2", "cold-3"):
                await clients.restock(product, STOCK, command_id=str(uuid.uuid4()))
            enough = asyncio.Event()

            async def place(request: order_command_service_pb2.CreateOrderRequest) -> None:
                events = await clients.create(request)
                acknowledged[request.command_id] = events
                if len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL:
                    enough.set()

            calls = [asyncio.ensure_future(place(request)) for request in orders]
            await asyncio.wait_for(enough.wait(), CALL_TIMEOUT)
            process.send_signal(signal.SIGKILL)
            outcomes = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), CALL_TIMEOUT
            )

    unanswered = [e for e in outcomes if isinstance(e, BaseException)]
    assert unanswered, "every order finished before the kill: nothing was in flight"
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in unanswered)
    assert len(acknowledged) + len(unanswered) == ORDERS

    # On disk after the crash: a contiguous log, every command whole.
    recovered = await read_log(db)
    assert [e.position for e in recovered] == list(range(1, len(recovered) + 1))
    by_command: dict[str, list[RecordedEvent]] = defaultdict(list)
    for event in recovered:
        by_command[event.command_id].append(event)
    for request in orders:
        events = by_command.get(request.command_id, [])
        assert [e.event_type for e in events] in (
            [],
            ["OrderCreated", "StockReserved", "StockReserved"],
        ), f"command {request.command_id} is half-applied"
    for command_id, answered in acknowledged.items():
        assert identity(answered) == [
            (e.event_id, e.position, e.event_type) for e in by_command[command_id]
        ]
    hot_stream = [e for e in recovered if e.stream_id == "product-hot"]
    assert [e.stream_version for e in hot_stream] == list(range(1, len(hot_stream) + 1))

    # Restarted on the same file: acknowledged commands replay, the others complete.
    with gateway_process(db, log) as (process, target):
        async with connected(process, target, log) as clients:
            for request in orders:
                retried = await asyncio.wait_for(clients.create(request), CALL_TIMEOUT)
                if request.command_id in acknowledged:
                    assert identity(retried) == identity(acknowledged[request.command_id])
                elif request.command_id in by_command:
                    # Committed but never answered: the retry replays the committed events.
                    assert [e.event_id for e in retried] == [
                        e.event_id for e in by_command[request.command_id]
                    ]
                again = await asyncio.wait_for(clients.create(request), CALL_TIMEOUT)
                assert identity(again) == identity(retried)
            hot = await clients.restock("hot", 1, command_id=str(uuid.uuid4()))
            assert hot[0].product_restocked.available_after == STOCK - ORDERS + 1
