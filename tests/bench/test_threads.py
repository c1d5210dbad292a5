"""``python -m bench.threads``: each thread's CPU between two readings, per call, grouped
as the event loop (the main thread), the other threads busiest first, and grpc's."""

from __future__ import annotations

import os
import threading

import pytest

from bench.threads import ThreadTime, split, table, thread_times

PID = 100


def test_a_split_groups_threads_and_divides_by_calls() -> None:
    before = {
        PID: ThreadTime("python", 1.0, 0.5),
        101: ThreadTime("python", 0.2, 0.1),
        102: ThreadTime("event_engine", 0.0, 0.0),
        103: ThreadTime("event_engine", 0.1, 0.1),
    }
    after = {
        PID: ThreadTime("python", 3.0, 1.5),
        101: ThreadTime("python", 0.4, 0.2),
        102: ThreadTime("event_engine", 0.1, 0.1),
        103: ThreadTime("event_engine", 0.2, 0.2),
        104: ThreadTime("python", 0.8, 0.2),  # started between the readings
        105: ThreadTime("python", 0.0, 0.0),
    }

    measured = split(PID, before, after, calls=1_000)

    assert measured.loop == pytest.approx((2.0, 1.0))
    assert [pytest.approx(pair) for pair in measured.other_python] == [(0.8, 0.2), (0.2, 0.1)]
    assert measured.event_engine == pytest.approx((0.2, 0.2))
    assert measured.total == pytest.approx(4.7)
    assert "event loop" in table(16, {"gateway": measured})


def test_thread_times_reads_this_process() -> None:
    done = threading.Event()
    worker = threading.Thread(target=done.wait)
    worker.start()
    try:
        times = thread_times(os.getpid())
    finally:
        done.set()
        worker.join()
    assert os.getpid() in times
    assert len(times) >= 2
    assert all(t.user >= 0 and t.system >= 0 for t in times.values())
