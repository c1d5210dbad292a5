"""``order-gateway health``: ask a gateway's gRPC health service whether it is SERVING.

For container health checks (the Dockerfile's HEALTHCHECK): exit status 0 when SERVING,
1 otherwise (NOT_SERVING, unreachable, or no answer within the timeout).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client.channel import open_channel

WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}


def local_target(listen: str) -> str:
    """Where to reach a gateway listening on ``listen`` from the same host.

    ``0.0.0.0:50051`` (every interface) is reached at ``127.0.0.1:50051``.
    """
    host, _, port = listen.rpartition(":")
    return f"{WILDCARDS.get(host, host)}:{port}"


def check_health(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
) -> int:
    """Print the status of ``service`` ("": the whole server); return the exit status.

    Plaintext, or TLS trusting the CA certificate(s) in the PEM file ``tls_ca`` (the
    server's certificate holding ``tls_server_name``, default the target's host)."""
    with open_channel(target, tls_ca, tls_server_name) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"{target}: {_failure(error, service)}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _failure(error: grpc.RpcError, service: str) -> str:
    """The failed call's status and its details, as the other client commands print them:
    the code alone (UNAVAILABLE) would not tell a refused connection from a TLS mismatch.

    grpc's health service answers a service it does not know NOT_FOUND without a reason:
    the reason printed then names the service."""
    if not isinstance(error, grpc.Call):
        return "error"
    code = error.code()
    reason = error.details() or ""
    if not reason and code == grpc.StatusCode.NOT_FOUND:
        reason = f"unknown service {service!r}"
    return f"{code.name}: {reason}" if reason else code.name
