"""``server.interrupted_once``: the first Ctrl-C cancels an asyncio command, later ones
are ignored while it unwinds, and it ends with KeyboardInterrupt as ``asyncio.run``'s do."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from server import interrupted_once


@pytest.fixture(autouse=True)
def python_s_own_ctrl_c_handler() -> Iterator[None]:
    """SIGINT's handler as a command starts with it: Python's default (an event loop of
    another test in this process may have left its own)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


async def unwinding_slowly(cleanups: list[str]) -> None:
    """Waits until cancelled, then cleans up for a while (a query cancelled on the
    server), with two Ctrl-Cs pressed: one to stop it, one while it cleans up."""
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(0.2)
        except BaseException:
            cleanups.append("interrupted")
            raise
        cleanups.append("done")
        raise


def test_a_second_ctrl_c_does_not_interrupt_the_first_one_s_unwinding() -> None:
    cleanups: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        interrupted_once.run(unwinding_slowly(cleanups))
    assert cleanups == ["done"]
    # Under asyncio.run's own handler, the second Ctrl-C's KeyboardInterrupt cut the
    # cleanup short.
    cleanups.clear()
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(unwinding_slowly(cleanups))
    assert "done" not in cleanups


def test_a_command_not_interrupted_returns_its_result_and_its_own_errors() -> None:
    async def answer() -> int:
        return 42

    async def fails() -> None:
        raise ValueError("its own")

    assert interrupted_once.run(answer()) == 42
    with pytest.raises(ValueError, match="its own"):
        interrupted_once.run(fails())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_command_run_from_another_thread_leaves_ctrl_c_to_the_main_one() -> None:
    # A thread cannot take signals: asyncio.run leaves Ctrl-C alone there, and so does this.
    async def answer() -> int:
        return 7

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(interrupted_once.run, answer()).result() == 7
