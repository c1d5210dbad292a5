"""Records (events, the store's records) are immutable to the type checker, which is the
only guard they have: ``domain.records`` leaves them unguarded at run time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = """
from domain.events import StockReserved
from domain.ports import NewEvent

event = StockReserved(product_id="p", order_id="o", quantity=1, available_after=0)
event.quantity = 2
new = NewEvent("e", "product-p", 1, "StockReserved", b"{}")
new.data = b""
StockReserved("p", "o", 1, 0)
"""


def test_assigning_a_field_of_a_record_is_a_type_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    monkeypatch.chdir(ROOT)
    report, errors, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", os.devnull, str(snippet)]
    )
    assert status == 1, report + errors
    found = [line.split(": error: ", 1)[1] for line in report.splitlines() if ": error: " in line]
    assert found == [
        'Property "quantity" defined in "StockReserved" is read-only  [misc]',
        'Property "data" defined in "NewEvent" is read-only  [misc]',
        'Too many positional arguments for "StockReserved"  [call-arg]',
    ]
