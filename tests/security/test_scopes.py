"""Scopes fail closed: every RPC the protos declare needs a scope, read from the descriptors.

The list of methods is never written by hand here: an RPC added to a proto without a
scope makes these tests fail, and the server refuses to start.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool

from server.app import Gateway, create_server
from server.cli import main
from server.config import Settings
from server.security.identity import ALL_SCOPES
from server.security.scopes import REQUIRED_SCOPES, UnscopedMethodsError, own_methods
from server.stores.memory import MemoryEventStore

OWN_METHODS = own_methods()
NO_SCOPE_TOKEN = "token-with-no-scope"


def test_the_methods_are_read_from_the_protos() -> None:
    assert "/orders.v1.OrderCommandService/CreateOrder" in OWN_METHODS
    assert "/orders.v1.EventStreamService/Subscribe" in OWN_METHODS


@pytest.mark.parametrize("method", OWN_METHODS)
def test_every_method_the_protos_declare_has_a_known_scope(method: str) -> None:
    assert method in REQUIRED_SCOPES, f"{method} has no scope in server/security/scopes.py"
    assert REQUIRED_SCOPES[method]
    assert REQUIRED_SCOPES[method] <= ALL_SCOPES


def test_no_scope_is_kept_for_a_method_the_protos_do_not_declare() -> None:
    assert set(REQUIRED_SCOPES) <= set(OWN_METHODS)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Gateway]:
    tokens = tmp_path / "tokens.toml"
    digest = hashlib.sha256(NO_SCOPE_TOKEN.encode()).hexdigest()
    tokens.write_text(f'[[token]]\nsha256 = "{digest}"\nuser_id = "nobody"\nscopes = []\n')
    gateway = await started_with_tokens(tokens)
    yield gateway
    await gateway.stop()


async def started_with_tokens(tokens: Path) -> Gateway:
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://", auth_tokens=tokens),
        store=MemoryEventStore(),
    )
    await gateway.start()
    return gateway


@pytest.mark.parametrize("method", OWN_METHODS)
async def test_every_method_refuses_callers_without_a_token_or_scope(
    secured: Gateway, method: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        assert await admission(channel, method, ()) == grpc.StatusCode.UNAUTHENTICATED
        with_no_scope = (("authorization", f"Bearer {NO_SCOPE_TOKEN}"),)
        assert await admission(channel, method, with_no_scope) == (
            grpc.StatusCode.PERMISSION_DENIED
        )


CONTRACT_SCOPES = {
    # As the API contract grants them, written out here rather than read from the server.
    "/orders.v1.OrderCommandService/CreateOrder": {"orders:write"},
    "/orders.v1.OrderCommandService/CancelOrder": {"orders:write", "orders:admin"},
    "/orders.v1.InventoryCommandService/RestockProduct": {"inventory:write"},
    "/orders.v1.EventStreamService/Subscribe": {"events:read"},
    "/orders.v1.ConsumerGroupService/Consume": {"events:read"},
    "/orders.v1.ConsumerGroupService/GetConsumerGroup": {"events:read"},
    "/orders.v1.ConsumerGroupService/ListConsumerGroups": {"events:read"},
    "/orders.v1.ConsumerGroupService/CreateConsumerGroup": {"events:admin"},
    "/orders.v1.ConsumerGroupService/DeleteConsumerGroup": {"events:admin"},
    "/orders.v1.ConsumerGroupService/ReplayParked": {"events:admin"},
}


def single_scope_token(scope: str) -> str:
    return f"token-with-only-{scope}"


@pytest.fixture
async def single_scoped(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway with one token per scope, each holding that scope alone."""
    tokens = tmp_path / "tokens.toml"
    lines = []
    for scope in sorted(ALL_SCOPES):
        digest = hashlib.sha256(single_scope_token(scope).encode()).hexdigest()
        lines += ["[[token]]", f'sha256 = "{digest}"', f'user_id = "only-{scope}"']
        lines += [f'scopes = ["{scope}"]', ""]
    tokens.write_text("\n".join(lines))
    gateway = await started_with_tokens(tokens)
    yield gateway
    await gateway.stop()


async def admission(channel: grpc.aio.Channel, method: str, metadata: Any) -> grpc.StatusCode:
    """How ``method`` answers an empty request: its status, or OK as soon as a streaming
    call sends a first message (an admitted Subscribe never ends on its own)."""
    service, _, name = method.strip("/").partition("/")
    described = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    raw: dict[str, Callable[[bytes], bytes]] = {
        "request_serializer": bytes,
        "response_deserializer": bytes,
    }
    call: Any
    if described.client_streaming and described.server_streaming:
        call = channel.stream_stream(method, **raw)(iter([b""]), metadata=metadata)
    elif described.client_streaming:
        call = channel.stream_unary(method, **raw)(iter([b""]), metadata=metadata)
    elif described.server_streaming:
        call = channel.unary_stream(method, **raw)(b"", metadata=metadata)
    else:
        call = channel.unary_unary(method, **raw)(b"", metadata=metadata)
    try:
        async with asyncio.timeout(30):
            if described.server_streaming:
                await call.read()
            else:
                await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        call.cancel()
    return grpc.StatusCode.OK


def test_the_contract_table_names_every_method_and_only_known_scopes() -> None:
    assert set(CONTRACT_SCOPES) == set(OWN_METHODS)
    assert set().union(*CONTRACT_SCOPES.values()) == ALL_SCOPES


async def test_a_token_with_a_single_scope_may_call_exactly_the_methods_the_contract_grants_it(
    single_scoped: Gateway,
) -> None:
    """Every method against every scope: a scope too many lets a caller do what its
    token was never meant for, one too few breaks a client the contract allows."""
    answers: dict[tuple[str, str], grpc.StatusCode] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{single_scoped.port}") as channel:
        for method in OWN_METHODS:
            for scope in sorted(ALL_SCOPES):
                with_scope = (("authorization", f"Bearer {single_scope_token(scope)}"),)
                answers[method, scope] = await admission(channel, method, with_scope)
    refused = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
    wrong = {
        (method, scope): code
        for (method, scope), code in answers.items()
        if (code in refused) == (scope in CONTRACT_SCOPES[method])
    }
    assert wrong == {}, "granted where the contract refuses, or refused where it grants"
    # Not only refusals: granted calls got past authorization to have their (empty)
    # requests judged.
    assert grpc.StatusCode.INVALID_ARGUMENT in answers.values()


async def test_the_server_refuses_to_start_with_a_method_that_has_no_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(REQUIRED_SCOPES, "/orders.v1.EventStreamService/Subscribe")
    with pytest.raises(UnscopedMethodsError, match="EventStreamService/Subscribe"):
        await create_server(Settings(listen="127.0.0.1:0", store="memory://"))


@pytest.mark.usefixtures("keep_root_logger")
def test_serve_names_the_unscoped_method_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(REQUIRED_SCOPES, "/orders.v1.OrderCommandService/CancelOrder")
    assert main(["serve", "--listen", "127.0.0.1:0", "--store", "memory://"]) == 2
    assert "OrderCommandService/CancelOrder" in capsys.readouterr().err


async def call_extra_method(behaviour: Callable[..., Any]) -> grpc.aio.AioRpcError:
    """Serve ``behaviour`` as a unary method of our package that the protos do not declare
    (as a new RPC would be), call it, and return the error it was answered with."""
    service = grpc.method_handlers_generic_handler(
        "orders.v1.ExtraService",
        {
            "Single": grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=bytes, response_serializer=bytes
            )
        },
    )
    # Authentication off: every caller has every scope, and still an unscoped method
    # must stay closed.
    gateway = await create_server(
        Settings(listen="127.0.0.1:0", store="memory://"), store=MemoryEventStore()
    )
    gateway.server.add_generic_rpc_handlers((service,))
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            single = channel.unary_unary(
                "/orders.v1.ExtraService/Single",
                request_serializer=bytes,
                response_deserializer=bytes,
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await single(b"")
    finally:
        await gateway.stop()
    return raised.value


async def test_a_served_method_with_no_scope_is_refused_even_with_authentication_off() -> None:
    called = []

    async def single(request: bytes, context: Any) -> bytes:
        called.append(request)
        return b""

    refused = await call_extra_method(single)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert called == []


async def test_an_unexpected_error_in_any_kind_of_method_is_internal_without_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        REQUIRED_SCOPES, "/orders.v1.ExtraService/Single", frozenset({"orders:write"})
    )

    async def single(request: bytes, context: Any) -> bytes:
        raise RuntimeError("secret detail /var/lib/db.sqlite")

    failed = await call_extra_method(single)
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert failed.details() == "internal error"
    assert dict(failed.trailing_metadata() or ()).get("x-request-id")
