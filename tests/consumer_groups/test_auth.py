"""Consumer groups with authentication on: events:read consumes and reads, events:admin
manages; and no RPC the server serves is left without a scope."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from server.app import SERVICE_NAMES, Gateway
from server.security.scopes import REQUIRED_SCOPES
from tests.group_support import group_gateway, join

TOKENS = {
    "reader": ("reader-token", ["events:read"]),
    "admin": ("admin-token", ["events:admin"]),
    "writer": ("writer-token", ["orders:write"]),
}


def bearer(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[name][0]}"),)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Gateway]:
    lines = []
    for user_id, (token, scopes) in TOKENS.items():
        digest = hashlib.sha256(token.encode()).hexdigest()
        quoted = ", ".join(f'"{scope}"' for scope in scopes)
        lines += ["[[token]]", f'sha256 = "{digest}"', f'user_id = "{user_id}"']
        lines += [f"scopes = [{quoted}]", ""]
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("\n".join(lines))
    async with group_gateway(auth_tokens=tokens) as gateway:
        yield gateway


async def test_admin_manages_groups_and_reader_consumes_them(secured: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        create = pb.CreateConsumerGroupRequest(name="g")
        for who in ("reader", "writer"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateConsumerGroup(create, metadata=bearer(who))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateConsumerGroup(create)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.CreateConsumerGroup(create, metadata=bearer("admin"))

        get = pb.GetConsumerGroupRequest(name="g")
        await stub.GetConsumerGroup(get, metadata=bearer("reader"))
        await stub.ListConsumerGroups(pb.ListConsumerGroupsRequest(), metadata=bearer("reader"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetConsumerGroup(get, metadata=bearer("admin"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        consumer = await join(stub, "g", metadata=bearer("reader"))
        group = (await stub.GetConsumerGroup(get, metadata=bearer("reader"))).group
        assert [m.user_id for m in group.members] == ["reader"]
        await consumer.close()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await join(stub, "g", metadata=bearer("writer"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        replay = pb.ReplayParkedRequest(name="g")
        delete = pb.DeleteConsumerGroupRequest(name="g")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReplayParked(replay, metadata=bearer("reader"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DeleteConsumerGroup(delete, metadata=bearer("reader"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await stub.ReplayParked(replay, metadata=bearer("admin"))
        await stub.DeleteConsumerGroup(delete, metadata=bearer("admin"))


def test_every_rpc_of_every_served_service_has_a_scope() -> None:
    """Derived from the proto descriptors, so that a new RPC cannot be served open."""
    pool = descriptor_pool.Default()
    methods = {
        f"/{name}/{method.name}"
        for name in SERVICE_NAMES
        for method in pool.FindServiceByName(name).methods
    }
    assert "/orders.v1.ConsumerGroupService/Consume" in methods
    assert methods - REQUIRED_SCOPES.keys() == set()
    assert REQUIRED_SCOPES["/orders.v1.ConsumerGroupService/Consume"] == {"events:read"}
    assert REQUIRED_SCOPES["/orders.v1.ConsumerGroupService/ReplayParked"] == {"events:admin"}
