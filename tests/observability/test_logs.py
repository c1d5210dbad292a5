"""The log formats: a record's line, and the same line made from its parts."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from server.observability.logs import (
    GRPC_LOGGER,
    GatewayFormatter,
    JsonFormatter,
    TextFormatter,
    quiet_client_noise,
)

# A quarter of a second apart: several lines in one second, then the next seconds.
TIMES = [1764425341.8349 + n * 0.25 for n in range(9)]


def record(
    created: float, exc_info: bool = False, stack_info: bool = False, **extra: object
) -> logging.LogRecord:
    made = logging.LogRecord(
        "order_gateway.server", logging.ERROR, __file__, 1, "failed %s", ("here",), None
    )
    made.created = created
    made.msecs = int((created - int(created)) * 1000) + 0.0
    if exc_info:
        try:
            raise RuntimeError("disk on fire")
        except RuntimeError:
            made.exc_info = sys.exc_info()
    if stack_info:
        made.stack_info = "Stack (most recent call last):\n  somewhere"
    made.__dict__.update(extra)
    return made


@pytest.mark.parametrize("worker", [None, 3])
@pytest.mark.parametrize(("exc_info", "stack_info"), [(False, False), (True, True)])
def test_text_lines_are_those_of_the_documented_format(
    worker: int | None, exc_info: bool, stack_info: bool
) -> None:
    tag = f" [worker {worker}]" if worker is not None else ""
    documented = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    formatter = TextFormatter(worker)
    for created in TIMES:
        assert formatter.format(record(created, exc_info, stack_info)) == documented.format(
            record(created, exc_info, stack_info)
        )


def test_json_lines_carry_the_fields_after_the_message_and_the_exception_last() -> None:
    created = TIMES[0]
    line = JsonFormatter(worker=2).format(
        record(created, exc_info=True, fields={"code": "OK", "duration_ms": 1.5})
    )
    entry = json.loads(line)
    assert list(entry) == [
        "time",
        "level",
        "logger",
        "message",
        "worker",
        "code",
        "duration_ms",
        "exception",
    ]
    # To the millisecond: an access log's batched lines share their seconds.
    second = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(created))
    zone = time.strftime("%z", time.localtime(created))
    assert entry["time"] == f"{second}.{int(created * 1000) % 1000:03d}{zone}"
    assert entry["message"] == "failed here"
    assert entry["exception"].endswith("RuntimeError: disk on fire")
    assert line == json.dumps(entry, default=str)


@pytest.mark.parametrize("formatter", [TextFormatter(), TextFormatter(3), JsonFormatter(3)])
def test_a_line_made_from_its_parts_is_the_line_of_its_record(
    formatter: GatewayFormatter,
) -> None:
    fields = {"method": "/orders.v1.OrderCommandService/CreateOrder", "duration_ms": 1.25}
    for created in TIMES:
        made = record(created, fields=fields)
        assert formatter.line(
            created, made.msecs, "ERROR", "order_gateway.server", "failed here", fields
        ) == formatter.format(made)


def test_times_follow_the_converter_and_formats_set_on_logging_formatter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Applications set these on logging.Formatter to log in UTC, or with a "." before
    # the milliseconds.
    monkeypatch.setattr(logging.Formatter, "converter", time.gmtime)
    monkeypatch.setattr(logging.Formatter, "default_msec_format", "%s.%03d")
    documented = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter = TextFormatter()
    for created in TIMES:
        assert formatter.format(record(created)) == documented.format(record(created))
    assert formatter.formatTime(record(TIMES[0]), "%H") == time.strftime(
        "%H", time.gmtime(TIMES[0])
    )


def test_grpcs_error_for_a_send_to_a_client_that_went_away_is_kept_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_client_noise()
    grpc_log = logging.getLogger(GRPC_LOGGER)
    with caplog.at_level(logging.INFO):
        try:
            raise RuntimeError("Failed execute_batch: (<grpc_status_code.UNKNOWN: 2>,)")
        except RuntimeError:
            grpc_log.exception(
                "ExecuteBatchError raised in core by servicer method"
                " [/orders.v1.EventStreamService/Subscribe]"
            )
        grpc_log.error("Unexpected [RuntimeError] raised by servicer method [/x/Y]")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "Unexpected [RuntimeError] raised by servicer method [/x/Y]")
    ]
    assert "execute_batch" not in caplog.text


def test_grpcs_error_for_metadata_that_is_not_utf8_is_kept_at_debug_without_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet_client_noise()
    grpc_log = logging.getLogger(GRPC_LOGGER)
    # As under ``serve``: the level on the root logger, a handler with none of its own.
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    monkeypatch.setattr(handler, "emit", seen.append)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    value = b"Bearer s3cret-\xff"
    try:
        value.decode()
    except UnicodeDecodeError:
        grpc_log.exception("Invalid encoding on %s", value)
    assert seen == []
    root.setLevel(logging.DEBUG)
    grpc_log.error("Invalid encoding on %s", value)
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in seen] == [
        ("DEBUG", "a metadata value is not UTF-8: read as Latin-1", None)
    ]
