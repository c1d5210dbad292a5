"""``python -m bench.instructions``: a callgrind dump's instruction count, per call, side by
side with the durable floor's."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.instructions import Count, callgrind, table, total_instructions

DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python -m server.cli serve
part: 1

events: Ir

fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
0 5
summary: 642044666


totals: 642044666
"""


def test_the_count_is_the_dumps_summary() -> None:
    assert total_instructions(DUMP) == 642_044_666


def test_a_file_without_a_count_is_refused() -> None:
    with pytest.raises(ValueError, match="not a callgrind dump"):
        total_instructions("events: Ir\nfn=(1) main\n0 5\n")


def test_counts_are_per_call_and_against_the_durable_floor() -> None:
    counts = [
        Count("floor", 300, 300 * 700_000),
        Count("durable-floor", 300, 300 * 1_000_000),
        Count("gateway", 300, 300 * 2_140_000),
    ]

    printed = table(counts)

    assert "300 calls" in printed
    assert "2,140,000    2.14 x durable-floor" in printed
    assert "700,000    0.70 x durable-floor" in printed


def test_the_server_runs_under_callgrind_with_a_profile_named_by_its_pid(
    tmp_path: Path,
) -> None:
    command = callgrind(tmp_path / "gateway", ["python", "-m", "server.cli"])

    assert command[:2] == ["valgrind", "--tool=callgrind"]
    assert f"--callgrind-out-file={tmp_path / 'gateway'}.%p" in command
    assert command[-3:] == ["python", "-m", "server.cli"]
