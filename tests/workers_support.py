"""Helpers for tests of ``serve --workers N``: the gateway as a process tree, and clients
spread over its workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from server.workers.worker import WorkerReady, WorkerSpec
from tests.clients import Clients
from tests.serving import gateway_log, start_gateway, wait_until_serving
from tests.subscription_support import clients_on

WAIT = 60.0
"""Bound for anything a test waits for (a loaded machine spawns interpreters slowly)."""


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = set()
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue  # A thread that ended meanwhile (the supervisor's threads come and go).
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"multiprocessing.spawn" in command:
                found.add(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is dead too.
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return False


@dataclass
class WorkersGateway:
    process: subprocess.Popen[bytes]
    target: str
    metrics_port: int | None

    @property
    def log(self) -> str:
        return gateway_log(self.process)

    def workers(self) -> set[int]:
        return worker_pids(self.process.pid)


def env_without_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORDER_GATEWAY_")}


@contextlib.asynccontextmanager
async def workers_gateway(
    store_url: str,
    workers: int = 2,
    metrics: bool = False,
    port: int | None = None,
    options: Sequence[str] = (),
) -> AsyncIterator[WorkersGateway]:
    """``order-gateway serve --workers N [options]`` on ``port`` (by default one the
    system picks: ``:0``, so that no other process can take it first; the metrics port
    too), serving; killed on the way out."""
    listen = f"127.0.0.1:{port or 0}"
    args = ["serve", "--listen", listen, "--store", store_url, "--workers", str(workers)]
    if metrics:
        args += ["--metrics-listen", "127.0.0.1:0"]
    args += options
    process = start_gateway(args, env=env_without_settings())
    gateway = WorkersGateway(process, listen, None)
    try:
        # Every worker serves once the supervisor says so, with the port they share; until
        # then it is still starting some of them.
        serving = re.compile(rf"listening on (127\.0\.0\.1:\d+) with {workers} workers")
        async with asyncio.timeout(WAIT):
            while not (found := serving.search(gateway_log(process))):
                if process.poll() is not None:
                    raise AssertionError(f"the gateway exited:\n{gateway_log(process)}")
                await asyncio.sleep(0.02)
        gateway.target = found.group(1)
        if metrics:
            address = re.search(r"metrics of all workers at http://[^/]+:(\d+)/", gateway.log)
            assert address is not None, gateway.log
            gateway.metrics_port = int(address.group(1))
        await wait_until_serving(gateway.target, process, within=WAIT)
        await until_workers(gateway, workers)
        yield gateway
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=WAIT)
        # Workers stop on their own once their supervisor is gone.
        await asyncio.to_thread(_wait_gone, gateway)


def _wait_gone(gateway: WorkersGateway) -> None:
    with contextlib.suppress(FileNotFoundError):
        for pid in gateway.workers():
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)


async def until_workers(gateway: WorkersGateway, count: int) -> set[int]:
    """Wait until the gateway runs ``count`` workers; their pids."""
    async with asyncio.timeout(WAIT):
        while len(pids := gateway.workers()) != count:  # noqa: ASYNC110 - /proc has no event
            await asyncio.sleep(0.05)
    return pids


@contextlib.asynccontextmanager
async def spread_clients(target: str, count: int) -> AsyncIterator[Sequence[Clients]]:
    """Clients on ``count`` channels with a connection each (not grpc's one shared
    connection), so that the kernel spreads them over the workers."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        yield [clients_on(channel) for channel in channels]
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def ready_after_a_while(spec: WorkerSpec, ready: Connection, lifeline: Connection) -> None:
    """A worker's stand-in (spawned, so importable here) that says it serves half a second
    after it starts, and writes to the file named by ``spec.hub_socket`` whether that
    message could be sent."""
    time.sleep(0.5)
    try:
        ready.send(WorkerReady(None, "replica"))
    except OSError as error:
        outcome = f"failed: {error}"
    else:
        outcome = "sent"
    Path(spec.hub_socket).write_text(outcome)
