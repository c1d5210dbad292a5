"""A store file that reaches the process's file size limit (``ulimit -f``) is a full store.

SQLite reports such a write (EFBIG) as an I/O error, not as SQLITE_FULL; a client must
still hear RESOURCE_EXHAUSTED (STORE_FULL), not "unavailable, retry", from commands and
consumer-group writes alike, and every command acknowledged before the limit must be
there once the limit is lifted.
"""

from __future__ import annotations

import resource
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from orders.v1 import (
    consumer_group_service_pb2,
    consumer_group_service_pb2_grpc,
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    events_pb2,
)

from tests.clients import detail, item, order_request
from tests.serving import free_port, gateway_log, start_gateway, wait_until_serving
from tests.subscription_support import clients_on

LIMIT_BYTES = 2 << 20


def serve(database: Path, target: str) -> subprocess.Popen[bytes]:
    return start_gateway(["serve", "--listen", target, "--store", f"sqlite:///{database}"])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(15)


async def test_a_file_size_limit_is_store_full_for_commands_and_groups_and_loses_nothing(
    tmp_path: Path,
) -> None:
    database = tmp_path / "events.db"
    target = f"127.0.0.1:{free_port()}"
    process = serve(database, target)
    try:
        await wait_until_serving(target, process)
        # On the running gateway, as ``prlimit`` would set it: the log file it already
        # writes to must stay under the limit, and does (a line per call).
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))
        async with grpc.aio.insecure_channel(target) as channel:
            clients = clients_on(channel)
            await clients.restock("sku-1", 100_000)
            acknowledged: list[str] = []
            refused: grpc.aio.AioRpcError | None = None
            for _ in range(5_000):
                try:
                    created = await clients.create(order_request(item("sku-1")))
                except grpc.aio.AioRpcError as error:
                    refused = error
                    break
                acknowledged.append(created[0].stream_id)
            assert refused is not None, "the limit was never reached"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            info: error_details_pb2.ErrorInfo = detail(refused, error_details_pb2.ErrorInfo)
            assert info.reason == "STORE_FULL"

            # A group's row may still fit in a page the store has: create them until one
            # needs a page more.
            groups = consumer_group_service_pb2_grpc.ConsumerGroupServiceStub(channel)
            refused = None
            for n in range(500):
                create = consumer_group_service_pb2.CreateConsumerGroupRequest(name=f"group-{n}")
                try:
                    await groups.CreateConsumerGroup(create)
                except grpc.aio.AioRpcError as error:
                    refused = error
                    break
            assert refused is not None, "every consumer group fitted in the full store"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
            assert detail(refused, error_details_pb2.ErrorInfo).reason == "STORE_FULL"
            assert "Traceback" not in gateway_log(process)
    finally:
        stop(process)

    assert acknowledged
    process = serve(database, target)
    try:
        await wait_until_serving(target, process)
        async with grpc.aio.insecure_channel(target) as channel:
            stored = {
                event.stream_id async for event in events_of_orders(clients_on(channel).events)
            }
        assert set(acknowledged) <= stored
    finally:
        stop(process)


async def events_of_orders(
    events: event_stream_service_pb2_grpc.EventStreamServiceAsyncStub,
) -> AsyncIterator[events_pb2.Event]:
    """Every committed OrderCreated, read with Subscribe up to its first checkpoint."""
    request = event_stream_service_pb2.SubscribeRequest(event_types=["OrderCreated"])
    async for response in events.Subscribe(request):
        if response.HasField("checkpoint"):
            return
        yield response.event
