"""The standard output of the command-line tools: what happens when it cannot be written."""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class UnwritableOutputError(OSError):
    """Writing the command's standard output failed: its reader went away, or the file
    cannot take more (a full disk). An OSError, as the failure it wraps."""


class _GuardedOutput:
    """``stream``, its write failures raised as ``UnwritableOutputError``: told apart from
    any other OSError a command meets (a file it cannot read is a usage error)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if self._stream is None:
            # Started with its standard output closed (``>&-``): Python gives no stream.
            raise UnwritableOutputError(errno.EBADF, "the standard output is closed")
        try:
            return self._stream.write(text)
        except OSError as error:
            raise UnwritableOutputError(error.errno, error.strerror) from error

    def flush(self) -> None:
        if self._stream is None:
            return  # Nothing was written: a write would have failed first.
        try:
            self._stream.flush()
        except OSError as error:
            raise UnwritableOutputError(error.errno, error.strerror) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def guarded_stdout() -> Iterator[None]:
    """Standard output guarded for what runs inside, and flushed before it ends, so that a
    failure to write it is raised here, not reported by Python at exit."""
    stream = sys.stdout
    sys.stdout = _GuardedOutput(stream)
    try:
        yield
        sys.stdout.flush()
    finally:
        sys.stdout = stream


def unwritable_output(program: str, error: OSError, what: str = "the events") -> int:
    """The exit status of a command whose stdout failed with ``error``: 0 when its reader
    went away (stop quietly, like other line tools, as after `| head`), else 1."""
    # Python would report the failed flush of stdout again at exit (and exit 120); with
    # no standard output at all (closed when the command started) it flushes nothing.
    try:
        descriptor = sys.stdout.fileno()
    except AttributeError:
        descriptor = None
    if descriptor is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), descriptor)
    cause = error.__cause__ if isinstance(error, UnwritableOutputError) else error
    if isinstance(cause, BrokenPipeError):
        return 0
    print(f"{program}: cannot write {what}: {error.strerror or error}", file=sys.stderr)
    return 1


def closed_output(program: str) -> int | None:
    """The exit status of a command that follows a stream when it was started with its
    standard output closed (``>&-``), None when that is open. Its first write would fail,
    but it writes only when an event comes: it would wait for one without end on a quiet
    stream, and a consumer would meanwhile hold partitions that members able to write
    could serve."""
    stream = sys.stdout
    if stream is None or (isinstance(stream, _GuardedOutput) and stream._stream is None):
        closed = UnwritableOutputError(errno.EBADF, "the standard output is closed")
        return unwritable_output(program, closed)
    return None


class ReaderGone:
    """Whether the reader of an output pipe went away, told as soon as it does.

    A command that follows a stream writes only when an event comes, and learns that its
    reader went away (``| head``) only at that write: on a quiet stream, never. A pipe's
    write end reports an error to ``poll`` once its last reader is gone, so a thread
    waits for that and runs ``then`` (cancelling the call); the command then stops as if
    its write had failed (``reader_gone_error``). Outputs other than pipes are not watched.
    """

    def __init__(self, stream: TextIO, then: Callable[[], object]) -> None:
        self._gone = threading.Event()
        try:
            descriptor = stream.fileno()
            is_pipe = stat.S_ISFIFO(os.fstat(descriptor).st_mode)
        except (AttributeError, OSError, ValueError):
            return
        if is_pipe:
            threading.Thread(
                target=self._watch, args=(descriptor, then), name="output-reader", daemon=True
            ).start()

    def _watch(self, descriptor: int, then: Callable[[], object]) -> None:
        poller = select.poll()
        # No event asked for: poll reports an error or a hang-up whatever the mask.
        poller.register(descriptor, 0)
        while True:
            for _, events in poller.poll():
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._gone.set()
                    then()
                    return

    def __bool__(self) -> bool:
        return self._gone.is_set()


def reader_gone_error() -> BrokenPipeError:
    """What a write to the pipe would have raised: ``unwritable_output`` stops with 0."""
    return BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
