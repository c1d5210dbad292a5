"""Helpers for tests that run the gateway as a separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


_logs: weakref.WeakKeyDictionary[subprocess.Popen[bytes], IO[bytes]] = weakref.WeakKeyDictionary()


@contextmanager
def listening_stranger() -> Iterator[str]:
    """A loopback address another process's socket listens on, as ``host:port``."""
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        yield f"127.0.0.1:{stranger.getsockname()[1]}"


def start_gateway(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    hangup: str = "inherited",
    open_files: int | None = None,
) -> subprocess.Popen[bytes]:
    """``order-gateway <args>`` as a child process.

    Its log goes to an unnamed temporary file, not a pipe: the gateway logs a line per
    RPC, and a pipe nobody drains fills up and blocks the server mid-test. ``hangup``:
    SIGHUP's action in the child, ``"default"`` or ``"ignored"`` (as under ``nohup``),
    else the test run's own. ``open_files``: the child's soft limit on open files (set by
    the shell that execs it, for the reason ``hangup_for_children`` gives).
    """
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
    action = {"default": signal.SIG_DFL, "ignored": signal.SIG_IGN}.get(hangup)
    command = [sys.executable, "-m", "server", *args]
    if open_files is not None:
        command = ["bash", "-c", f'ulimit -S -n {open_files} && exec "$@"', "bash", *command]
    with hangup_for_children(action):
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    _logs[process] = log
    return process


@contextmanager
def hangup_for_children(action: signal.Handlers | None) -> Iterator[None]:
    """Children started inside the block start with SIGHUP's ``action`` (None: leave
    this process's own).

    A child inherits the action (an ignored signal stays ignored through exec), so this
    process takes it for as long as the block lasts. Not a ``preexec_fn``: Python code
    run in the forked child runs grpc's fork handlers there, and with grpc's threads
    busy in this process the child aborted now and then (epoll_wait: Bad file
    descriptor) before it could exec.
    """
    if action is None:
        yield
        return
    before = signal.signal(signal.SIGHUP, action)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


def gateway_log(process: subprocess.Popen[bytes]) -> str:
    """What the gateway started by ``start_gateway`` has logged so far."""
    log = _logs.get(process)
    if log is None:
        return ""
    # pread, not seek(0) and read(): the gateway's stderr shares this file's offset, so a
    # line it wrote between the two would go to offset 0, over the first lines of the log.
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


async def wait_until_serving(
    target: str, process: subprocess.Popen[bytes], within: float = 30
) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"gateway exited: {gateway_log(process)}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"gateway at {target} not serving after {within} s")


def signal_until_exit(process: subprocess.Popen[bytes], within: float = 10.0) -> None:
    """SIGTERM ``process`` every millisecond until it exits."""
    deadline = time.monotonic() + within
    while process.poll() is None and time.monotonic() < deadline:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.001)
