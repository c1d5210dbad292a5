"""The supervisor's stop of its workers: a worker exits by itself at its own stop
deadline, and the supervisor kills only one that is still running after that."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import pytest

from server.app import STOP_DEADLINE_SECONDS, stop_deadline
from server.config import Settings
from server.workers import worker as working
from server.workers.supervisor import Supervisor, kill_deadline
from server.workers.worker import WorkerSpec

WAIT = 60.0
"""Bound for a stand-in worker's start (a loaded machine spawns interpreters slowly)."""

LATE = 0.2
"""How long after the SIGTERM the stand-in's event loop takes it: a real worker's loop
takes it after the callbacks already queued, more of them the busier the worker."""


def _stuck_worker(ready: Connection, deadline: float | None) -> None:
    """A worker whose stop never finishes: with a ``deadline`` it exits by itself then, as
    a real one does (``worker._bound``), counted from when its loop takes the SIGTERM
    (``LATE``); without one it ignores the SIGTERM and runs on, as one the kernel holds
    up."""
    asyncio.run(_stuck(ready, deadline))


async def _stuck(ready: Connection, deadline: float | None) -> None:
    stop = asyncio.Event()
    if deadline is None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, loop.call_later, LATE, stop.set)
    ready.send(True)
    ready.close()
    if deadline is not None:
        await working._bound(stop, deadline, 1)
    await asyncio.Event().wait()


async def _supervisor_with(settings: Settings, deadline: float | None) -> Supervisor:
    """A supervisor of one stand-in worker, which serves once this returns."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_stuck_worker, args=(sender, deadline))
    process.start()
    sender.close()
    try:
        started = await asyncio.to_thread(receiver.poll, WAIT)
    finally:
        receiver.close()
    if not started:
        process.kill()
        process.join()
        raise AssertionError("the stand-in worker did not start")
    spec = WorkerSpec(settings, 1, "/nonexistent/hub.sock", groups_via_hub=False)
    supervisor = Supervisor(settings, [spec], asyncio.Event())
    supervisor._slots[0].process = process
    return supervisor


async def _timed_stop(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> tuple[BaseProcess, float]:
    """The supervisor's stop of its one worker: the worker, and how long the stop took."""
    process = supervisor._slots[0].process
    assert process is not None
    with caplog.at_level(logging.INFO, logger="order_gateway.workers"):
        started = time.monotonic()
        await supervisor._stop_all()
    return process, time.monotonic() - started


def _kills(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "killing it" in r.getMessage()]


async def test_a_worker_that_exits_at_its_own_deadline_is_not_killed(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    # Its stop hangs until its deadline (2 s with no grace), when it exits by itself. The
    # supervisor used to kill it at that same deadline, counted from a little earlier:
    # the kill mostly won the race (4 runs in 5 even with the SIGTERM taken at once), and
    # the stop logged the worker's error and the supervisor's for it.
    settings = Settings(store="sqlite:///x.db", shutdown_grace=0)
    supervisor = await _supervisor_with(settings, stop_deadline(settings))
    process, took = await _timed_stop(supervisor, caplog)
    assert process.exitcode == 1, "killed, not exited by itself"
    assert _kills(caplog) == []
    assert stop_deadline(settings) <= took < kill_deadline(settings)
    errors = [line for line in capfd.readouterr().err.splitlines() if "did not stop" in line]
    assert errors == ["worker 1 did not stop within 2 s; exiting now"]


async def test_a_worker_that_never_exits_is_killed_within_10_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # However long the grace, the worker's own deadline is 9 s; past it, and a margin,
    # the supervisor kills it, and the stop still ends within the 10 s promised.
    settings = Settings(store="sqlite:///x.db", shutdown_grace=3600)
    assert stop_deadline(settings) == STOP_DEADLINE_SECONDS
    supervisor = await _supervisor_with(settings, None)
    process, took = await _timed_stop(supervisor, caplog)
    assert process.exitcode == -signal.SIGKILL
    assert _kills(caplog) == [f"worker pid {process.pid} did not stop in 9.5 s; killing it"]
    assert STOP_DEADLINE_SECONDS < kill_deadline(settings) <= took < 10
