"""A slow subscriber under full write load: the gateway's memory must stay flat.

Two runs against a fresh gateway process each (``order-gateway serve``, SQLite by
default): the same closed-loop CreateOrder load alone (the baseline), then with one
subscriber that reads only ``--rate`` events a second. The subscriber falls further and
further behind; the gateway must keep its buffer bounded (it moves the subscriber back to
reading pages from the store) instead of holding every event it has not yet sent. The
gateway's resident memory is sampled every second in both runs, and the subscriber checks
that it receives positions strictly one after another (no gap, no duplicate).

    python -m bench.slow_subscriber [--duration 60] [--rate 100] [--store URL]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from orders.v1 import event_stream_service_pb2, event_stream_service_pb2_grpc

from bench.loadgen import LoadSpec, run_load
from bench.servers import restock, start_gateway
from bench.subscriptions import head_position

MB = 1024 * 1024
SAMPLE_SECONDS = 1.0


@dataclass
class Sample:
    seconds: float
    rss_mb: float
    head: int
    delivered: int


@dataclass
class SlowSubscriber:
    """Reads one event per ``1/rate`` seconds, checking that positions follow each other."""

    target: str
    after: int
    rate: float
    delivered: int = 0
    last_position: int = 0
    out_of_order: list[tuple[int, int]] = field(default_factory=list)

    async def run(self) -> None:
        self.last_position = self.after
        loop = asyncio.get_running_loop()
        next_read = loop.time()
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = event_stream_service_pb2_grpc.EventStreamServiceStub(channel)
            request = event_stream_service_pb2.SubscribeRequest(after_position=self.after)
            async for response in stub.Subscribe(request):
                if response.HasField("event"):
                    position = response.event.position
                    if position != self.last_position + 1:
                        self.out_of_order.append((self.last_position, position))
                    self.last_position = position
                    self.delivered += 1
                    # Paced by the clock, not by a fixed sleep, to hold the rate exactly.
                    next_read += 1 / self.rate
                    await asyncio.sleep(max(0.0, next_read - loop.time()))


@dataclass
class Run:
    name: str
    samples: list[Sample]
    events_per_s: float
    server_cpu_ms_per_call: float
    subscriber: SlowSubscriber | None

    def steady(self) -> list[Sample]:
        """The second half of the run: start-up and warm-up allocations are over."""
        return self.samples[len(self.samples) // 2 :]

    def slope_mb_per_min(self) -> float:
        steady = self.steady()
        if len(steady) < 2:
            return 0.0
        fit = statistics.linear_regression([s.seconds for s in steady], [s.rss_mb for s in steady])
        return fit.slope * 60


async def measure(
    name: str, store_url: str, workdir: Path, spec: LoadSpec, rate: float | None
) -> Run:
    async with await start_gateway(store_url, workdir) as gateway:
        await restock(gateway.target)
        head_at_start = await head_position(gateway.target)
        subscriber = SlowSubscriber(gateway.target, head_at_start, rate) if rate else None
        reading = asyncio.create_task(subscriber.run()) if subscriber else None
        spec = dataclasses.replace(spec, target=gateway.target)
        load = asyncio.create_task(
            asyncio.to_thread(run_load, spec, "gateway", gateway.cpu_seconds)
        )
        started = time.monotonic()
        samples: list[Sample] = []
        while not load.done():
            samples.append(
                Sample(
                    time.monotonic() - started,
                    gateway.rss_bytes() / MB,
                    await head_position(gateway.target),
                    subscriber.delivered if subscriber else 0,
                )
            )
            await asyncio.wait({load}, timeout=SAMPLE_SECONDS)
        result = load.result()
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    events_per_s = 2 * result.calls_per_s  # CreateOrder commits two events
    return Run(name, samples, events_per_s, result.server_cpu_ms_per_call, subscriber)


def report(runs: Sequence[Run], rate: float) -> str:
    lines = [
        "t(s)  " + "  ".join(f"{r.name + ' RSS MB':>22}" for r in runs) + "   slow delivered/head"
    ]
    slow = runs[-1]
    for n in range(0, max(len(r.samples) for r in runs), 5):
        cells = [f"{r.samples[n].rss_mb:22.1f}" if n < len(r.samples) else " " * 22 for r in runs]
        progress = (
            f"{slow.samples[n].delivered:>8} / {slow.samples[n].head}"
            if n < len(slow.samples)
            else ""
        )
        lines.append(f"{n * SAMPLE_SECONDS:4.0f}  " + "  ".join(cells) + "   " + progress)
    lines.append("")
    for run in runs:
        steady = [s.rss_mb for s in run.steady()]
        lines.append(
            f"{run.name}: {run.events_per_s:,.0f} events/s written, gateway CPU "
            f"{run.server_cpu_ms_per_call:.2f} ms per CreateOrder; RSS second half "
            f"min {min(steady):.1f} / max {max(steady):.1f} / last {steady[-1]:.1f} MB, "
            f"slope {run.slope_mb_per_min():+.2f} MB/min"
        )
        if run.subscriber is not None:
            sub = run.subscriber
            behind = run.samples[-1].head - sub.last_position
            lines.append(
                f"  subscriber at {rate:g} events/s: {sub.delivered:,} events delivered, "
                f"{behind:,} behind the head at the end, "
                f"{'in order, no gap' if not sub.out_of_order else f'GAPS {sub.out_of_order[:5]}'}"
            )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    spec = LoadSpec("", "create", args.concurrency, args.duration, 1.0, args.processes)
    with tempfile.TemporaryDirectory(prefix="slow-subscriber-") as tmp:
        workdir = Path(tmp)
        runs = []
        for name, rate in (("writers alone", None), ("with slow subscriber", args.rate)):
            store = args.store or f"sqlite:///{workdir}/{name.replace(' ', '-')}.db"
            runs.append(await measure(name, store, workdir, spec, rate))
    print(report(runs, args.rate))
    subscriber = runs[-1].subscriber
    return 1 if subscriber is None or subscriber.out_of_order else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_subscriber", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    parser.add_argument("--rate", type=float, default=100.0, help="subscriber events per second")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent writers")
    parser.add_argument("--processes", type=int, default=1, help="writer client processes")
    parser.add_argument(
        "--store", help="store URL for both runs (default: a fresh SQLite file per run)"
    )
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
