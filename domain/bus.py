"""The command bus: routes each command to exactly one handler, through a middleware chain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from domain.commands import Command
from domain.errors import HandlerAlreadyRegisteredError, NoHandlerFoundError
from domain.ports import RecordedEvent

Result = list[RecordedEvent]
Handler = Callable[[Any], Awaitable[Result]]
"""Takes one command of the type it is registered for; returns the committed events."""
Next = Callable[[Command], Awaitable[Result]]
Middleware = Callable[[Command, Next], Awaitable[Result]]
"""Wraps dispatch: may act before and after calling ``next`` (or not call it at all)."""


class CommandBus:
    """Dispatches a command to the handler registered for its exact type.

    Middleware runs outermost first, in the order given.
    """

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        self._chains: dict[type[Command], Next] = {}
        self._middleware = tuple(middleware)

    def register(self, command_type: type[Command], handler: Handler) -> None:
        if command_type in self._chains:
            raise HandlerAlreadyRegisteredError(f"{command_type.__name__} already has a handler")
        # The chain is built once per command type, not on every dispatch.
        call: Next = handler
        for middleware in reversed(self._middleware):
            call = _bind(middleware, call)
        self._chains[command_type] = call

    async def dispatch(self, command: Command) -> Result:
        chain = self._chains.get(type(command))
        if chain is None:
            raise NoHandlerFoundError(f"no handler for {type(command).__name__}")
        return await chain(command)


def _bind(middleware: Middleware, inner: Next) -> Next:
    # A plain function returning the middleware's awaitable: no coroutine of its own,
    # so each layer of the chain costs one call, not a coroutine to create and await.
    def call(command: Command) -> Awaitable[Result]:
        return middleware(command, inner)

    return call
