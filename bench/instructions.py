"""Instructions per CreateOrder, counted by valgrind's callgrind: the gateway on SQLite beside
the bare floor and the group-commit durable floor, each run the same way in one run.

    python -m bench.instructions [--calls 300] [--warmup 50]

Time per call moves with everything else the machine runs; the number of instructions a
server executes for a call hardly does. So this is the figure to compare two versions of
the code by, on a shared machine: each server runs under callgrind (all its threads, the
SQLite writer's and grpc's included), takes ``--warmup`` CreateOrder calls one after the
other, has its counters zeroed, takes ``--calls`` more, and has them dumped. Needs
valgrind (``callgrind_control`` included) on the PATH; a server under callgrind runs some
50 times slower, so the defaults take a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from orders.v1 import order_command_service_pb2_grpc

from bench import workload
from bench.servers import (
    DURABLE_FLOOR,
    ServerProcess,
    floor_command,
    free_port,
    gateway_command,
    restock,
)

CALLGRIND_STARTUP_TIMEOUT = 600.0
"""Seconds a server under callgrind may take to serve: imports alone take a minute."""


class ValgrindMissingError(RuntimeError):
    pass


@dataclass(frozen=True)
class Count:
    name: str
    calls: int
    instructions: int

    @property
    def per_call(self) -> float:
        return self.instructions / self.calls


def total_instructions(dump: str) -> int:
    """The instruction count of a callgrind dump (its ``summary:`` or ``totals:`` line)."""
    for line in dump.splitlines():
        key, _, value = line.partition(":")
        if key in ("summary", "totals") and value.split():
            return int(value.split()[0])
    raise ValueError("not a callgrind dump: no summary or totals line")


def callgrind(out_file: Path, command: Sequence[str]) -> list[str]:
    """``command`` run under callgrind, its profile written to ``out_file``.<pid>.<part>."""
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_file}.%p",
        "--dump-instr=no",
        *command,
    ]


async def create_orders(target: str, calls: int, seed: int) -> None:
    """``calls`` CreateOrder calls, one after the other, each read to its end."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = order_command_service_pb2_grpc.OrderCommandServiceStub(channel)
        for _ in range(calls):
            async for _event in stub.CreateOrder(workload.create_request(rng, str(uuid.uuid4()))):
                pass


def _control(option: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def count(
    name: str,
    command: Sequence[str],
    port: int,
    folder: Path,
    warmup: int,
    calls: int,
    stocked: bool,
) -> Count:
    """``name``'s instructions for ``calls`` after ``warmup``; ``stocked``: restock the
    products first (the gateway; the floors answer any order)."""
    out_file = folder / f"{name}.callgrind"
    server = await ServerProcess.start(
        name, callgrind(out_file, command), port, folder, CALLGRIND_STARTUP_TIMEOUT
    )
    try:
        if stocked:
            await restock(server.target)
        await create_orders(server.target, warmup, seed=1)
        await asyncio.to_thread(_control, "--zero", server.pid)
        await create_orders(server.target, calls, seed=2)
        await asyncio.to_thread(_control, "--dump", server.pid)
    finally:
        await server.stop()
    # The dump asked for is the process's first part; the one at exit comes after it.
    dump = await asyncio.to_thread(Path(f"{out_file}.{server.pid}.1").read_text)
    return Count(name, calls, total_instructions(dump))


def table(counts: Sequence[Count], baseline: str = DURABLE_FLOOR) -> str:
    base = next((c for c in counts if c.name == baseline), None)
    lines = [
        f"CreateOrder, 1 concurrent, {counts[0].calls} calls: instructions per call (all threads)"
    ]
    for one in counts:
        ratio = f"{one.per_call / base.per_call:6.2f} x {baseline}" if base is not None else ""
        lines.append(f"  {one.name:16s}{one.per_call:14,.0f}  {ratio}")
    return "\n".join(lines)


async def run(calls: int, warmup: int) -> str:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise ValgrindMissingError("needs valgrind and callgrind_control on the PATH")
    counts: list[Count] = []
    with tempfile.TemporaryDirectory(prefix="order-gateway-instructions-") as scratch:
        folder = Path(scratch)
        ports = [free_port() for _ in range(3)]
        servers = [
            ("floor", ports[0], floor_command(ports[0])),
            (
                DURABLE_FLOOR,
                ports[1],
                floor_command(ports[1], "--durable", str(folder / "floor.db")),
            ),
            ("gateway", ports[2], gateway_command(ports[2], f"sqlite:///{folder / 'gateway.db'}")),
        ]
        for name, port, command in servers:
            stocked = name == "gateway"
            counts.append(await count(name, command, port, folder, warmup, calls, stocked))
    return table(counts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="calls counted (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="calls before (default 50)")
    args = parser.parse_args(argv)
    try:
        print(asyncio.run(run(args.calls, args.warmup)))
    except ValgrindMissingError as error:
        parser.exit(2, f"python -m bench.instructions: {error}\n")


if __name__ == "__main__":
    main()
