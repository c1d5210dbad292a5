"""The event loop a serving process runs on: uvloop's by default, or asyncio's own.

uvloop (libuv under asyncio's interface) does a turn of the loop in C where asyncio's
default loop does it in Python. Every call of the gateway takes several turns (grpc's
completion queue wakes the loop through a socket, each response awaits its write), so the
loop is a large share of a call's work: counted by callgrind at one caller, a CreateOrder
on SQLite executed 1.28 million instructions on uvloop against 1.58 million on asyncio's
loop, and at 16 concurrent the server spent about 9 % less CPU per call. asyncio's loop
stays a setting (``ORDER_GATEWAY_EVENT_LOOP=asyncio``) for a platform uvloop does not
support, or to tell whether a problem comes from the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from domain.errors import ConfigurationError

EventLoopName = Literal["uvloop", "asyncio"]

T = TypeVar("T")


def loop_factory(name: EventLoopName) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop ``name`` (None: asyncio's default)."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigurationError(
            "event_loop uvloop: uvloop is not installed on this platform; install it, or "
            "set ORDER_GATEWAY_EVENT_LOOP=asyncio"
        ) from None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], name: EventLoopName) -> T:
    """``main`` run to its end on a new loop ``name``, as ``asyncio.run`` runs it (a
    SIGINT cancels it; the loop's async generators and executor are shut down after)."""
    try:
        factory = loop_factory(name)
    except ConfigurationError:
        main.close()  # Never to run: no warning that it was never awaited.
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> EventLoopName:
    """The kind of loop this coroutine runs on, for the log line that says where the
    gateway serves."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"
