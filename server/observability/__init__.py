"""What the gateway tells its operators: metrics, the access log, logs and tracing.

``interceptor`` observes every RPC and hands its outcome to the observers declared in
``hooks``; ``tracing`` (OpenTelemetry) is loaded only with ``--otel`` (``otel``).
"""
