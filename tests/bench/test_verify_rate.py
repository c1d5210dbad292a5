"""``python -m bench.verify_rate``: the log it builds is one the gateway could have
written, so that its figure is that of a check that passes (a violation would be counted
and listed, a different amount of work)."""

from __future__ import annotations

from pathlib import Path

from bench.verify_rate import build_log, measure


async def test_the_log_it_builds_passes_verify(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    head = await build_log(url, 400)
    report = await measure(url)
    assert report.ok, report.lines()
    assert report.events == head >= 400
