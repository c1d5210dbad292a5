"""Cancellations that a library lost on the way.

On Python 3.11, ``asyncio.wait_for`` returns normally when the wait it guards ends at the
moment its task is cancelled: the cancellation is lost (fixed in 3.12, where ``wait_for``
is built on ``asyncio.timeout``). psycopg_pool waits for a free connection that way, so a
task cancelled just as it was handed a connection goes on as if nothing had been asked. A
loop that then waits for its next turn would wait for ever for a stop that came already,
and whoever awaits the task after cancelling it, with it.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task has been asked to stop (``cancel``)
    and the request was not delivered, or delivered and lost. Called by long-lived loops
    before they wait."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
