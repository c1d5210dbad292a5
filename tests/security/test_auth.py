"""Bearer tokens from a token file, over a real server: who may call what, as whom."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from orders.v1 import (
    event_stream_service_pb2,
    event_stream_service_pb2_grpc,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
)

from server.app import Gateway, create_server
from server.config import Settings
from server.security.auth import TokenFileAuthenticator
from server.stores.memory import MemoryEventStore
from tests.clients import Clients, item, order_request

TOKENS = {
    # name: (token, user_id, scopes)
    "alice": ("alice-secret-token-1", "alice", ["orders:write"]),
    "mallory": ("mallory-secret-token-2", "mallory", ["orders:write", "inventory:write"]),
    "ops": ("ops-secret-token-3", "ops", ["orders:admin"]),
    "warehouse": ("warehouse-secret-token-4", "warehouse", ["inventory:write"]),
    "auditor": ("auditor-secret-token-5", "auditor", ["events:read"]),
    "nobody": ("nobody-secret-token-6", "nobody", []),
}


def bearer(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[name][0]}"),)


def write_token_file(path: Path) -> Path:
    lines = []
    for token, user_id, scopes in TOKENS.values():
        # Upper-case hex must work as well as lower case.
        digest = hashlib.sha256(token.encode()).hexdigest()
        lines += [
            "[[token]]",
            f'sha256 = "{digest.upper() if user_id == "ops" else digest}"',
            f'user_id = "{user_id}"',
            f"scopes = {scopes!r}".replace("'", '"'),
            "",
        ]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = Settings(
        listen="127.0.0.1:0",
        store="memory://",
        auth_tokens=write_token_file(tmp_path / "tokens.toml"),
    )
    gateway = await create_server(settings, store=MemoryEventStore())
    await gateway.start()
    yield gateway
    await gateway.stop()


@pytest.fixture
async def api(secured: Gateway) -> AsyncIterator[Clients]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        yield Clients(
            channel=channel,
            orders=order_command_service_pb2_grpc.OrderCommandServiceStub(channel),
            inventory=inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel),
            events=event_stream_service_pb2_grpc.EventStreamServiceStub(channel),
        )


async def first_subscribed(
    api: Clients, metadata: Any
) -> event_stream_service_pb2.SubscribeResponse:
    call = api.events.Subscribe(event_stream_service_pb2.SubscribeRequest(), metadata=metadata)
    try:
        response = await call.read()
        assert isinstance(response, event_stream_service_pb2.SubscribeResponse)
        return response
    finally:
        call.cancel()


async def error_of(call: Callable[[], Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    return caught.value


def every_rpc(api: Clients, metadata: Any) -> dict[str, Callable[[], Any]]:
    return {
        "CreateOrder": lambda: api.create(order_request(item("sku-1")), metadata=metadata),
        "CancelOrder": lambda: api.cancel(str(uuid.uuid4()), metadata=metadata),
        "RestockProduct": lambda: api.restock("sku-1", 1, metadata=metadata),
        "Subscribe": lambda: first_subscribed(api, metadata),
    }


RPCS = ["CreateOrder", "CancelOrder", "RestockProduct", "Subscribe"]


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing authorization"),
        ((("authorization", "Basic YWxpY2U6c2VjcmV0"),), "Bearer <token>"),
        ((("authorization", "Bearer"),), "Bearer <token>"),
        ((("authorization", "Bearer    "),), "Bearer <token>"),
        ((("authorization", TOKENS["alice"][0]),), "Bearer <token>"),
        ((("authorization", "Bearer not-a-known-token"),), "unknown bearer token"),
        # Even when the first is valid: which one counts is ambiguous.
        (
            (
                ("authorization", f"Bearer {TOKENS['alice'][0]}"),
                ("authorization", "Bearer not-a-known-token"),
            ),
            "2 authorization headers",
        ),
        # A known token's hash is not a token.
        (
            (("authorization", f"Bearer {hashlib.sha256(b'alice-secret-token-1').hexdigest()}"),),
            "unknown bearer token",
        ),
    ],
    ids=["none", "basic", "empty", "blank", "no-scheme", "unknown", "two", "hash-as-token"],
)
async def test_missing_malformed_or_unknown_credentials_are_unauthenticated(
    api: Clients, rpc: str, metadata: Any, message: str
) -> None:
    error = await error_of(every_rpc(api, metadata)[rpc])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in (error.details() or "")


@pytest.mark.parametrize(
    ("rpc", "caller", "needed"),
    [
        ("CreateOrder", "auditor", "orders:write"),
        ("CreateOrder", "warehouse", "orders:write"),
        ("CreateOrder", "ops", "orders:write"),
        ("CancelOrder", "warehouse", "orders:admin or orders:write"),
        ("CancelOrder", "nobody", "orders:admin or orders:write"),
        ("RestockProduct", "alice", "inventory:write"),
        ("RestockProduct", "ops", "inventory:write"),
        ("Subscribe", "alice", "events:read"),
        ("Subscribe", "mallory", "events:read"),
    ],
)
async def test_a_missing_scope_is_permission_denied(
    api: Clients, rpc: str, caller: str, needed: str
) -> None:
    error = await error_of(every_rpc(api, bearer(caller))[rpc])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert needed in (error.details() or "")


async def test_authentication_comes_before_validation(api: Clients) -> None:
    invalid = order_command_service_pb2.CreateOrderRequest(customer_id="not-a-uuid")
    unauthenticated = await error_of(lambda: api.create(invalid))
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    unscoped = await error_of(lambda: api.create(invalid, metadata=bearer("auditor")))
    assert unscoped.code() == grpc.StatusCode.PERMISSION_DENIED
    garbage: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = api.channel.unary_stream(
        "/orders.v1.OrderCommandService/CreateOrder",
        request_serializer=None,
        response_deserializer=None,
    )
    unparsed = await error_of(lambda: garbage(b"\xff\xff\xff").read())
    assert unparsed.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_need_no_token(api: Clients) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await call.read()
    await call.done_writing()
    names = {service.name for service in answer.list_services_response.service}
    assert "orders.v1.OrderCommandService" in names


async def test_user_id_comes_from_the_token_never_the_body(api: Clients) -> None:
    restocked = await api.restock("sku-1", 5, metadata=bearer("warehouse"))
    assert restocked[0].user_id == "warehouse"

    # Field 8 is Event.user_id's number; in a request it is an unknown field and ignored.
    body = order_request(item("sku-1")).SerializeToString() + b"\x42\x07mallory"
    create: grpc.aio.UnaryStreamMultiCallable[
        bytes, order_command_service_pb2.CreateOrderResponse
    ] = api.channel.unary_stream(
        "/orders.v1.OrderCommandService/CreateOrder",
        request_serializer=None,
        response_deserializer=order_command_service_pb2.CreateOrderResponse.FromString,
    )
    created = [response.event async for response in create(body, metadata=bearer("alice"))]
    assert [event.user_id for event in created] == ["alice", "alice"]

    cancelled = await api.cancel(created[0].order_created.order_id, metadata=bearer("alice"))
    assert cancelled[0].order_cancelled.cancelled_by == "alice"
    assert {event.user_id for event in cancelled} == {"alice"}


async def test_another_users_token_cannot_cancel_an_order(api: Clients) -> None:
    await api.restock("sku-1", 5, metadata=bearer("warehouse"))
    created = await api.create(order_request(item("sku-1")), metadata=bearer("alice"))
    order_id = created[0].order_created.order_id

    denied = await error_of(lambda: api.cancel(order_id, metadata=bearer("mallory")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    # The order is untouched: its creator can still cancel it.
    cancelled = await api.cancel(order_id, metadata=bearer("alice"))
    assert cancelled[0].order_cancelled.cancelled_by == "alice"


async def test_orders_admin_alone_cancels_any_order(api: Clients) -> None:
    await api.restock("sku-1", 5, metadata=bearer("warehouse"))
    created = await api.create(order_request(item("sku-1", 2)), metadata=bearer("alice"))

    cancelled = await api.cancel(created[0].order_created.order_id, metadata=bearer("ops"))
    assert [e.event_type for e in cancelled] == ["OrderCancelled", "StockReleased"]
    assert cancelled[0].order_cancelled.cancelled_by == "ops"
    assert cancelled[1].stock_released.available_after == 5


async def test_subscribing_needs_events_read(api: Clients) -> None:
    await api.restock("sku-1", 5, metadata=bearer("mallory"))

    denied = await error_of(lambda: first_subscribed(api, bearer("mallory")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    first = await first_subscribed(api, bearer("auditor"))
    assert first.event.event_type == "ProductRestocked"
    assert first.event.user_id == "mallory"


async def test_tokens_never_reach_the_logs(api: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await api.restock("sku-1", 5, metadata=bearer("warehouse"))
    refused = await error_of(
        lambda: api.restock("sku-1", 5, metadata=(("authorization", "Bearer leaked-guess-123"),))
    )
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    unscoped = await error_of(lambda: api.restock("sku-1", 5, metadata=bearer("alice")))
    assert unscoped.code() == grpc.StatusCode.PERMISSION_DENIED

    logged = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.__dict__!r}" for record in caplog.records
    )
    assert "refused /orders.v1.InventoryCommandService/RestockProduct" in logged
    for secret in ("leaked-guess-123", TOKENS["warehouse"][0], TOKENS["alice"][0]):
        assert secret not in logged
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[token]]\nuser_id = "a"\n', "needs sha256"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\n', "needs user_id"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = ""\n', "user_id must be"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = "   "\n', "user_id must be"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = "a\\u200bb"\n', "user_id must be"),
        ('[[token]]\nsha256 = "abc"\nuser_id = "a"\n', "not a hex SHA-256"),
        (f'[[token]]\nsha256 = "{"g" * 64}"\nuser_id = "a"\n', "not a hex SHA-256"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = "a"\nscopes = "orders:write"\n', "scopes"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = "a"\nscopes = ["order:write"]\n', "scopes"),
        ('token = "x"\n', "token must be [[token]] tables"),
        ("token = 5\n", "token must be [[token]] tables"),
        ("token = true\n", "token must be [[token]] tables"),
        ('token = {sha256 = "x"}\n', "token must be [[token]] tables"),
        ("token = [5]\n", "token[0] must be a [[token]] table"),
        ("[[token]\n", "not valid TOML"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\nuser_id = "a"\n', "unknown key tokens"),
        ("# tokens to come\n", "no [[token]] table"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = ["a"]\n', "user_id must be"),
        (f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = 123\n', "user_id must be"),
        (
            f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = "a"\nscope = ["orders:write"]\n',
            "unknown key scope",
        ),
        (
            f'[[token]]\nsha256 = "{"0" * 64}"\nuser_id = "a"\nexpires = 2020-01-01\n',
            "unknown key expires",
        ),
        (
            f'[[token]]\nsha256 = "{"a" * 64}"\nuser_id = "low"\n'
            f'[[token]]\nsha256 = "{"A" * 64}"\nuser_id = "root"\nscopes = ["orders:admin"]\n',
            "token[1].sha256 is the digest of an earlier token's",
        ),
    ],
    ids=[
        "no-hash",
        "no-user",
        "empty-user",
        "blank-user",
        "invisible-user",
        "short",
        "not-hex",
        "scope-string",
        "unknown-scope",
        "flat",
        "number",
        "switch",
        "inline-table",
        "list-of-number",
        "toml",
        "misspelt-table",
        "no-token",
        "user-list",
        "user-number",
        "misspelt-key",
        "unknown-key",
        "same-token-twice",
    ],
)
def test_a_bad_token_file_is_refused_with_a_clear_message(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        TokenFileAuthenticator.from_file(path)
    # Which setting and file, as the operator named it: the gateway may read several.
    assert str(refused.value).startswith(f"--auth-tokens {path}: ")


def test_a_token_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    # As an editor on Windows may save it; TOML alone would refuse the mark at line 1.
    path = tmp_path / "tokens.toml"
    digest = hashlib.sha256(b"secret").hexdigest()
    path.write_bytes(f'\ufeff[[token]]\nsha256 = "{digest}"\nuser_id = "a"\n'.encode())
    caller = TokenFileAuthenticator.from_file(path).authenticate("secret")
    assert caller is not None and caller.user_id == "a"


@pytest.mark.parametrize("authentication", ["on", "off"])
async def test_a_method_without_a_scope_is_refused_whoever_calls(
    tmp_path: Path, authentication: str
) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        store="memory://",
        auth_tokens=write_token_file(tmp_path / "tokens.toml") if authentication == "on" else None,
    )
    gateway = await create_server(settings, store=MemoryEventStore())

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    unscoped: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo)
    gateway.server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("orders.v1.Unscoped", {"Echo": unscoped}),)
    )
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/orders.v1.Unscoped/Echo"
            )
            refused = await error_of(lambda: call(b"hello", metadata=bearer("ops")))
    finally:
        await gateway.stop()
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.details() == "this method has no scope assigned"
