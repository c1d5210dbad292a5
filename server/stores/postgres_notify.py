"""LISTEN for appends made by any process on the database, other replicas included.

Every append transaction runs ``pg_notify`` with the new head position; PostgreSQL delivers
it at commit to every connection that LISTENs on the channel. A notification is only a
wake-up: whoever is woken re-reads ``read_all``. A notification can still be lost (while
the connection is down, or if PostgreSQL's queue overflows), which is why the subscription
side also polls the store on a timer: a lost notification only delays delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from server.stores.postgres_schema import HEAD_POSITION, NOTIFY_CHANNEL, TURNS_CHANNEL

log = logging.getLogger("order_gateway.store.postgres")

HEALTH_CHECK_INTERVAL = 30.0
"""Seconds without a notification after which the connection is probed, so that a silently
dead connection (a network partition sends no reset) is noticed and replaced."""
MIN_RECONNECT_DELAY = 0.1
MAX_RECONNECT_DELAY = 5.0


class NotificationListener:
    """A task holding one dedicated connection that LISTENs, reconnecting on failure.

    ``on_turns(stream_id)`` runs for every notification that a replica takes turns at a
    stream (``TURNS_CHANNEL``).

    ``on_wake(head)`` runs on the event loop for every notification (``head`` is the
    notified position, or None when unknown) and after each (re)connection with the head
    position then, because appends may have committed while nobody was listening.
    """

    def __init__(
        self,
        conninfo: str,
        connect_kwargs: Mapping[str, Any],
        on_wake: Callable[[int | None], None],
        on_turns: Callable[[str], None] = lambda stream_id: None,
    ) -> None:
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        self._on_wake = on_wake
        self._on_turns = on_turns
        self._task: asyncio.Task[None] | None = None
        self._listening = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="order-gateway postgres LISTEN"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = MIN_RECONNECT_DELAY
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError, TimeoutError) as error:
                if self._listening:
                    self._listening = False
                    delay = MIN_RECONNECT_DELAY
                log.warning(
                    "LISTEN connection to PostgreSQL failed (%s); reconnecting in %.1f s",
                    str(error).strip() or type(error).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._connect_kwargs
        )
        async with conn:
            for channel in (NOTIFY_CHANNEL, TURNS_CHANNEL):
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._listening = True
            cursor = await conn.execute(HEAD_POSITION)
            row = await cursor.fetchone()
            self._on_wake(int(row[0]) if row else None)
            while True:
                async for notify in conn.notifies(timeout=HEALTH_CHECK_INTERVAL):
                    if notify.channel == TURNS_CHANNEL:
                        self._on_turns(notify.payload)
                    else:
                        self._on_wake(_head_of(notify.payload))
                await asyncio.wait_for(conn.execute("SELECT 1"), HEALTH_CHECK_INTERVAL)


def _head_of(payload: str) -> int | None:
    try:
        return int(payload)
    except ValueError:
        return None
