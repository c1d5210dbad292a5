"""Where the gateway on SQLite commits a command: on its event loop when the command is
the only one in flight (no batch to gather), through the writer thread's group commit
whenever others are in flight."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

from server.stores.sqlite import SQLiteEventStore
from tests.clients import item, order_request
from tests.conformance.contract import TIMEOUT
from tests.stores.test_sqlite_commit_on_loop import writer_threads
from tests.subscription_support import connect, running_gateway


async def test_a_lone_command_commits_on_the_loop_and_concurrent_ones_group_commit(
    tmp_path: Path,
) -> None:
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    write_threads = writer_threads(store)
    try:
        async with running_gateway(store) as gateway, connect(gateway) as clients:
            alone = store._alone
            await clients.restock("p", 100)
            assert write_threads == [threading.get_ident()]

            write_threads.clear()
            # The write lock held elsewhere keeps all eight in flight at once.
            with closing(sqlite3.connect(tmp_path / "events.db", isolation_level=None)) as other:
                other.execute("BEGIN IMMEDIATE")
                orders = asyncio.gather(
                    *(clients.create(order_request(item("p"))) for _ in range(8))
                )
                await asyncio.sleep(0.3)
                # What the store asks before committing on the loop: not alone now.
                assert alone is not None and not alone()
                other.execute("COMMIT")
            placed = await asyncio.wait_for(orders, TIMEOUT)
            assert alone()
    finally:
        await store.close()

    assert len(placed) == 8
    assert write_threads and threading.get_ident() not in write_threads
    # Batched: fewer transactions than commands (the first may have gone alone).
    assert len(write_threads) < 8
