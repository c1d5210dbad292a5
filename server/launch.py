"""The ``order-gateway`` command's entry point: SIGTERM, SIGINT and SIGHUP are held from
its first line, before the second or so its imports take (what comes before, Python's own
start, leaves the signals their default actions).

Without this, a stop asked for while the command still imported its modules (a container
stopped as it starts, a supervisor's restart) met Python's default action: killed by
SIGTERM (status 143), or a KeyboardInterrupt traceback for SIGINT. ``serve`` takes over
a signal held here as a request to stop (``server.app.stop_on_signals``) and stops
gracefully, exit 0, as it does for one that comes later; every other command gives the
default actions back before it runs, and a signal held meanwhile acts then (a Ctrl-C held
for ``tail`` or ``consume`` ends them with status 0, as one that comes later). A Ctrl-C
that interrupts such a command ends it as SIGINT's default action would, without a
traceback.

SIGHUP (the terminal that started ``serve`` closed) stops it as SIGTERM does, unless the
command was started with SIGHUP ignored (``nohup``): it then stays ignored.

Only ``signal`` is imported here, so that the handlers are in place before anything slow.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

HELD_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
"""SIGTERM last: Python catches SIGINT from its start, so a process that catches SIGTERM
holds them all."""

_held: list[signal.Signals] = []
"""The signals that came while held, first first."""

_holding = False
_hangup_ignored: bool | None = None
"""Whether the command started with SIGHUP ignored (None: not started by ``main``)."""


def main(argv: Sequence[str] | None = None) -> int:
    hold_signals()
    from server.cli import main as run

    try:
        return run(argv)
    except KeyboardInterrupt:
        # Ctrl-C during a command that gave SIGINT back (health, verify, backup…): what it
        # was doing has been unwound (a backup's unfinished copy removed). The process ends
        # as SIGINT's default action would have ended it, without Python's traceback.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
        raise  # Not reached: the default action ends the process.


def hold_signals() -> None:
    """Note SIGTERM, SIGINT and SIGHUP (unless ignored) instead of acting on them, until
    ``held_signal`` or ``release_signals`` is asked."""
    global _holding, _hangup_ignored
    _holding = True
    _hangup_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    for signum in HELD_SIGNALS:
        if signum != signal.SIGHUP or not _hangup_ignored:
            signal.signal(signum, _note)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop ``serve``: SIGTERM, SIGINT, and SIGHUP unless it was ignored
    when the command started."""
    ignored = (
        _hangup_ignored
        if _hangup_ignored is not None
        else signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    )
    return (
        (signal.SIGTERM, signal.SIGINT)
        if ignored
        else (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    )


def _note(signum: int, frame: FrameType | None) -> None:
    _held.append(signal.Signals(signum))


def held_signal(among: Sequence[signal.Signals]) -> signal.Signals | None:
    """The first of ``among`` that came while held, if any."""
    return next((signum for signum in _held if signum in among), None)


def release_signals(interrupt_exits_zero: bool = False) -> None:
    """Give the held signals their default actions back (when held), and act on the
    first that came meanwhile as they would have then; with ``interrupt_exits_zero``, a
    SIGINT that came first ends the command with status 0 instead (``tail`` and
    ``consume``, which a Ctrl-C stops with status 0 once they run)."""
    global _holding
    if not _holding:
        return  # Not started by ``main`` (a test calling the CLI): nothing was changed.
    _holding = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _hangup_ignored:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Looked at once every handler is swapped: ``signal.signal`` runs the handlers of
    # signals pending when it is called, before it installs the new one, so a Ctrl-C that
    # came as SIGINT's was swapped was noted here then, and would otherwise be lost.
    if _held:
        if interrupt_exits_zero and _held[0] == signal.SIGINT:
            # A Ctrl-C pressed while the command still imported its modules stops it as
            # one pressed a moment later would: status 0, no message.
            raise SystemExit(0)
        # Ends the process as the signal would have (no KeyboardInterrupt traceback).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(_held[0])
