"""The figure in docs/performance.md: CreateOrder throughput and p99 latency against
concurrency, for the floor and the gateway on each store measured."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from bench.report import Report
from bench.servers import DURABLE_FLOOR, DURABLE_FLOOR_ON_LOOP

STYLES = {
    "floor": {"color": "black", "linestyle": "--", "marker": "o"},
    DURABLE_FLOOR: {"color": "tab:blue", "linestyle": ":", "marker": "v"},
    DURABLE_FLOOR_ON_LOOP: {"color": "tab:cyan", "linestyle": ":", "marker": "<"},
    "memory": {"color": "tab:gray", "marker": "s"},
    "sqlite": {"color": "tab:blue", "marker": "^"},
    "postgresql": {"color": "tab:orange", "marker": "D"},
}


LABELS = {
    "floor": "floor (bare grpc.aio)",
    DURABLE_FLOOR: "durable floor (floor + SQLite group commit)",
    DURABLE_FLOOR_ON_LOOP: "durable floor, committing on the loop",
}


def plot_load(report: Report, path: Path, workload: str = "create") -> Path:
    """Two panels, calls/s and p99 ms, against concurrency (log scale); one line per server."""
    servers = sorted(
        {r.server for r in report.load if r.workload == workload},
        key=lambda s: (s != "floor", s),
    )
    figure, (throughput, tail) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for server in servers:
        points = sorted(
            (r for r in report.load if r.server == server and r.workload == workload),
            key=lambda r: r.concurrency,
        )
        label = LABELS.get(server, f"gateway, {server}")
        style = STYLES.get(server, {})
        levels = [r.concurrency for r in points]
        throughput.plot(levels, [r.calls_per_s for r in points], label=label, **style)
        tail.plot(levels, [r.latency.p99_ms for r in points], label=label, **style)
    levels = sorted({r.concurrency for r in report.load if r.workload == workload})
    for axes, title, unit in (
        (throughput, "throughput (higher is better)", "calls/s"),
        (tail, "p99 latency (lower is better)", "ms, log scale"),
    ):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.minorticks_off()
        axes.set_xlabel("concurrent calls (closed loop)")
        axes.set_ylabel(unit)
        axes.set_title(f"CreateOrder {title}")
        axes.grid(True, which="both", alpha=0.3)
    throughput.set_ylim(bottom=0)
    # Latencies span two orders of magnitude from 1 to 64 concurrent calls.
    tail.set_yscale("log")
    tail.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # Latency grows with concurrency, so the p99 panel's upper left stays empty.
    tail.legend(loc="upper left", fontsize=8)
    conditions = report.conditions_before
    figure.suptitle(
        f"order-gateway vs a bare grpc.aio server (floor): {conditions.get('cpus')} CPUs, "
        f"client and server on one machine, {conditions.get('date', '')[:10]}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
