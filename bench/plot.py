"""The README's figure: CreateOrder throughput and p99 latency against concurrency,
for the floor and the gateway on each store measured."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt

from bench.report import Report

STYLES = {
    "floor": {"color": "black", "linestyle": "--", "marker": "o"},
    "memory": {"color": "tab:gray", "marker": "s"},
    "sqlite": {"color": "tab:blue", "marker": "^"},
    "postgresql": {"color": "tab:orange", "marker": "D"},
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
        label = "floor (bare grpc.aio)" if server == "floor" else f"gateway, {server}"
        style = STYLES.get(server, {})
        levels = [r.concurrency for r in points]
        throughput.plot(levels, [r.calls_per_s for r in points], label=label, **style)
        tail.plot(levels, [r.latency.p99_ms for r in points], label=label, **style)
    for axes, title, unit in (
        (throughput, "throughput", "calls/s"),
        (tail, "p99 latency", "ms"),
    ):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent calls")
        axes.set_ylabel(unit)
        axes.set_title(f"{workload} — {title}")
        axes.grid(True, which="both", alpha=0.3)
        axes.set_ylim(bottom=0)
        levels = sorted({r.concurrency for r in report.load})
        axes.set_xticks(levels, [str(c) for c in levels])
    throughput.legend()
    conditions = report.conditions_before
    figure.suptitle(
        f"order-gateway CreateOrder vs bare gRPC floor — {conditions.get('cpus')} CPUs, "
        f"client and server on one machine, {conditions.get('date', '')[:10]}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
