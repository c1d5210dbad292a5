"""Profile the gateway under load: py-spy samples the server process while the load runs.

    python -m bench.profile [--store sqlite] [--workload create] [--concurrency 16]
                            [--seconds 10] [--out bench/results/profile.txt]

Writes py-spy's collapsed stacks (for flame graph tools) and prints the functions with
the most samples, by their own time and by time including what they call. py-spy reads
the process from outside (root or ptrace permission needed) without pausing it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import LoadSpec, run_load
from bench.run import RESULTS
from bench.servers import restock, start_floor, start_gateway
from bench.stores import StoreSpec


def summarise(collapsed: str, top: int = 30) -> str:
    """Top functions by own samples and by inclusive samples, from py-spy's raw format."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples"]
    for title, counter in (("own time", own), ("including callees", inclusive)):
        lines.append(f"\ntop {top} by {title}:")
        lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


async def profile(args: argparse.Namespace) -> str:
    """Profile under load; returns the one-line load summary (the stacks are in ``--out``)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    stacks: Path = args.out
    stacks.parent.mkdir(parents=True, exist_ok=True)
    spec = StoreSpec.parse(args.store)
    with tempfile.TemporaryDirectory(prefix="order-gateway-profile-") as scratch:
        workdir = Path(scratch)
        with spec.fresh(workdir, "profile") as url:
            if args.floor:
                gateway = await start_floor(workdir)
            else:
                gateway = await start_gateway(url, workdir)
            async with gateway:
                if not args.floor:
                    await restock(gateway.target)
                load = LoadSpec(
                    target=gateway.target,
                    workload=args.workload,
                    concurrency=args.concurrency,
                    duration=args.seconds + 2,
                    warmup=1.0,
                    processes=args.processes,
                )
                running = asyncio.create_task(
                    asyncio.to_thread(run_load, load, spec.kind, gateway.cpu_seconds)
                )
                # Let the client processes start and warm up before sampling.
                await asyncio.sleep(3.0 + load.prefill)
                sampler = await asyncio.create_subprocess_exec(
                    py_spy,
                    "record",
                    "--pid",
                    str(gateway.pid),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.seconds),
                    "--format",
                    "raw",
                    "--output",
                    str(stacks),
                    # Native frames are read from a paused process only.
                    *(["--native"] if args.native else ["--nonblocking"]),
                    *(["--gil"] if args.gil else []),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await sampler.wait()
                result = await running
    return (
        f"{result.workload} at {result.concurrency}: {result.calls_per_s:,.0f} calls/s, "
        f"p50 {result.latency.p50_ms:.2f} ms, "
        f"server CPU {result.server_cpu_ms_per_call:.3f} ms/call"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", default="memory")
    parser.add_argument("--workload", default="create")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--floor", action="store_true", help="profile the floor server instead")
    parser.add_argument(
        "--native", action="store_true", help="include C/Cython frames (pauses the process)"
    )
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile.txt")
    args = parser.parse_args(argv)
    print(asyncio.run(profile(args)))
    print(summarise(args.out.read_text(), args.top))
    print(f"\ncollapsed stacks (for flame graph tools): {args.out}")


if __name__ == "__main__":
    main()
