"""Ctrl-C for the stream commands (``tail``, ``consume``): a request to stop, never a
KeyboardInterrupt raised wherever the main thread happens to be.

Python's default SIGINT handler raises KeyboardInterrupt at the next bytecode the main
thread runs, which for a stream command is most often inside grpc's own client code:
creating the call, closing the channel, waiting on a call's ``threading.Condition``.
Raised there, it can leave one of grpc's locks held, or a condition's lock half taken
back (``RuntimeError: cannot release un-acquired lock``), and the channel's or the
call's closing then waits for that lock for good: ``timeout -s INT 0.3 order-gateway
tail`` never exited in 9 of 60 runs. So while a stream command runs, SIGINT's handler
only notes the Ctrl-C; a thread of this module's, started before any grpc object exists,
then cancels the command's call from outside, as grpc allows from any thread, and the
command ends where grpc reports the cancelled call, with its locks released.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class CtrlC:
    """Whether Ctrl-C was pressed, and what to stop when it is.

    The handler takes no lock: it runs in the main thread, between any two of its
    bytecodes, and a second Ctrl-C (``timeout -s INT`` signals the command and its
    process group: two) runs it again inside the first. So it sets a flag and writes a
    byte to a pipe, which wakes the thread that stops the call.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._closing = False
        self._stop: Callable[[], object] | None = None
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stopper = threading.Thread(target=self._stop_once_pressed, daemon=True)

    def stops(self, stop: Callable[[], object]) -> None:
        """Call ``stop`` (from another thread) on Ctrl-C; at once, if it was pressed."""
        self._stop = stop
        if self.pressed:
            stop()

    def _pressed(self, signum: int, frame: FrameType | None) -> None:
        self.pressed = True
        self._wake()

    def _wake(self) -> None:
        # A pipe full of wake-ups: the stopper has one to read already.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")

    def _stop_once_pressed(self) -> None:
        os.read(self._wake_read, 1)
        stop = self._stop
        if not self._closing and stop is not None:
            stop()

    def _start(self) -> None:
        self._stopper.start()

    def _close(self) -> None:
        self._closing = True
        self._wake()
        self._stopper.join()
        os.close(self._wake_read)
        os.close(self._wake_write)


@contextmanager
def ctrl_c_stops() -> Iterator[CtrlC]:
    """Within it, Ctrl-C sets ``pressed`` and calls what was given to ``stops``. SIGINT's
    handler is put back after, unless Ctrl-C was pressed: the command is stopping, and a
    second SIGINT (``timeout -s INT`` sends two: to the command and to its process group)
    is ignored rather than ending the process with SIGINT's status, 130, while it exits.
    In a thread other than the main one (which signals never reach), nothing is
    changed."""
    ctrl_c = CtrlC()
    if threading.current_thread() is not threading.main_thread():
        try:
            yield ctrl_c
        finally:
            os.close(ctrl_c._wake_read)
            os.close(ctrl_c._wake_write)
        return
    ctrl_c._start()
    previous = signal.signal(signal.SIGINT, ctrl_c._pressed)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN if ctrl_c.pressed else previous)
        ctrl_c._close()
