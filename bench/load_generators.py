"""The two load generators a section can drive a gateway with, and the gateway's own count
of its calls, which h2load's outcomes are read from.

``python``: ``bench.loadgen``'s grpc.aio clients, which read every answer, status
included, and spend about half a millisecond of CPU per call, about what a gateway
process spends. ``h2load``: ``bench.h2load``, nghttp2's C client, a few hundredths of
that, so that the cores are left to the servers; it cannot read a gRPC status, so a
run's outcomes come from the gateway's ``grpc_server_handled_total`` on its /metrics.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bench.h2load import run_h2load
from bench.loadgen import LoadSpec, run_load
from bench.stats import LoadResult

LOAD_GENERATORS = ("python", "h2load")

LoadRunner = Callable[[LoadSpec, str, Callable[[], float]], LoadResult]
"""Runs one load point against a server: its spec, the server's name, its CPU reading."""


def load_runner(generator: str, metrics_port: int) -> LoadRunner:
    """The load generator ``generator``, for the gateway whose /metrics is on
    ``metrics_port`` (where h2load's calls are told apart by status code)."""
    if generator == "python":
        return run_load
    return lambda spec, name, cpu: run_h2load(
        spec, name, cpu, lambda: create_orders_handled(metrics_port)
    )


def create_orders_handled(metrics_port: int) -> Counter[str]:
    """The gateway's CreateOrder calls so far, by status code (every worker's)."""
    handled: Counter[str] = Counter()
    for sample in metric_samples(metrics_port):
        if (
            sample.name == "grpc_server_handled_total"
            and sample.labels.get("grpc_method") == "CreateOrder"
        ):
            handled[sample.labels["grpc_code"]] += int(sample.value)
    return handled


def metric_samples(metrics_port: int) -> list[Sample]:
    """Every sample the gateway's /metrics on ``metrics_port`` exposes now."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]
