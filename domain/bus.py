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
        self._handlers: dict[type[Command], Handler] = {}
        self._middleware = tuple(middleware)

    def register(self, command_type: type[Command], handler: Handler) -> None:
        if command_type in self._handlers:
            raise HandlerAlreadyRegisteredError(f"{command_type.__name__} already has a handler")
        self._handlers[command_type] = handler

    async def dispatch(self, command: Command) -> Result:
        handler = self._handlers.get(type(command))
        if handler is None:
            raise NoHandlerFoundError(f"no handler for {type(command).__name__}")
        call: Next = handler
        for middleware in reversed(self._middleware):
            call = _bind(middleware, call)
        return await call(command)


def _bind(middleware: Middleware, inner: Next) -> Next:
    async def call(command: Command) -> Result:
        return await middleware(command, inner)

    return call
