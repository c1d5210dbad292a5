"""Where a CreateOrder's server CPU goes, library by library: the gateway on SQLite beside
the group-commit durable floor, under the same closed-loop load, in the same run.

    python -m bench.libraries [--concurrency 16] [--seconds 6] [--rounds 2]

Samples each server with Linux's ``perf record`` while the load runs (it needs the right
to read another process: root, or ``kernel.perf_event_paranoid`` at 1 or less), then
splits the server CPU per call by the library each sample fell in: the interpreter
(``libpython``: every line of Python, the gateway's and grpc's), grpc's core
(``cygrpc``), the kernel, libc, SQLite, pydantic's core, protobuf's, the event loop.
perf's sampling costs both servers some CPU of its own: the split shows where the
difference between them lies, and its ratio of CPU per call reads a little lower than
``python -m bench``'s, which runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import LoadSpec, run_load
from bench.servers import DURABLE_FLOOR, ServerProcess, gateway_beside_durable_floor

LIBRARIES = (
    ("interpreter (libpython)", re.compile(r"^libpython")),
    ("grpc core (cygrpc)", re.compile(r"^cygrpc\.")),
    ("kernel", re.compile(r"^\[kernel")),
    ("libc", re.compile(r"^libc[.-]")),
    ("SQLite", re.compile(r"^(libsqlite3|_sqlite3)")),
    ("pydantic-core", re.compile(r"^_pydantic_core")),
    ("protobuf (upb)", re.compile(r"^_message\.")),
    ("event loop (uvloop, _asyncio)", re.compile(r"^(loop\.cpython|_asyncio\.)")),
)
OTHER = "other"

_REPORT_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S.*?)\s*$")


def library_of(dso: str) -> str:
    """The name this report gives the shared object ``dso`` (as perf names it)."""
    for name, pattern in LIBRARIES:
        if pattern.search(dso):
            return name
    return OTHER


def library_shares(report: str) -> dict[str, float]:
    """Each library's share of the samples (0 to 1), from ``perf report --sort dso
    --stdio``'s lines (``  36.52%  libpython3.11.so.1.0``)."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        if line.startswith("#"):
            continue
        matched = _REPORT_LINE.match(line)
        if matched is None:
            continue
        name = library_of(matched.group(2))
        shares[name] = shares.get(name, 0.0) + float(matched.group(1)) / 100
    return shares


@dataclass(frozen=True)
class Split:
    """Server CPU per call (ms) and its share by library (0 to 1)."""

    cpu_ms_per_call: float
    shares: Mapping[str, float]

    def ms(self, library: str) -> float:
        return self.cpu_ms_per_call * self.shares.get(library, 0.0)


def perf_command() -> str:
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("python -m bench.libraries needs Linux's perf (Debian: linux-perf)")
    return perf


async def measure(server: ServerProcess, concurrency: int, seconds: float, data: Path) -> Split:
    """Load ``server`` for ``seconds`` plus a margin, sampling it for ``seconds``."""
    perf = perf_command()
    spec = LoadSpec(
        target=server.target,
        workload="create",
        concurrency=concurrency,
        duration=seconds + 2.0,
        warmup=1.0,
        processes=2,
    )
    running = asyncio.create_task(
        asyncio.to_thread(run_load, spec, server.name, server.cpu_seconds)
    )
    # Once the client processes are up and warm.
    await asyncio.sleep(2.5)
    sampler = await asyncio.create_subprocess_exec(
        perf, "record", "-F", "499", "-p", str(server.pid), "-o", str(data),
        "--", "sleep", str(seconds),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await sampler.wait()
    result = await running
    report = await asyncio.create_subprocess_exec(
        perf, "report", "-i", str(data), "--sort", "dso", "--stdio",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await report.communicate()
    shares = library_shares(out.decode())
    if not shares:
        raise SystemExit(f"perf recorded nothing of {server.name} (permission to trace it?)")
    return Split(result.server_cpu_ms_per_call, shares)


def table(concurrency: int, splits: Mapping[str, Split]) -> str:
    """Milliseconds per call by library, each server side by side, and the difference."""
    (first, gateway), (second, floor) = list(splits.items())[:2]
    width = 24
    lines = [
        f"CreateOrder on SQLite, {concurrency} concurrent: server CPU ms per call by library",
        f"  {'library':32s}{first:>{width}s}{second:>{width}s}{'difference':>{width}s}",
    ]
    names = [name for name, _ in LIBRARIES] + [OTHER]
    for name in names:
        mine, theirs = gateway.ms(name), floor.ms(name)
        lines.append(
            f"  {name:32s}"
            f"{mine:{width - 7}.3f} ({gateway.shares.get(name, 0.0):4.0%})"
            f"{theirs:{width - 7}.3f} ({floor.shares.get(name, 0.0):4.0%})"
            f"{mine - theirs:{width}.3f}"
        )
    ratio = gateway.cpu_ms_per_call / floor.cpu_ms_per_call if floor.cpu_ms_per_call else 0.0
    lines.append(
        f"  {'total':32s}{gateway.cpu_ms_per_call:{width}.3f}{floor.cpu_ms_per_call:{width}.3f}"
        f"{gateway.cpu_ms_per_call - floor.cpu_ms_per_call:{width}.3f}  ({ratio:.2f} x)"
    )
    return "\n".join(lines)


async def run(concurrency: int, seconds: float, rounds: int) -> str:
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="order-gateway-libraries-") as scratch:
        folder = Path(scratch)
        async with gateway_beside_durable_floor(folder) as (gateway, floor):
            for n in range(rounds):
                splits = {
                    "gateway": await measure(
                        gateway, concurrency, seconds, folder / f"gateway-{n}.data"
                    ),
                    DURABLE_FLOOR: await measure(
                        floor, concurrency, seconds, folder / f"floor-{n}.data"
                    ),
                }
                out.append(f"round {n + 1}\n{table(concurrency, splits)}")
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.libraries",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="sampled per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="the servers take turns")
    args = parser.parse_args(argv)
    print(asyncio.run(run(args.concurrency, args.seconds, args.rounds)))


if __name__ == "__main__":
    main()
