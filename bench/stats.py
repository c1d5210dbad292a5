"""Summaries of measured calls: throughput and latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Latencies:
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latencies:
        ordered = sorted(seconds)
        return cls(
            p50_ms=percentile(ordered, 0.50) * 1e3,
            p90_ms=percentile(ordered, 0.90) * 1e3,
            p99_ms=percentile(ordered, 0.99) * 1e3,
        )


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop load run against one server."""

    server: str
    """"floor", or the gateway's store kind ("memory", "sqlite", "postgresql")."""
    workload: str
    concurrency: int
    duration: float
    """Seconds measured, after the warm-up."""
    calls: int
    """Successful calls completed in the measured window."""
    calls_per_s: float
    latency: Latencies
    errors: dict[str, int] = field(default_factory=dict)
    """Failed calls by status code name (the whole run, warm-up included)."""
    response_bytes: dict[str, list[int]] = field(default_factory=dict)
    """Per RPC, the serialized size of each response message of one call."""
    server_cpu_ms_per_call: float = 0.0
    supervisor_cpu_ms_per_call: float = 0.0
    """Of ``server_cpu_ms_per_call``, what a ``--workers`` supervisor spent (on SQLite: the
    store's writer and the hub); 0 for a server of one process."""
    client_cpu_ms_per_call: float = 0.0
    """The load generator's own CPU per call (its client processes)."""
    database_cpu_ms_per_call: float = 0.0
    """What PostgreSQL's processes spent per call, when the benchmark can see them (a
    server on this host); 0 otherwise, and for SQLite, whose work is the server's own."""
    cut_short: bool = False
    """The cancel workload ran out of orders before the end and measured a shorter window."""
    round_number: int = 1
    """Which of the gRPC section's interleaved rounds (``--rounds``) measured it."""
    load_generator: str = "python"
    """``bench.loadgen``'s grpc.aio clients ("python"), or "h2load" (``bench.h2load``)."""


def median_round(rounds: Sequence[LoadResult]) -> LoadResult:
    """One point's rounds as one result: each figure the median of the rounds' (each
    latency percentile on its own), the calls and errors of all of them."""

    def median(values: Sequence[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    first = rounds[0]
    errors: dict[str, int] = {}
    for result in rounds:
        for code, count in result.errors.items():
            errors[code] = errors.get(code, 0) + count
    return LoadResult(
        server=first.server,
        workload=first.workload,
        concurrency=first.concurrency,
        duration=sum(r.duration for r in rounds),
        calls=sum(r.calls for r in rounds),
        calls_per_s=median([r.calls_per_s for r in rounds]),
        latency=Latencies(
            p50_ms=median([r.latency.p50_ms for r in rounds]),
            p90_ms=median([r.latency.p90_ms for r in rounds]),
            p99_ms=median([r.latency.p99_ms for r in rounds]),
        ),
        errors=errors,
        response_bytes=first.response_bytes,
        server_cpu_ms_per_call=median([r.server_cpu_ms_per_call for r in rounds]),
        supervisor_cpu_ms_per_call=median([r.supervisor_cpu_ms_per_call for r in rounds]),
        client_cpu_ms_per_call=median([r.client_cpu_ms_per_call for r in rounds]),
        database_cpu_ms_per_call=median([r.database_cpu_ms_per_call for r in rounds]),
        cut_short=any(r.cut_short for r in rounds),
        round_number=0,
        load_generator=first.load_generator,
    )
