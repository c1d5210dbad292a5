"""The Python projection example (examples/python-projection) runs as two instances in one
consumer group and builds its read model completely, each event applied once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "python-projection" / "demo.py"


def test_two_projection_instances_build_the_read_model() -> None:
    finished = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=180, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert "read model complete: 40 orders" in finished.stdout
    # Both instances took part before one of them was stopped.
    assert "'alpha'" in finished.stdout and "'beta'" in finished.stdout


# Instances that open a new read model at the same moment: each process of a pool of
# three waits at a barrier, then opens the same new file and writes to it.
CONCURRENT_OPENS = """
import multiprocessing, os, sys
sys.path.insert(0, sys.argv[1])
from projection import open_read_model

def open_and_write(path, barrier):
    barrier.wait()
    try:
        db = open_read_model(path)
        db.execute("INSERT INTO applied_events VALUES (?)", (str(os.getpid()),))
        return "ok"
    except Exception as error:
        return repr(error)

if __name__ == "__main__":
    with multiprocessing.Manager() as manager, multiprocessing.Pool(3) as pool:
        for attempt in range(30):
            path = os.path.join(sys.argv[2], f"read-model-{attempt}.db")
            barrier = manager.Barrier(3)
            print(*pool.starmap(open_and_write, [(path, barrier)] * 3))
"""


def test_instances_opening_a_new_read_model_together_all_open_it(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", CONCURRENT_OPENS, str(DEMO.parent), str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    results = finished.stdout.split()
    assert results == ["ok"] * 90, finished.stdout
