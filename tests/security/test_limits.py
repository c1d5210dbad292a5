"""Limits and leaks: request size, concurrent RPCs, deadlines, and what INTERNAL reveals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from orders.v1 import (
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2_grpc,
)

from domain.ports import Commit, EventStore, RecordedEvent
from server.app import Gateway, create_server
from server.config import Settings
from server.rpc.status_mapping import INTERNAL_MESSAGE
from server.stores.memory import MemoryEventStore
from tests.clients import Clients, address, bad_fields, item, order_request
from tests.security.test_auth import bearer, write_token_file

WAIT = 10
"""Upper bound, in seconds, on any wait for the server to reach a state (never a timing check)."""


async def start(store: EventStore, **settings: int) -> Gateway:
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://", **settings),  # type: ignore[arg-type]
        store=store,
    )
    await gateway.start()
    return gateway


def connect(gateway: Gateway) -> grpc.aio.Channel:
    # A private subchannel pool gives each channel its own connection.
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


def clients_for(channel: grpc.aio.Channel) -> Clients:
    return Clients(
        channel=channel,
        orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
        inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
        events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
    )


async def serving(channel: grpc.aio.Channel) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=WAIT
    )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 8 * 1024 * 1024], ids=["1MiB+1", "8MiB"])
async def test_a_request_over_the_size_limit_is_resource_exhausted(
    clients: Clients, size: int
) -> None:
    huge = order_request(item("sku-1"))
    huge.shipping_address.recipient = "x" * size
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.create(huge)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await serving(clients.channel)


async def test_a_large_request_under_the_limit_is_judged_on_its_content(clients: Clients) -> None:
    # 900 KiB passes the size check and is refused for what it says, field by field.
    request = order_request(item("sku-1"))
    request.shipping_address.CopyFrom(address(line2="y" * 900 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.create(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["shipping_address.line2"]


class GatedStore(MemoryEventStore):
    """Appends wait for ``gate``; ``arrived`` counts the appends waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.arrived = 0
        self.changed = asyncio.Event()

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self.arrived += 1
        self.changed.set()
        await self.gate.wait()
        return await super().append(commit)

    async def until_arrived(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.arrived < count:
                self.changed.clear()
                await self.changed.wait()


async def test_rpcs_over_the_process_limit_are_resource_exhausted_until_one_ends() -> None:
    store = GatedStore()
    gateway = await start(store, max_concurrent_streams=2)
    channels = [connect(gateway) for _ in range(3)]
    try:
        busy = [
            asyncio.create_task(clients_for(channel).restock(f"sku-{n}", 1))
            for n, channel in enumerate(channels[:2])
        ]
        await store.until_arrived(2)

        # A third connection: the limit is per process, not per connection.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await clients_for(channels[2]).restock("sku-9", 1, command_id="")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        store.gate.set()
        async with asyncio.timeout(WAIT):
            finished = await asyncio.gather(*busy)
        assert [events[0].event_type for events in finished] == ["ProductRestocked"] * 2
        later = await clients_for(channels[2]).restock("sku-9", 1)
        assert later[0].product_restocked.available_after == 1
    finally:
        store.gate.set()
        for channel in channels:
            await channel.close()
        await gateway.stop()


BURST_CLIENT = """
import asyncio, sys
import grpc
from orders.v1 import inventory_command_service_pb2 as messages
from orders.v1 import inventory_command_service_pb2_grpc as stubs


async def main(target, calls):
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(50)]
    for channel in channels:
        await channel.channel_ready()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def restock(n):
        stub = stubs.InventoryCommandServiceStub(channels[n % len(channels)])
        request = messages.RestockProductRequest(product_id=f"sku-{n}", quantity=1)
        try:
            async for _ in stub.RestockProduct(request, timeout=60):
                pass
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    print(" ".join(await asyncio.gather(*(restock(n) for n in range(calls)))), flush=True)


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""
"""Sends a burst of RestockProduct calls over 50 connections once told to; prints each
call's status."""


async def test_a_burst_of_calls_the_server_has_not_taken_up_yet_is_answered_not_cancelled() -> None:
    # The event loop takes calls up one at a time; a burst that arrives faster waits in
    # grpc's queue, which by grpc's defaults cancels calls past 1,000 waiting (CANCELLED,
    # which clients do not retry). Stalling the loop while the burst arrives makes all of
    # it wait there at once.
    calls = 3_000
    gateway = await start(MemoryEventStore())
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BURST_CLIENT,
        f"127.0.0.1:{gateway.port}",
        str(calls),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert await client.stdout.readline() == b"ready\n"
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        time.sleep(3)  # noqa: ASYNC251 - the loop stalled on purpose: the burst waits in grpc's queue
        async with asyncio.timeout(120):
            codes = Counter((await client.stdout.readline()).split())
    finally:
        with contextlib.suppress(ProcessLookupError):
            client.kill()
        await client.wait()
        await gateway.stop()
    assert sum(codes.values()) == calls
    # Each answered by the gateway: done, or refused past its limit on concurrent calls.
    assert set(codes) <= {b"OK", b"RESOURCE_EXHAUSTED"}, codes
    assert codes[b"OK"] > 0


class StuckStore(MemoryEventStore):
    """Appends never finish; ``cancelled`` is set when the server gives up on one."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


async def test_an_expired_deadline_stops_the_work_down_into_the_store() -> None:
    store = StuckStore()
    gateway = await start(store)
    try:
        async with connect(gateway) as channel:
            stub = clients_for(channel).inventory
            request = inventory_command_service_pb2.RestockProductRequest(
                product_id="sku-1", quantity=1
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.RestockProduct(request, timeout=0.5):
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert store.entered.is_set()
            async with asyncio.timeout(WAIT):
                await store.cancelled.wait()
            assert await store.head_position() == 0
            assert await serving(channel)
    finally:
        await gateway.stop()


SECRET = "SELECT password FROM users -- /var/lib/order-gateway/secret.db"


class ExplodingStore(MemoryEventStore):
    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        raise RuntimeError(SECRET)


class CorruptingStore(MemoryEventStore):
    """Commits, then hands back records whose payload cannot be read: the failure happens
    after the command ran, while the servicer turns records into responses."""

    async def append(self, commit: Commit) -> list[RecordedEvent]:
        recorded = await super().append(commit)
        return [dataclasses.replace(r, data=SECRET.encode()) for r in recorded]


async def internal_error(store: MemoryEventStore) -> grpc.aio.AioRpcError:
    gateway = await start(store)
    try:
        async with connect(gateway) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await clients_for(channel).restock("sku-1", 1)
            assert await serving(channel)
    finally:
        await gateway.stop()
    return caught.value


@pytest.mark.parametrize("store_type", [ExplodingStore, CorruptingStore])
async def test_internal_errors_reveal_nothing_to_the_caller(
    store_type: type[MemoryEventStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    error = await internal_error(store_type())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_MESSAGE
    everything = repr(error.trailing_metadata()) + (error.debug_error_string() or "")
    for fragment in ("SELECT", "password", "/var/lib", "Traceback", "Error"):
        assert fragment not in everything
    # The operator gets the full story.
    assert any(
        r.exc_info is not None and "unexpected error" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    "store_type",
    [ExplodingStore, CorruptingStore],
)
async def test_the_caller_gets_the_id_under_which_the_error_is_logged(
    store_type: type[MemoryEventStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    error = await internal_error(store_type())
    request_id = str(dict(error.trailing_metadata() or ())["x-request-id"])
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None


def withheld(channel: grpc.aio.Channel, method: str) -> grpc.aio.StreamStreamCall:  # type: ignore[type-arg]
    """A call to ``method`` whose request message never comes (a stream that sends
    nothing), whatever the method's kind: the server reads its headers only."""
    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        method, request_serializer=None, response_deserializer=None
    )
    return stream(_never())


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""


@contextlib.asynccontextmanager
async def stranger_and_warehouse(
    tmp_path: Path, max_concurrent_streams: int
) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    """A gateway with tokens and ``max_concurrent_streams``; a connection to it for a
    caller without credentials, and one for the warehouse's token."""
    gateway = await create_server(
        Settings(
            listen="127.0.0.1:0",
            store="memory://",
            max_concurrent_streams=max_concurrent_streams,
            auth_tokens=write_token_file(tmp_path / "tokens.toml"),
        )
    )
    await gateway.start()
    stranger, warehouse = connect(gateway), connect(gateway)
    try:
        yield stranger, warehouse
    finally:
        for channel in (stranger, warehouse):
            await channel.close()
        await gateway.stop()


def without_request(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.StreamStreamCall:  # type: ignore[type-arg]
    """A call to ``method`` that ends without a request message (its client half-closes at
    once), whatever the method's kind."""
    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        method, request_serializer=None, response_deserializer=None
    )
    return stream(iter(()), metadata=metadata)


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/orders.v1.InventoryCommandService/RestockProduct",
        "/orders.v1.OrderCommandService/CreateOrder",
    ],
)
async def test_calls_that_end_without_their_request_are_refused_and_free_their_place(
    tmp_path: Path, method: str
) -> None:
    # grpc left such calls unanswered, each holding its place among the server's
    # concurrent calls until its client went away: as many as the process serves at once
    # locked every caller out, the warehouse's token included (RESOURCE_EXHAUSTED).
    async with stranger_and_warehouse(tmp_path, 20) as (stranger, warehouse):
        calls = [without_request(stranger, method) for _ in range(20)]
        async with asyncio.timeout(WAIT):
            codes = {await call.code() for call in calls}
        if method.startswith("/orders."):
            assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        else:
            # Beyond the open services' share of the 20, refused as they arrive.
            assert grpc.StatusCode.INVALID_ARGUMENT in codes
            assert codes <= {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            }
        restocked = await clients_for(warehouse).restock("sku-1", 5, metadata=bearer("warehouse"))
        assert restocked[0].product_restocked.available_after == 5
        token = bearer("mallory")  # orders:write, inventory:write
        refused = without_request(warehouse, method, token)
        assert await refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await refused.details() == "the call ended without its request message"


async def test_calls_without_credentials_are_refused_before_their_request_arrives(
    tmp_path: Path,
) -> None:
    # Judged only once their request had come, such calls held their places among the
    # server's concurrent calls for as long as their client withheld it: a stranger
    # could take them all, and every authenticated command was RESOURCE_EXHAUSTED.
    async with stranger_and_warehouse(tmp_path, 20) as (stranger, warehouse):
        calls = [
            withheld(stranger, "/orders.v1.InventoryCommandService/RestockProduct")
            # As many as the process may serve at once (and one connection carry).
            for _ in range(20)
        ]
        async with asyncio.timeout(WAIT):
            codes = {await call.code() for call in calls}
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        restocked = await clients_for(warehouse).restock("sku-1", 5, metadata=bearer("warehouse"))
        assert restocked[0].product_restocked.available_after == 5


REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


async def refused_once_held(
    held: list[grpc.aio.Call],
    hold: Callable[[], grpc.aio.Call],
    call: Callable[[], Awaitable[object]],
) -> grpc.aio.AioRpcError:
    """The error ``call`` fails with once the calls ``held`` have reached the server. One
    of them that ended is replaced (by ``hold``): calls start on their own, and a call of
    the test's may reach the server first and take the place of one held, which is then
    the one refused."""
    async with asyncio.timeout(WAIT):
        while True:
            held[:] = [hold() if ended.done() else ended for ended in held]
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                return error
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("service", ["health", "reflection"])
async def test_each_open_service_holds_at_most_a_tenth_of_the_concurrent_calls(
    tmp_path: Path, service: str
) -> None:
    # Open to anyone: a health Watch or a reflection stream stays open as long as its
    # client wants, and any call while its client withholds the request.
    async with stranger_and_warehouse(tmp_path, 30) as (stranger, warehouse):
        health = health_pb2_grpc.HealthStub(stranger)
        if service == "health":
            watching = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watching.read()).status == health_pb2.HealthCheckResponse.SERVING
            held: list[grpc.aio.Call] = [watching]
            method = "/grpc.health.v1.Health/Check"
        else:
            held = []
            method = REFLECTION_INFO

        def hold() -> grpc.aio.Call:
            return withheld(stranger, method)

        held += [hold() for _ in range(3 - len(held))]

        async def another() -> object:
            if service == "health":
                return await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            reflection = reflection_pb2_grpc.ServerReflectionStub(stranger)
            listing = reflection_pb2.ServerReflectionRequest(list_services="")
            call = reflection.ServerReflectionInfo(iter([listing]), timeout=WAIT)
            return [reply async for reply in call]

        refused = await refused_once_held(held, hold, another)
        assert (refused.code(), refused.details()) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many {service} calls at once (at most 3), retry later",
        )
        restocked = await clients_for(warehouse).restock("sku-1", 5, metadata=bearer("warehouse"))
        assert restocked[0].product_restocked.available_after == 5
        if service == "reflection":
            # grpcurl and buf curl hold a reflection stream for the whole of their call:
            # as many of them must not fail the replica's health probes.
            assert await serving(stranger)

        for call in held:
            call.cancel()
        async with asyncio.timeout(WAIT):
            while True:  # once the server has seen them end
                try:
                    await another()
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.01)
