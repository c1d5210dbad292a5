"""Log configuration: readable text by default, one JSON object per line on request.

Both formats make a line from its parts in ``GatewayFormatter.line``, which formats
records too: the access log calls it directly, without a LogRecord, when the handler
installed here is the only one its lines would reach (see ``sole_gateway_handler``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import ClassVar, TextIO

_JSON = json.JSONEncoder(default=str)
"""What ``json.dumps(entry, default=str)`` builds anew for each line."""


class GatewayFormatter(logging.Formatter):
    """The gateway's formats: a line from its parts, and each second's time text once.

    ``time.localtime`` and ``time.strftime`` cost about 13,000 instructions per line, the
    same for every line logged within one second.
    """

    uses_fields: ClassVar[bool] = True
    """Whether ``line`` writes its ``fields`` (the JSON format's)."""

    def __init__(self, worker: int | None, datefmt: str | None = None) -> None:
        super().__init__(datefmt=datefmt)
        self._worker = worker
        self._second: tuple[int, str] = (-1, "")
        """The last second formatted and its text: one tuple, so that threads read both
        parts of one value."""

    def line(
        self,
        created: float,
        msecs: float,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, object],
    ) -> str:
        """The line of a record with these attributes (``fields`` as given in ``extra``),
        without its exception or stack."""
        raise NotImplementedError

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt != self.datefmt:
            return super().formatTime(record, datefmt)
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        second = int(created)
        cached = self._second
        if cached[0] != second:
            # The converters (localtime, gmtime) ignore fractions of a second.
            text = time.strftime(self.datefmt or self.default_time_format, self.converter(created))
            cached = self._second = (second, text)
        if not self.datefmt and self.default_msec_format:
            return self.default_msec_format % (cached[1], msecs)
        return cached[1]


class TextFormatter(GatewayFormatter):
    """``2026-11-29 14:09:01,834 INFO logger: message``, ``[worker N]`` after the logger."""

    uses_fields = False

    def __init__(self, worker: int | None = None) -> None:
        super().__init__(worker)
        self._tag = f" [worker {worker}]" if worker is not None else ""

    def usesTime(self) -> bool:
        return True

    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._text(record.asctime, record.levelname, record.name, record.message)

    def line(
        self,
        created: float,
        msecs: float,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, object],
    ) -> str:
        return self._text(self._time(created, msecs), level, logger, message)

    def _text(self, asctime: str, level: str, logger: str, message: str) -> str:
        return f"{asctime} {level} {logger}{self._tag}: {message}"


class JsonFormatter(GatewayFormatter):
    """One JSON object a line, its time ISO 8601 to the millisecond (lines of the access
    log come in batches: whole seconds would not order them)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__(worker, datefmt="%Y-%m-%dT%H:%M:%S.{:03d}%z")

    def _time(self, created: float, msecs: float) -> str:
        return super()._time(created, msecs).format(int(msecs))

    def format(self, record: logging.LogRecord) -> str:
        return self._json(
            self.formatTime(record, self.datefmt),
            record.levelname,
            record.name,
            record.getMessage(),
            getattr(record, "fields", {}),
            self.formatException(record.exc_info) if record.exc_info else None,
        )

    def line(
        self,
        created: float,
        msecs: float,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, object],
    ) -> str:
        return self._json(self._time(created, msecs), level, logger, message, fields, None)

    def _json(
        self,
        when: str,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, object],
        exception: str | None,
    ) -> str:
        entry: dict[str, object] = {
            "time": when,
            "level": level,
            "logger": logger,
            "message": message,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry.update(fields)
        if exception is not None:
            entry["exception"] = exception
        return _JSON.encode(entry)


class GatewayHandler(logging.StreamHandler[TextIO]):
    """The handler ``configure_logging`` installs, formatting with a ``GatewayFormatter``."""

    def write(self, text: str) -> None:
        """Writes whole lines (terminators included) as ``emit`` writes one record's."""
        self.acquire()
        try:
            self.stream.write(text)
            self.stream.flush()
        finally:
            self.release()


def sole_gateway_handler(
    logger: logging.Logger,
) -> tuple[GatewayHandler, GatewayFormatter] | None:
    """The gateway's handler and its formatter, if they alone would handle ``logger``'s
    records and nothing could filter or change one on the way: then a line made by
    ``GatewayFormatter.line`` and written by ``GatewayHandler.write`` is what
    ``logger.handle`` would have written. None under any other configuration (an
    embedding application's, a test's capture), where records must go through ``logging``.
    """
    if (
        logger.disabled
        or logger.filters
        or type(logger) is not logging.Logger
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        current = current.parent if current.propagate else None
    if type(found) is not GatewayHandler or found.filters:
        return None
    formatter = found.formatter
    if not isinstance(formatter, GatewayFormatter):
        return None
    return found, formatter


def configure_logging(log_format: str, level: str, worker: int | None = None) -> None:
    """``worker``: the number of this ``--workers`` process, put on each of its lines
    (``worker`` in JSON, ``[worker N]`` in text) so that interleaved lines can be told apart."""
    handler = GatewayHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else TextFormatter(worker))
    # Neither format prints the caller's source line, thread or process, and looking them
    # up cost about 9 of the 22 µs of each access log line (the logging HOWTO's
    # "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _ClientNoiseFilter(logging.Filter):
    """Keeps at DEBUG, without a traceback, what grpc logs as errors but what its clients
    cause, not the server:

    - a send that failed because its client went away meanwhile (a Subscribe cancelled
      while a write to it was pending): the call ended CANCELLED, as its access line says;
    - a metadata value that is not UTF-8, which grpc reads as Latin-1: logged twice per
      value with a traceback, so a caller without credentials could write thousands of
      lines with one call. The value itself is left out: it may be a malformed bearer
      token."""

    CANCELLED_SEND = "ExecuteBatchError raised in core by servicer method"
    BAD_ENCODING = "Invalid encoding on "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if record.msg.startswith(self.BAD_ENCODING):
            record.msg, record.args = "a metadata value is not UTF-8: read as Latin-1", None
        elif not record.getMessage().startswith(self.CANCELLED_SEND):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        # Logged at ERROR, it passed the logger's level; at DEBUG it must pass it too
        # (the gateway's handler has no level of its own).
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


CLIENT_NOISE = _ClientNoiseFilter()
GRPC_LOGGER = "grpc._cython.cygrpc"


def quiet_client_noise() -> None:
    """Install ``_ClientNoiseFilter`` on grpc's logger (once, however often called)."""
    logging.getLogger(GRPC_LOGGER).addFilter(CLIENT_NOISE)
