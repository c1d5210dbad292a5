"""docs/configuration.md is generated from the Settings model and must be committed fresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import config_docs
from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "configuration.md"


def test_committed_configuration_doc_is_up_to_date() -> None:
    assert COMMITTED.read_text() == config_docs.render(), (
        "docs/configuration.md is stale: run `python -m server.config_docs` and commit the result"
    )


def test_every_setting_has_a_row_with_its_variable_and_description() -> None:
    rendered = config_docs.render()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description for the docs"
        assert f"| {name} | " in rendered
        assert f"`ORDER_GATEWAY_{name.upper()}`" in rendered


def test_flags_are_the_ones_serve_accepts() -> None:
    flags = config_docs.serve_flags()
    assert flags["metrics_listen"] == "--metrics-listen"
    assert flags["otel"] == "--otel"
    assert "shutdown_grace" not in flags  # no flag: the variable only


def test_check_mode_reports_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "configuration.md"
    assert config_docs.main(["--output", str(output), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_docs.main(["--output", str(output)]) == 0
    assert config_docs.main(["--output", str(output), "--check"]) == 0
