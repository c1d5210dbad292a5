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
