"""Loads OpenTelemetry tracing, only when ``--otel`` asks for it."""

from __future__ import annotations

from domain.errors import ConfigurationError
from server.observability.hooks import Tracing


def otel_tracing() -> Tracing:
    """OpenTelemetry tracing configured from ``OTEL_*`` variables (``--otel``)."""
    try:
        from server.observability.tracing import OtelTracing

        return OtelTracing.from_environment()
    except ImportError as error:
        raise ConfigurationError(
            "--otel needs the otel extra: install the gateway with it, pip install '.[otel]'"
            f" in its source tree: {error}"
        ) from error
