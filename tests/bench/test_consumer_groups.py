"""``python -m bench.consumer_groups`` runs end to end: a small backlog on SQLite, drained
by Subscribe and by groups of one and two members. Its shape, never its speed."""

from __future__ import annotations

import re
import subprocess
import sys


def test_the_consumer_group_benchmark_reports_every_measurement() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench.consumer_groups", "--events", "400", "--members", "1,2",
         "--rounds", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    labels = ["Subscribe catch-up ", "group, 1 member ", "group, 2 members "]
    assert len(lines) == len(labels)
    for line, label in zip(lines, labels, strict=True):
        assert re.search(
            rf"^round 1  {label}\s+400 events .* events/s .* x Subscribe  peak RSS +\d+ MB$",
            line,
        ), line
