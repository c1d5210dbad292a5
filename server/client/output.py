"""The standard output of the command-line tools: what happens when it cannot be written."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class UnwritableOutputError(OSError):
    """Writing the command's standard output failed: its reader went away, or the file
    cannot take more (a full disk). An OSError, as the failure it wraps."""


class _GuardedOutput:
    """``stream``, its write failures raised as ``UnwritableOutputError``: told apart from
    any other OSError a command meets (a file it cannot read is a usage error)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise UnwritableOutputError(error.errno, error.strerror) from error

    def flush(self) -> None:
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
    # Python would report the failed flush of stdout again at exit (and exit 120).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    cause = error.__cause__ if isinstance(error, UnwritableOutputError) else error
    if isinstance(cause, BrokenPipeError):
        return 0
    print(f"{program}: cannot write {what}: {error.strerror or error}", file=sys.stderr)
    return 1
