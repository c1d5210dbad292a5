"""Where a CreateOrder's server CPU goes, thread by thread: the gateway on SQLite beside
the group-commit durable floor, measured in the same run.

    python -m bench.threads [--concurrency 1,16] [--seconds 5]

Reads each thread's user and system time from ``/proc`` before and after a closed-loop
run, and prints milliseconds per call: the event loop (the main thread, where every
call's Python runs), the other Python threads (the SQLite writer first), and grpc's
event engine threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import LoadSpec, run_load
from bench.servers import DURABLE_FLOOR, ServerProcess, gateway_beside_durable_floor

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EVENT_ENGINE = "event_engine"
"""The name grpc gives its own threads."""


@dataclass(frozen=True)
class ThreadTime:
    name: str
    user: float
    system: float
    """Seconds."""


def thread_times(pid: int) -> dict[int, ThreadTime]:
    """CPU time of each live thread of ``pid``, by thread id."""
    times: dict[int, ThreadTime] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        times[int(task.name)] = ThreadTime(
            name, int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS
        )
    return times


@dataclass(frozen=True)
class Split:
    """Server CPU per call, in ms: (user, system) per group of threads."""

    loop: tuple[float, float]
    other_python: list[tuple[float, float]]
    """The other threads that are not grpc's, busiest first."""
    event_engine: tuple[float, float]

    @property
    def total(self) -> float:
        groups = [self.loop, self.event_engine, *self.other_python]
        return sum(user + system for user, system in groups)


def split(
    pid: int, before: Mapping[int, ThreadTime], after: Mapping[int, ThreadTime], calls: int
) -> Split:
    """The CPU each thread spent between ``before`` and ``after``, per call."""
    loop = (0.0, 0.0)
    others: list[tuple[float, float]] = []
    engine = (0.0, 0.0)
    for tid, now in after.items():
        then = before.get(tid, ThreadTime(now.name, 0.0, 0.0))
        spent = (
            (now.user - then.user) * 1e3 / calls,
            (now.system - then.system) * 1e3 / calls,
        )
        if tid == pid:
            loop = spent
        elif now.name.startswith(EVENT_ENGINE):
            engine = (engine[0] + spent[0], engine[1] + spent[1])
        elif sum(spent) > 0:
            others.append(spent)
    others.sort(key=sum, reverse=True)
    return Split(loop, others, engine)


async def measure(server: ServerProcess, concurrency: int, seconds: float) -> Split:
    spec = LoadSpec(
        target=server.target,
        workload="create",
        concurrency=concurrency,
        duration=seconds,
        warmup=0.0,
        processes=1,
    )
    warm = LoadSpec(spec.target, "create", concurrency, 1.0, 0.3, 1)
    await asyncio.to_thread(run_load, warm, server.name)
    before = thread_times(server.pid)
    result = await asyncio.to_thread(run_load, spec, server.name)
    after = thread_times(server.pid)
    return split(server.pid, before, after, result.calls)


def _ms(pair: tuple[float, float]) -> str:
    user, system = pair
    return f"{user + system:6.3f} ({user:.3f} + {system:.3f})"


def table(concurrency: int, splits: Mapping[str, Split]) -> str:
    names = list(splits)
    width = 26
    lines = [
        f"CreateOrder on SQLite, {concurrency} concurrent: server CPU ms per call (user + system)",
        f"  {'thread':24s}" + "".join(f"{name:>{width}s}" for name in names),
    ]

    def row(label: str, cells: Sequence[str]) -> None:
        lines.append(f"  {label:24s}" + "".join(f"{cell:>{width}s}" for cell in cells))

    row("event loop", [_ms(s.loop) for s in splits.values()])
    depth = max(len(s.other_python) for s in splits.values())
    for n in range(depth):
        label = "busiest other thread" if n == 0 else f"other thread {n + 1}"
        row(
            label,
            [_ms(s.other_python[n]) if n < len(s.other_python) else "" for s in splits.values()],
        )
    row("grpc event engine", [_ms(s.event_engine) for s in splits.values()])
    row("total", [f"{s.total:6.3f}" for s in splits.values()])
    return "\n".join(lines)


async def run(concurrencies: Sequence[int], seconds: float) -> str:
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="order-gateway-threads-") as scratch:
        async with gateway_beside_durable_floor(Path(scratch)) as (gateway, floor):
            for concurrency in concurrencies:
                splits = {
                    "gateway": await measure(gateway, concurrency, seconds),
                    DURABLE_FLOOR: await measure(floor, concurrency, seconds),
                }
                out.append(table(concurrency, splits))
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(asyncio.run(run(concurrencies, args.seconds)))


if __name__ == "__main__":
    main()
