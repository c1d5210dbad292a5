"""Metrics, the access log and tracing."""
