"""A stopping worker waits for the other workers to stop taking connections."""

from __future__ import annotations

import asyncio
import socket

from server.workers.listen_address import until_nobody_listens


async def test_waits_while_another_process_listens_and_returns_once_it_stops() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    waiting = asyncio.create_task(until_nobody_listens(f"127.0.0.1:{port}", port, most=5))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    listener.close()
    async with asyncio.timeout(2):
        assert await waiting


async def test_gives_up_after_its_bound() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert not await until_nobody_listens(f"0.0.0.0:{port}", port, most=0.05)


async def test_a_port_nobody_listens_on_needs_no_wait() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: as the supervisor's is
        port = bound.getsockname()[1]
        async with asyncio.timeout(1):
            assert await until_nobody_listens(f"localhost:{port}", port, most=5)
