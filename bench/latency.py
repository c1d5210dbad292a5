"""Where one caller's CreateOrder latency goes, step by step inside the server: the gateway
on SQLite beside the two durable floors, in the same run.

    python -m bench.latency [--seconds 5] [--rounds 2]

Each server runs under ``bench.latency_probe``, which takes a timestamp at each step of
every call (the request read, the handler called, the store append begun and returned,
each response handed to grpc and sent, the call's end) and splits each step into the
event loop's own time and the time it waited in ``select`` for another thread or the
client. One caller, closed loop; the probe forgets the warm-up's calls. Prints, per
server, the client's p50 and the median of each step, the servers taking turns within
each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LoadSpec, run_load
from bench.servers import (
    DURABLE_FLOOR,
    DURABLE_FLOOR_ON_LOOP,
    ServerProcess,
    floor_command,
    free_port,
    gateway_command,
    restock,
)

GATEWAY = "gateway, SQLite"


@dataclass(frozen=True)
class Timed:
    """One server's run: the client's p50 and the probe's summary of the steps."""

    p50_ms: float
    steps: dict[str, Any]


def _command(name: str, port: int, workdir: Path, out: Path) -> list[str]:
    if name == GATEWAY:
        base = gateway_command(port, f"sqlite:///{workdir / 'gateway.db'}")
    else:
        durable = ["--durable", str(workdir / f"{name}.db")]
        base = floor_command(port, *durable, *(["--commit-on-loop"] if "loop" in name else []))
    # base: [python, "-m", MODULE, ARGS…]
    return [sys.executable, "-m", "bench.latency_probe", str(out), *base[2:]]


async def measure(name: str, seconds: float, workdir: Path, round_number: int) -> Timed:
    out = workdir / f"{name}-{round_number}.json"
    port = free_port()
    server = await ServerProcess.start(
        name.replace(", ", "-"), _command(name, port, workdir, out), port, workdir
    )
    try:
        if name == GATEWAY:
            await restock(server.target)
        warm = LoadSpec(server.target, "create", 1, 1.0, 0.3, 1)
        await asyncio.to_thread(run_load, warm, name)
        os.kill(server.pid, signal.SIGUSR1)
        spec = LoadSpec(server.target, "create", 1, seconds, 0.0, 1)
        result = await asyncio.to_thread(run_load, spec, name)
    finally:
        await server.stop()
    return Timed(result.latency.p50_ms, json.loads(out.read_text()))


def table(runs: dict[str, list[Timed]]) -> str:
    """Each step's median over the rounds (of the per-round medians), µs, with the part
    the event loop waited in brackets."""
    width = 24
    names = list(runs)
    lines = [
        "CreateOrder, 1 caller: each step inside the server, median µs (of it the event "
        "loop waiting)",
        f"  {'step':44s}" + "".join(f"{name:>{width}s}" for name in names),
    ]
    labels: list[str] = []
    for timed in runs.values():
        for step in timed[0].steps["steps"]:
            label = f"{step['from']} -> {step['to']}"
            if label not in labels:
                labels.append(label)
    for label in labels:
        cells = []
        for timed in runs.values():
            found = [
                (s["us"], s["waited_us"])
                for t in timed
                for s in t.steps["steps"]
                if f"{s['from']} -> {s['to']}" == label
            ]
            if not found:
                cells.append("-")
                continue
            us = statistics.median(f[0] for f in found)
            waited = statistics.median(f[1] for f in found)
            cells.append(f"{us:7.1f} ({waited:5.1f})")
        lines.append(f"  {label:44s}" + "".join(f"{cell:>{width}s}" for cell in cells))

    lines.append(
        f"  {'in the server, first step to last':44s}"
        + "".join(
            f"{statistics.median(t.steps['total_us'] for t in timed):>{width}.1f}"
            for timed in runs.values()
        )
    )
    lines.append(
        f"  {'client p50, ms':44s}"
        + "".join(
            f"{statistics.median(t.p50_ms for t in timed):>{width}.3f}" for timed in runs.values()
        )
    )
    lines.append(
        f"  {'calls timed (last round)':44s}"
        + "".join(f"{timed[-1].steps['calls']:>{width},d}" for timed in runs.values())
    )
    return "\n".join(lines)


async def run(seconds: float, rounds: int) -> str:
    names = [GATEWAY, DURABLE_FLOOR, DURABLE_FLOOR_ON_LOOP]
    runs: dict[str, list[Timed]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="og-latency-") as directory:
        for round_number in range(1, rounds + 1):
            for name in names:
                workdir = Path(directory) / f"round-{round_number}"
                workdir.mkdir(exist_ok=True)
                runs[name].append(await measure(name, seconds, workdir, round_number))
    return table(runs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, servers taking turns")
    args = parser.parse_args(argv)
    print(asyncio.run(run(args.seconds, args.rounds)))


if __name__ == "__main__":
    main()
