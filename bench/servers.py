"""Servers under test as subprocesses: the gateway (``server.cli serve``) and the floor.

Both are started the way an operator would start them and stopped with SIGTERM. Their
CPU time and resident memory are read from ``/proc`` (Linux), so the benchmark can report
server CPU per call, which the other load on a shared machine disturbs far less than
calls per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders.v1 import inventory_command_service_pb2, inventory_command_service_pb2_grpc

from bench import workload
from bench.tokens import bearer
from server.event_loop import EventLoopName

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: fields[11] is utime and fields[12] stime, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a ``--workers`` gateway's workers), gone ones skipped."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            found += children
            pending += children
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and every process below it (those still running)."""
    total = 0.0
    for process in (pid, *descendants(pid)):
        try:
            total += cpu_seconds(process)
        except FileNotFoundError:
            continue
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


DURABLE_FLOOR = "durable-floor"
"""The durable floor's name in the figures: commits in a writer thread, in groups."""
DURABLE_FLOOR_ON_LOOP = "durable-floor-on-loop"
"""The durable floor that commits each call on its event loop."""
DURABLE_FLOORS = (DURABLE_FLOOR, DURABLE_FLOOR_ON_LOOP)


@dataclass
class ServerProcess:
    """A server subprocess listening on ``target``; a context manager that stops it."""

    name: str
    target: str
    process: asyncio.subprocess.Process
    log_path: Path
    _log: IO[bytes]

    @classmethod
    async def start(
        cls,
        name: str,
        command: Sequence[str],
        port: int,
        log_dir: Path,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> ServerProcess:
        log_path = log_dir / f"{name}.log"
        log = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            *command, cwd=REPO_ROOT, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
        started = cls(name, f"127.0.0.1:{port}", process, log_path, log)
        try:
            await started._wait_serving(startup_timeout)
        except BaseException:
            await started.stop()
            raise
        return started

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """The server's CPU time, its worker processes' included."""
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    async def _wait_serving(self, within: float) -> None:
        deadline = time.monotonic() + within
        request = health_pb2.HealthCheckRequest(service="")
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.returncode is not None:
                    raise ServerStartError(
                        f"{self.name} exited with {self.process.returncode}: "
                        f"{self.log_path.read_text(errors='replace')[-2000:]}"
                    )
                try:
                    reply = await health.Check(request, timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(f"{self.name} not serving after {within} s")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        self._log.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_gateway(
    store_url: str,
    log_dir: Path,
    workers: int = 1,
    metrics_port: int | None = None,
    options: Sequence[str] = (),
) -> ServerProcess:
    """The gateway with its defaults (log level included), as an operator would run it,
    plus ``options`` of ``serve``."""
    port = free_port()
    command = gateway_command(port, store_url, workers)
    if metrics_port is not None:
        command += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    command += options
    name = "gateway" if workers == 1 else f"gateway-{workers}-workers"
    return await ServerProcess.start(name, command, port, log_dir)


def servers_event_loop() -> EventLoopName:
    """The event loop every server of a run uses: the gateway's, as ``serve`` would pick it
    here (``ORDER_GATEWAY_EVENT_LOOP``, uvloop by default); the floors run on the same
    one, so that their distance from the gateway is the gateway's own work."""
    name = os.environ.get("ORDER_GATEWAY_EVENT_LOOP", "uvloop").lower()
    return "asyncio" if name == "asyncio" else "uvloop"


def gateway_command(port: int, store_url: str, workers: int = 1) -> list[str]:
    """``order-gateway serve`` on 127.0.0.1:``port`` over ``store_url``."""
    return [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--store",
        store_url,
        "--workers",
        str(workers),
    ]


def floor_command(port: int, *options: str) -> list[str]:
    """The floor server (``bench.floor_server``) on 127.0.0.1:``port``, with ``options``."""
    return [sys.executable, "-m", "bench.floor_server", "--listen", f"127.0.0.1:{port}", *options]


async def start_floor(log_dir: Path, subscribe_events: int = 1_000_000) -> ServerProcess:
    port = free_port()
    command = floor_command(port, "--subscribe-events", str(subscribe_events))
    return await ServerProcess.start("floor", command, port, log_dir)


async def start_durable_floor(
    sqlite_file: Path, log_dir: Path, on_loop: bool = False
) -> ServerProcess:
    """The floor that first makes each command's events durable in ``sqlite_file``."""
    port = free_port()
    command = floor_command(
        port, "--durable", str(sqlite_file), *(["--commit-on-loop"] if on_loop else [])
    )
    name = DURABLE_FLOOR_ON_LOOP if on_loop else DURABLE_FLOOR
    return await ServerProcess.start(name, command, port, log_dir)


@contextlib.asynccontextmanager
async def gateway_beside_durable_floor(
    folder: Path,
) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    """The gateway on a SQLite file in ``folder``, every benchmark product stocked, and
    the group-commit durable floor on another, both serving until the block ends."""
    async with await start_gateway(f"sqlite:///{folder / 'gateway.db'}", folder) as gateway:
        await restock(gateway.target)
        async with await start_durable_floor(folder / "floor.db", folder) as floor:
            yield gateway, floor


async def restock(target: str, token: str = "") -> None:
    """Give every benchmark product more stock than a run can use (as the bearer of
    ``token``, if any)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)

        async def one(product_id: str) -> None:
            request = inventory_command_service_pb2.RestockProductRequest(
                product_id=product_id, quantity=workload.RESTOCK_QUANTITY
            )
            async for _ in stub.RestockProduct(request, timeout=60, metadata=bearer(token)):
                pass

        products = workload.product_ids()
        for start in range(0, len(products), 50):
            await asyncio.gather(*(one(p) for p in products[start : start + 50]))
