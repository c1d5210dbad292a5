"""Two gateway replicas on one PostgreSQL database, every order on one hot product
(the ``hot`` workload) or on a few dozen products written at once (``hot-set``: more
contended streams than a replica has pooled connections).

Both replicas serve the workload at once, each driven by its own client processes, for
the same window. Measured in the same database just before: one replica
alone with as many callers as the two together, the baseline the pair must not fall
below, and one replica alone with one replica's callers, which tells how much of any
shortfall is the smaller batches of fewer callers rather than the taking of turns. Every
error code is counted: a command answered ABORTED for a concurrency conflict means the
replicas raced instead of queueing at the database.

The load generator is ``bench.loadgen``'s Python clients, one process per replica, or
h2load (``bench.load_generators``), which leaves the cores to the replicas and the
database: with the Python clients, the two replicas, the database and two client
processes share the machine's cores, and the pair's calls/s say as much about the
clients as about the replicas.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from bench.load_generators import load_runner
from bench.loadgen import LoadSpec
from bench.servers import free_port, restock, start_gateway
from bench.stats import LoadResult


@dataclass(frozen=True)
class ReplicaResult:
    """Two replicas serving hot products at once, and one replica alone before them."""

    workload: str
    callers_per_replica: int
    duration: float
    alone: LoadResult
    """One replica with the callers of both."""
    alone_half: LoadResult
    """One replica with the callers of one."""
    replicas: list[LoadResult] = field(default_factory=list)

    @property
    def total_calls_per_s(self) -> float:
        return sum(r.calls_per_s for r in self.replicas)

    @property
    def smallest_share(self) -> float:
        total = self.total_calls_per_s
        return min(r.calls_per_s for r in self.replicas) / total if total else 0.0

    @property
    def errors(self) -> dict[str, int]:
        counted: dict[str, int] = {}
        for result in self.replicas:
            for code, count in result.errors.items():
                counted[code] = counted.get(code, 0) + count
        return counted


async def measure(
    url: str,
    workdir: Path,
    callers: int,
    duration: float,
    warmup: float,
    workload: str = "hot",
    load_generator: str = "python",
) -> ReplicaResult:
    """``callers`` on each of two replicas of ``url``'s database, for ``duration`` s,
    driven by ``load_generator`` (one of ``bench.load_generators.LOAD_GENERATORS``)."""

    def spec(target: str, concurrency: int) -> LoadSpec:
        return LoadSpec(
            target=target,
            workload=workload,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            processes=1,
        )

    first_dir, second_dir = workdir / "replica-1", workdir / "replica-2"
    first_dir.mkdir(exist_ok=True)
    second_dir.mkdir(exist_ok=True)
    first_metrics, second_metrics = free_port(), free_port()
    first_load = load_runner(load_generator, first_metrics)
    second_load = load_runner(load_generator, second_metrics)
    async with (
        await start_gateway(url, first_dir, metrics_port=first_metrics) as first,
        await start_gateway(url, second_dir, metrics_port=second_metrics) as second,
    ):
        await restock(first.target)
        alone = await asyncio.to_thread(
            first_load, spec(first.target, 2 * callers), "replica alone", first.cpu_seconds
        )
        alone_half = await asyncio.to_thread(
            first_load, spec(first.target, callers), "replica alone", first.cpu_seconds
        )
        both = await asyncio.gather(
            asyncio.to_thread(
                first_load, spec(first.target, callers), "replica 1", first.cpu_seconds
            ),
            asyncio.to_thread(
                second_load, spec(second.target, callers), "replica 2", second.cpu_seconds
            ),
        )
    return ReplicaResult(workload, callers, duration, alone, alone_half, list(both))
