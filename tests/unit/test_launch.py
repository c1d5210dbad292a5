"""The command's entry point holds SIGTERM and SIGINT while it starts: ``serve`` takes a
held signal as a stop (tests/e2e/test_early_stop.py); the other commands act on it as the
signal's default action would have."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from tests.serving import hangup_for_children

HOLD_THEN_RELEASE = """
import os, signal, sys
from server import launch
launch.hold_signals()
os.kill(os.getpid(), signal.{name})
print("held", launch.held_signal([signal.{name}]) is not None, flush=True)
launch.release_signals({release_args})
print("released", flush=True)
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_signal_held_while_starting_acts_as_its_default_once_released(
    signum: signal.Signals,
) -> None:
    with hangup_for_children(signal.SIG_DFL):
        done = subprocess.run(
            [sys.executable, "-c", HOLD_THEN_RELEASE.format(name=signum.name, release_args="")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.stdout == "held True\n"
    assert done.returncode == -signum
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("signum", "returncode"),
    [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)],
    ids=["SIGINT", "SIGTERM"],
)
def test_tail_and_consume_end_with_status_0_on_a_ctrl_c_held_while_starting(
    signum: signal.Signals, returncode: int
) -> None:
    # Their Ctrl-C exits 0 once they run; one pressed during their imports does so too.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            HOLD_THEN_RELEASE.format(name=signum.name, release_args="interrupt_exits_zero=True"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (returncode, "held True\n")
    assert "Traceback" not in done.stderr


SIGNAL_AS_HANDLERS_ARE_SWAPPED = """
import os, signal
from server import launch
launch.hold_signals()
swap = signal.signal
def swapping(signum, handler):
    if signum == signal.SIGINT and handler is signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C just as SIGINT's handler is swapped
    return swap(signum, handler)
signal.signal = swapping
launch.release_signals()
print("released", flush=True)
"""


def test_a_ctrl_c_that_comes_as_the_handlers_are_swapped_still_ends_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_AS_HANDLERS_ARE_SWAPPED],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (-signal.SIGINT, "")
    assert "Traceback" not in done.stderr


def test_without_a_held_signal_release_gives_the_default_actions_back() -> None:
    script = (
        "import signal\n"
        "from server import launch\n"
        "launch.hold_signals()\n"
        "launch.release_signals()\n"
        "print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,"
        " signal.getsignal(signal.SIGINT) is signal.default_int_handler,"
        " signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)\n"
    )
    with hangup_for_children(signal.SIG_DFL):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
    assert done.stdout == "True True True\n", done.stderr
    assert done.returncode == 0


def test_ctrl_c_during_a_command_ends_it_without_a_traceback() -> None:
    # A gateway that takes the connection and never answers: `health` waits on it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        command = subprocess.Popen(
            [sys.executable, "-m", "server", "health", "--target", f"127.0.0.1:{port}",
             "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        silent.settimeout(60)
        connection, _ = silent.accept()  # The command runs, waiting for its answer.
        with connection:
            command.send_signal(signal.SIGINT)
            _, stderr = command.communicate(timeout=30)
    assert command.returncode == -signal.SIGINT
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
