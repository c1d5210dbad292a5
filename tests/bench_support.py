"""Made-up benchmark figures, for tests that judge reports rather than measure anything."""

from __future__ import annotations

from bench.stats import Latencies, LoadResult


def made_up_load(
    server: str,
    concurrency: int,
    calls_per_s: float,
    p50_ms: float,
    workload: str = "create",
    errors: dict[str, int] | None = None,
    cpu_ms: float = 1.0,
) -> LoadResult:
    """One second of load on ``server``, p90 and p99 twice and three times the p50,
    ``cpu_ms`` of server CPU per call."""
    return LoadResult(
        server=server,
        workload=workload,
        concurrency=concurrency,
        duration=1.0,
        calls=int(calls_per_s),
        calls_per_s=calls_per_s,
        latency=Latencies(p50_ms=p50_ms, p90_ms=p50_ms * 2, p99_ms=p50_ms * 3),
        errors=errors or {},
        server_cpu_ms_per_call=cpu_ms,
    )
