"""The health service as clients call it: Check, Watch and List of grpc.health.v1."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import SERVICE_NAMES, Gateway, create_server
from server.client.health import check_health
from server.config import Settings
from server.rpc.health import GatewayHealthServicer
from server.stores.memory import MemoryEventStore

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def token_file(path: Path) -> Path:
    """One token that may only place orders: health needs none of its scopes."""
    digest = hashlib.sha256(b"orders-token").hexdigest()
    path.write_text(
        f'[[token]]\nsha256 = "{digest}"\nuser_id = "shop"\nscopes = ["orders:write"]\n'
    )
    return path


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = Settings(
        listen="127.0.0.1:0", store="memory://", auth_tokens=token_file(tmp_path / "t.toml")
    )
    gateway = await create_server(settings, store=MemoryEventStore())
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def listed(gateway: Gateway) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).List(
            health_pb2.HealthListRequest(), timeout=10
        )
    return {service: response.status for service, response in reply.statuses.items()}


async def test_list_reports_every_service_as_check_does_without_a_token(
    gateway: Gateway,
) -> None:
    statuses = await listed(gateway)
    assert statuses == {service: SERVING for service in ("", *SERVICE_NAMES)}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service, status in statuses.items():
            checked = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert checked.status == status


async def test_list_reports_not_serving_once_the_gateway_stops(gateway: Gateway) -> None:
    # What Gateway.stop does first, before it refuses new calls.
    await gateway.health.enter_graceful_shutdown()
    statuses = await listed(gateway)
    assert statuses and set(statuses.values()) == {NOT_SERVING}


async def test_the_health_command_names_a_service_the_server_does_not_know(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # grpc's health service answers it NOT_FOUND without a reason of its own.
    target = f"127.0.0.1:{gateway.port}"
    assert await asyncio.to_thread(check_health, target, "nope", 5) == 1
    assert capsys.readouterr() == ("", f"{target}: NOT_FOUND: unknown service 'nope'\n")


async def test_a_method_its_servicer_leaves_unimplemented_is_unimplemented_not_a_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As grpcio-health-checking's own servicer answers List: the generated base class's
    # method, which sets UNIMPLEMENTED and raises NotImplementedError.
    monkeypatch.setattr(GatewayHealthServicer, "List", health_pb2_grpc.HealthServicer.List)
    caplog.set_level(logging.WARNING)
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://"), store=MemoryEventStore()
    )
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health.List(health_pb2.HealthListRequest(), timeout=10)
            still = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        await gateway.stop()
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == "method not implemented"
    assert still.status == SERVING
    faults = [r for r in caplog.records if r.name.startswith("order_gateway") and r.exc_info]
    assert faults == []


async def test_a_stop_ends_watch_streams_after_their_not_serving() -> None:
    # grpc's own servicer never ends a Watch: the stop waited for each open one until its
    # grace period ran out, then cancelled it.
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://", shutdown_grace=600),
        store=MemoryEventStore(),
    )
    await gateway.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        watching = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watching.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        async with asyncio.timeout(60):  # the grace is 600 s
            await gateway.stop()
            last = await watching.read()
            with pytest.raises(grpc.aio.AioRpcError):
                await watching.read()
        assert isinstance(last, health_pb2.HealthCheckResponse)
        assert last.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await watching.code() == grpc.StatusCode.UNAVAILABLE
        assert await watching.details() == "the server is shutting down"
