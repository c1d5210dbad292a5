"""Authentication and per-RPC scope checks, done by one server interceptor.

Credentials arrive as ``authorization: Bearer <token>`` metadata. Health and reflection
need none. The interceptor sets ``server.identity.current_caller`` for the call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import grpc

from server.errors import INTERNAL_MESSAGE, plain_status, unexpected_error_status
from server.identity import (
    ALL_SCOPES,
    ANONYMOUS,
    SCOPE_EVENTS_ADMIN,
    SCOPE_EVENTS_READ,
    SCOPE_INVENTORY_WRITE,
    SCOPE_ORDERS_ADMIN,
    SCOPE_ORDERS_WRITE,
    Caller,
    current_caller,
)
from server.method_handlers import Handler, WrappedHandlers

log = logging.getLogger("order_gateway.auth")

Context = grpc.aio.ServicerContext[Any, Any]


REQUIRED_SCOPES: dict[str, frozenset[str]] = {
    "/orders.v1.OrderCommandService/CreateOrder": frozenset({SCOPE_ORDERS_WRITE}),
    # orders:admin alone is enough to cancel any order.
    "/orders.v1.OrderCommandService/CancelOrder": frozenset(
        {SCOPE_ORDERS_WRITE, SCOPE_ORDERS_ADMIN}
    ),
    "/orders.v1.InventoryCommandService/RestockProduct": frozenset({SCOPE_INVENTORY_WRITE}),
    "/orders.v1.EventStreamService/Subscribe": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/Consume": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/GetConsumerGroup": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/ListConsumerGroups": frozenset({SCOPE_EVENTS_READ}),
    "/orders.v1.ConsumerGroupService/CreateConsumerGroup": frozenset({SCOPE_EVENTS_ADMIN}),
    "/orders.v1.ConsumerGroupService/DeleteConsumerGroup": frozenset({SCOPE_EVENTS_ADMIN}),
    "/orders.v1.ConsumerGroupService/ReplayParked": frozenset({SCOPE_EVENTS_ADMIN}),
}
"""Per method, the scopes of which the caller needs at least one. Methods not listed
(health, reflection) are open."""


class AuthenticationError(Exception):
    """No, malformed, unknown or expired credentials."""


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Caller | None:
        """The caller the token identifies, None if this authenticator does not know it.

        Raises AuthenticationError for a token it recognises as its own but rejects.
        """
        ...


class TokenFileAuthenticator:
    """Static bearer tokens from a TOML file that holds only their SHA-256 hashes."""

    def __init__(self, entries: dict[bytes, Caller]) -> None:
        self._entries = entries

    @classmethod
    def from_file(cls, path: Path) -> TokenFileAuthenticator:
        with path.open("rb") as file:
            try:
                document = tomllib.load(file)
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"{path}: not valid TOML: {error}") from error
        entries: dict[bytes, Caller] = {}
        for n, token in enumerate(document.get("token", [])):
            where = f"{path}: token[{n}]"
            if not isinstance(token, dict):
                raise ValueError(f"{where} must be a [[token]] table")
            missing = {"sha256", "user_id"} - token.keys()
            if missing:
                raise ValueError(f"{where} needs {' and '.join(sorted(missing))}")
            digest = str(token["sha256"]).lower()
            if re.fullmatch("[0-9a-f]{64}", digest) is None:
                raise ValueError(f"{where}.sha256 is not a hex SHA-256 digest")
            scopes = token.get("scopes", [])
            # A bare string would silently become a set of single characters.
            if not isinstance(scopes, list) or not all(
                isinstance(scope, str) and scope in ALL_SCOPES for scope in scopes
            ):
                known = ", ".join(sorted(ALL_SCOPES))
                raise ValueError(f"{where}.scopes must be a list of {known}")
            entries[bytes.fromhex(digest)] = Caller(
                user_id=str(token["user_id"]), scopes=frozenset(scopes)
            )
        return cls(entries)

    def authenticate(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: Caller | None = None
        # Compare against every entry in constant time, so timing reveals nothing.
        for known, caller in self._entries.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call to a protected method and checks its scopes.

    With no authenticators, every caller is anonymous with all scopes. The guarded
    handler of each method is built once and reused: the credentials are read from each
    call's own metadata when it starts.
    """

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)
        self._guarded = WrappedHandlers(self._guard)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        required = REQUIRED_SCOPES.get(method)
        if handler is None or required is None:
            return handler
        return self._guarded.get(handler, method)

    def _guard(self, handler: Handler, method: str) -> Handler:
        """The handler of the same kind that checks the call's credentials first."""
        required = REQUIRED_SCOPES[method]
        # grpc's stubs type behaviours as synchronous; on an aio server, streaming ones
        # are async generators and unary ones coroutines.
        if handler.unary_unary is not None:
            unary = cast(Callable[[Any, Context], Awaitable[Any]], handler.unary_unary)

            async def single(request: Any, context: Context) -> Any:
                await self._authorise(context, method, required)
                try:
                    return await unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    # The last line of defence: grpcio itself would answer UNKNOWN
                    # with the exception's text.
                    await context.abort_with_status(unexpected_error_status(error))

            return grpc.unary_unary_rpc_method_handler(
                single,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        streaming = handler.unary_stream or handler.stream_stream
        behaviour = cast(Callable[[Any, Context], AsyncIterator[Any]], streaming)

        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            await self._authorise(context, method, required)
            try:
                async for response in behaviour(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await context.abort_with_status(unexpected_error_status(error))

        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _authorise(self, context: Context, method: str, required: frozenset[str]) -> None:
        verdict = self._verdict(context.invocation_metadata() or (), method, required)
        if isinstance(verdict, grpc.Status):
            await context.abort_with_status(verdict)
        assert isinstance(verdict, Caller)
        current_caller.set(verdict)

    def _verdict(
        self, metadata: Iterable[tuple[str, Any]], method: str, required: frozenset[str]
    ) -> Caller | grpc.Status:
        """The authenticated caller, or the status that refuses the call."""
        try:
            caller = self._caller(metadata)
        except AuthenticationError as error:
            # The message never holds the token: authenticators word their own reasons.
            log.info("refused %s: %s", method, error)
            return plain_status(grpc.StatusCode.UNAUTHENTICATED, str(error))
        except Exception:
            # A hostile token must not turn an authenticator's bug into a leaky status.
            log.exception("authentication failed unexpectedly for %s", method)
            return plain_status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        if not caller.scopes & required:
            needed = " or ".join(sorted(required))
            log.info("refused %s to %r: lacks scope %s", method, caller.user_id, needed)
            return plain_status(
                grpc.StatusCode.PERMISSION_DENIED, f"this call needs scope {needed}"
            )
        return caller

    def _caller(self, metadata: Iterable[tuple[str, Any]]) -> Caller:
        if not self._authenticators:
            return ANONYMOUS
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            raise AuthenticationError("missing authorization metadata (Bearer token)")
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("authorization must be 'Bearer <token>'")
        for authenticator in self._authenticators:
            caller = authenticator.authenticate(token.strip())
            if caller is not None:
                return caller
        raise AuthenticationError("unknown bearer token")
