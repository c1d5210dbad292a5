"""Helpers for tests that run the gateway as a separate process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_gateway(
    args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``order-gateway <args>`` as a child process (stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_until_serving(
    target: str, process: subprocess.Popen[bytes], within: float = 30
) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(
                    f"gateway exited: {process.stderr.read().decode() if process.stderr else ''}"
                )
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"gateway at {target} not serving after {within} s")
