"""The LISTEN connection's reconnects, as its log shows them (no PostgreSQL needed)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.stores.postgres_notify import NotificationListener
from tests.serving import free_port


async def test_a_failed_listen_connection_is_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """libpq puts its hint on a line of its own ("\\tIs the server running…"): a text log
    read line by line would take it for another entry."""
    logged = asyncio.Event()

    class Noticing(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.set()

    url = f"postgresql://gateway@127.0.0.1:{free_port()}/orders"
    listener = NotificationListener(url, {"connect_timeout": 2}, on_wake=lambda head: None)
    noticing = Noticing()
    logging.getLogger("order_gateway.store.postgres").addHandler(noticing)
    listener.start()
    try:
        async with asyncio.timeout(10):
            await logged.wait()
    finally:
        await listener.stop()
        logging.getLogger("order_gateway.store.postgres").removeHandler(noticing)
    failed = caplog.messages[0]
    assert failed.startswith("LISTEN connection to PostgreSQL failed (")
    assert "Connection refused" in failed
    assert "\n" not in failed
    assert failed.endswith("); reconnecting in 0.1 s")
