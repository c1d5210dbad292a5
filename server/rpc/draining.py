"""Refusing the calls that reach the gateway once it has begun to stop.

grpc's server shutdown cancels every call it has received but not yet handed to the
gateway (they wait in its queue while the event loop is busy): their clients, who sent
them before the stop, would see CANCELLED, a code they have no reason to retry. So a
stop closes this gate first: calls that reach the gateway from then on are refused
UNAVAILABLE ("the server is shutting down"), which clients retry on another replica,
until grpc's queue has emptied (no call for a moment) or a bound has passed; only then
does grpc's own shutdown begin. Calls admitted before the gate closed run to their end.
Health and reflection stay open, so that probes read NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import grpc

from server.rpc.method_handlers import (
    CallScope,
    Context,
    Handler,
    Refusing,
    WrappingInterceptor,
    wrapped,
)
from server.rpc.status_mapping import plain_status
from server.security.scopes import OPEN_SERVICES

QUIET_SECONDS: Final = 0.02
"""A stop's gate waits until no call has come for this long: grpc's queue is empty."""
MOST_SECONDS: Final = 0.5
"""The longest a stop waits for that, while clients keep calling."""

SHUTTING_DOWN: Final = plain_status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")


class StopGate(WrappingInterceptor):
    def __init__(self) -> None:
        self._closed = False
        self._last_refused = 0.0

    def applies_to(self, method: str, handler: Handler) -> bool:
        return not method.startswith(OPEN_SERVICES)

    def wrap(self, handler: Handler, method: str) -> Handler:
        return wrapped(handler, self._around)

    def _around(self, request: Any, context: Context) -> CallScope | None:
        if not self._closed:
            return None
        self._last_refused = time.monotonic()
        return Refusing(context, SHUTTING_DOWN)

    async def close(self, quiet: float = QUIET_SECONDS, most: float = MOST_SECONDS) -> None:
        """Refuse calls from now on; return once none has come for ``quiet`` seconds, or
        after ``most``."""
        self._closed = True
        started = self._last_refused = time.monotonic()
        while True:
            await asyncio.sleep(quiet)
            now = time.monotonic()
            if now - self._last_refused >= quiet or now - started >= most:
                return
