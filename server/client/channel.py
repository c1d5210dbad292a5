"""Channels and credentials for the CLI's client commands (tail, group, consume, health)."""

from __future__ import annotations

import os

import grpc

from server.config import read_setting_file

TOKEN_VARIABLE = "ORDER_GATEWAY_TOKEN"

Metadata = tuple[tuple[str, str], ...]


def open_channel(target: str, tls_ca: str | None) -> grpc.Channel:
    """Plaintext, or TLS trusting the CA certificate(s) in the PEM file ``tls_ca``."""
    if tls_ca is None:
        return grpc.insecure_channel(target)
    roots = read_setting_file("--tls-ca", tls_ca)
    if b"-----BEGIN CERTIFICATE-----" not in roots:
        raise ValueError(f"--tls-ca {tls_ca}: no PEM certificate in it")
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))


def call_metadata(token: str | None) -> Metadata:
    """``authorization: Bearer`` with ``--token``, else ``ORDER_GATEWAY_TOKEN``, else none.

    Sent as call metadata rather than call credentials, so that it also reaches a
    server listening in plaintext on loopback."""
    token = (token or os.environ.get(TOKEN_VARIABLE) or "").strip()
    if not all(" " <= character <= "~" for character in token):
        # gRPC metadata carries printable ASCII only: grpc would fail the call as INTERNAL.
        raise ValueError(f"--token (or {TOKEN_VARIABLE}): a token is printable ASCII only")
    return (("authorization", f"Bearer {token}"),) if token else ()
