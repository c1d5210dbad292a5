"""Refusing the calls that reach the gateway once it has begun to stop.

grpc's server shutdown cancels every call it has received but not yet handed to the
gateway (they wait in its queue while the event loop is busy), and every call that
arrives on a connection before the connection learns of the shutdown: their clients
would see CANCELLED, a code they have no reason to retry. So a stop closes this gate
first. Calls that reach the gateway from then on are held, not answered, until grpc's
own shutdown has begun, then refused UNAVAILABLE ("the server is shutting down"),
which clients retry on another replica. Holding them is what empties grpc's queue: a
client that retries each refusal at once (many do, after a short backoff) would
otherwise keep it filled, while a held call, matched to the gateway and in flight, is
one grpc's shutdown waits for rather than cancels. The gate waits until no call has
come for a moment (every caller's call held), or a bound has passed; a held call is
answered before its own deadline. Calls admitted before the gate closed run to their
end. Health and reflection stay open, so that probes read NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

import grpc

from server.rpc.method_handlers import (
    CallScope,
    Context,
    Handler,
    Refusing,
    WrappingInterceptor,
    wait_before_refusal,
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
        self._last_arrival = 0.0
        self._released = asyncio.Event()
        self._idle: Callable[[], bool] = lambda: True

    def quiet_only_when(self, idle: Callable[[], bool]) -> None:
        """Count a moment without new calls as quiet only while ``idle()``: while the
        calls admitted before the gate closed are still served, their clients have not
        called again yet, and will as soon as they are answered."""
        self._idle = idle

    def applies_to(self, method: str, handler: Handler) -> bool:
        return not method.startswith(OPEN_SERVICES)

    def wrap(self, handler: Handler, method: str) -> Handler:
        return wrapped(handler, self._around)

    def _around(self, request: Any, context: Context) -> CallScope | None:
        if not self._closed:
            return None
        if self._released.is_set():
            return Refusing(context, SHUTTING_DOWN)
        self._last_arrival = time.monotonic()
        return _Held(context, self._released)

    async def close(self, quiet: float = QUIET_SECONDS, most: float = MOST_SECONDS) -> None:
        """Hold calls from now on; return once none has come for ``quiet`` seconds, or
        after ``most``. Then begin grpc's shutdown, and ``release`` the held calls."""
        self._closed = True
        started = self._last_arrival = time.monotonic()
        while True:
            slept_from = time.monotonic()
            await asyncio.sleep(quiet)
            now = time.monotonic()
            # A loop held up (by calls admitted before the gate closed, or by a machine
            # short of CPU) cannot have handed grpc's queued calls to the gate: its quiet
            # does not count.
            held_up = now - slept_from > 2 * quiet
            quiet_now = not held_up and now - self._last_arrival >= quiet and self._idle()
            if quiet_now or now - started >= most:
                return

    def release(self) -> None:
        """Refuse the held calls, and any that still come, UNAVAILABLE."""
        self._released.set()


class _Held(CallScope):
    """Refuses the call once the gate is released, or before its deadline
    (``wait_before_refusal``)."""

    __slots__ = ("_context", "_released")

    def __init__(self, context: Context, released: asyncio.Event) -> None:
        self._context = context
        self._released = released

    async def start(self) -> None:
        # asyncio.timeout, not wait_for: see server.cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_before_refusal(self._context)):
                await self._released.wait()
        await self._context.abort_with_status(SHUTTING_DOWN)
