"""Made-up benchmark figures, for tests that judge reports rather than measure anything,
and a small run of ``python -m bench`` for those that do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.run import main
from bench.stats import Latencies, LoadResult


def bench_report(tmp_path: Path, *args: str) -> dict[str, Any]:
    """``python -m bench ARGS`` in ``tmp_path`` (its output in ``stdout.txt``): the JSON
    report of a run that exited 0."""
    results = tmp_path / "bench.json"
    with (tmp_path / "stdout.txt").open("w") as out, pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdout", out)
        exit_code = main([*args, "--workdir", str(tmp_path / "work"), "--json", str(results)])
    assert exit_code == 0
    report: dict[str, Any] = json.loads(results.read_text())
    return report


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
