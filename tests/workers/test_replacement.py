"""The supervisor replaces a dead worker even when the system refuses a spawn for a while."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from multiprocessing.connection import Connection
from typing import cast

import pytest

from domain.errors import StoreUnavailableError
from server.config import Settings
from server.workers import supervisor as supervising
from server.workers import worker as working
from server.workers.supervisor import Supervisor
from server.workers.worker import WorkerSpec


class _DyingSlot:
    """Stands in for a worker slot: its worker dies at once; its first replacement's spawn
    fails as fork does with no process to spare (EAGAIN), the next one serves."""

    def __init__(self) -> None:
        self.spec = type("Spec", (), {"index": 1})()
        self.started_at = time.monotonic() - 60
        self.replica_id = None
        self.pid = 4242
        self.metrics_port = None
        self.starts = 0
        self.served = asyncio.Event()

    async def exited(self) -> int:
        if self.served.is_set():
            await asyncio.Event().wait()
        return -9

    async def start(self, stopping: asyncio.Event) -> bool:
        self.starts += 1
        if self.starts == 1:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.served.set()
        return True


async def test_a_refused_spawn_is_tried_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The slot's keeper task ended at the first failed spawn: the gateway ran one worker
    # short from then on, and said nothing of it.
    monkeypatch.setattr(supervising, "RESTART_DELAY_SECONDS", 0.05)
    supervisor = Supervisor(Settings(store="sqlite:///x.db"), [], asyncio.Event())
    slot = _DyingSlot()
    with caplog.at_level(logging.INFO, logger="order_gateway.workers"):
        keeper = asyncio.create_task(supervisor._keep(slot))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(10):
                await slot.served.wait()
        finally:
            keeper.cancel()
    assert slot.starts == 2
    messages = [record.getMessage() for record in caplog.records]
    assert any("could not start a replacement for worker 1" in m for m in messages), messages
    assert any("worker 1 replaced" in m for m in messages), messages


def test_a_worker_that_cannot_reach_its_store_says_so_in_one_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker replaced while the database is down fails at start, and is tried again
    # every second or so: with a traceback each time, 34 of them in 25 s buried the line.
    async def unreachable(*_: object) -> None:
        raise StoreUnavailableError("PostgreSQL is unavailable (connect): Connection refused")

    monkeypatch.setattr(working, "_serve", unreachable)
    monkeypatch.setattr(working, "configure_logging", lambda *_, **__: None)
    # Not in this test process: a worker ignores the terminal's Ctrl-C and hang-up.
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    spec = WorkerSpec(Settings(), 1, "/nonexistent/hub.sock", groups_via_hub=False)
    with (
        caplog.at_level(logging.INFO, logger="order_gateway.workers"),
        pytest.raises(SystemExit) as exited,
    ):
        working.run_worker(spec, cast(Connection, None), cast(Connection, None))
    assert exited.value.code == 1
    (line,) = [r for r in caplog.records if "worker 1 failed" in r.getMessage()]
    assert line.getMessage() == (
        "worker 1 failed: store error: PostgreSQL is unavailable (connect): Connection refused"
    )
    assert line.exc_info is None
