"""Ctrl-C for the commands that run on asyncio until done (``verify``, ``migrate``): the
first one cancels the command, and any more are ignored while it unwinds.

``asyncio.run`` cancels its coroutine on a first Ctrl-C and raises KeyboardInterrupt
wherever the main thread is on a second. ``timeout -s INT`` sends two (to the command
and to its process group), and so does a person pressing twice: on PostgreSQL the second
landed inside psycopg's cancellation of a query under way, which then logged "query
cancellation interrupted (KeyboardInterrupt): closing connection" and dropped the
pool's connections (verify: 7 runs in 81 of two SIGINTs 10-200 ms apart).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, ended by a first Ctrl-C with KeyboardInterrupt once ``main``
    has unwound (what ``asyncio.run`` raises for it), later ones ignored."""
    # Where asyncio.run would handle Ctrl-C itself (the main thread, SIGINT's handler
    # Python's default); elsewhere (a thread calling the CLI) it is left alone.
    handles = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    return asyncio.run(_cancelled_by_a_first_ctrl_c(main) if handles else main)


async def _cancelled_by_a_first_ctrl_c(main: Coroutine[Any, Any, T]) -> T:
    task = asyncio.current_task()
    assert task is not None
    pressed = False

    def interrupt() -> None:
        nonlocal pressed
        if not pressed:
            pressed = True
            task.cancel()

    # Replaces asyncio.run's own handler for as long as the loop runs: the loop, closed,
    # puts SIGINT's default handler back.
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await main
    except asyncio.CancelledError:
        if pressed:
            raise KeyboardInterrupt from None
        raise
