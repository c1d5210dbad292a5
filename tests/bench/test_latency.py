"""``python -m bench.latency``: each step of a call timed inside the servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.latency import GATEWAY, measure, table
from bench.latency_probe import Call, summary
from bench.servers import DURABLE_FLOOR_ON_LOOP


def _call(start: float, steps: list[tuple[str, float]], waits: list[tuple[float, float]]) -> Call:
    marks = [("handler", start)]
    at = start
    for step, took in steps:
        at += took
        marks.append((step, at))
    return Call(marks, waits)


def test_a_step_is_the_median_over_calls_of_the_commonest_sequence_and_its_waits() -> None:
    usual = [("append begun", 1e-6), ("end", 2e-6)]
    calls = [
        _call(0.0, usual, [(0.5e-6, 2.0e-6)]),  # waited 0.5 µs in the first step, 1 in the second
        _call(10.0, usual, []),
        _call(20.0, usual, [(20.0, 20.003)]),  # a wait across both steps
        # A call refused before its append: another sequence, left out.
        _call(30.0, [("end", 5e-6)], []),
    ]
    figures = summary(calls)
    assert figures["calls"] == 3
    assert figures["of"] == 4
    first, second = figures["steps"]
    assert (first["from"], first["to"]) == ("handler", "append begun")
    assert first["us"] == pytest.approx(1.0)
    assert first["waited_us"] == pytest.approx(0.5)
    assert (second["from"], second["to"]) == ("append begun", "end")
    assert second["us"] == pytest.approx(2.0)
    assert second["waited_us"] == pytest.approx(1.0)
    assert figures["total_us"] == pytest.approx(3.0)


def test_no_call_timed_is_said_so() -> None:
    assert summary([]) == {"calls": 0, "steps": []}


HANDLER_STEPS = [
    "handler",
    "append begun",
    "append returned",
    "response 1 handed to grpc",
    "response 1 sent",
    "response 2 handed to grpc",
    "response 2 sent",
]
"""What both servers' handlers do; the gateway reads its request before, and ends its
call's scopes after."""


@pytest.mark.parametrize(
    ("server", "steps"),
    [
        (GATEWAY, ["call", *HANDLER_STEPS, "handler returned", "end"]),
        (DURABLE_FLOOR_ON_LOOP, [*HANDLER_STEPS, "end"]),
    ],
)
def test_each_server_is_timed_at_every_step_of_its_calls(
    server: str, steps: list[str], tmp_path: Path
) -> None:
    timed = asyncio.run(measure(server, 0.5, tmp_path, 1))
    names = [timed.steps["steps"][0]["from"], *(s["to"] for s in timed.steps["steps"])]
    assert names == steps
    assert timed.steps["calls"] > 10
    assert timed.p50_ms > 0
    # The append waits for an fsync: never nothing, and on the loop never in select.
    append = next(s for s in timed.steps["steps"] if s["from"] == "append begun")
    assert append["us"] > 0
    assert append["waited_us"] == 0
    assert "append begun -> append returned" in table({server: [timed]})
