"""A serving process raises its open-file limit: each client connection is a file."""

from __future__ import annotations

import asyncio
import resource
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving import (
    free_port,
    gateway_log,
    signal_until_exit,
    start_gateway,
    wait_until_serving,
)

SOFT_LIMIT = 256
CONNECTIONS = 400
"""More connections than the soft limit allows open files."""

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def open_file_limits(pid: int) -> tuple[str, str]:
    """The soft and hard limits on open files of process ``pid``, as /proc shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-file limit for {pid}")


async def health_over_connections(target: str, count: int) -> list[int]:
    """Health through each of ``count`` connections open at once, one call at a time
    (health takes a tenth of the concurrent calls)."""
    # A private subchannel pool gives each channel its own connection.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
        statuses = []
        for channel in channels:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            statuses.append(reply.status)
        return statuses
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def test_serve_raises_its_open_file_limit_so_that_clients_past_the_soft_one_connect(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * CONNECTIONS:
        pytest.skip(f"the hard limit on open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 2 * CONNECTIONS:
        pytest.skip(f"this test's own limit on open files is {soft}")
    target = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        ["serve", "--listen", target, "--store", f"sqlite:///{tmp_path / 'events.db'}"],
        open_files=SOFT_LIMIT,
    )
    try:
        asyncio.run(wait_until_serving(target, gateway))
        served_soft, served_hard = open_file_limits(gateway.pid)
        assert served_soft == served_hard
        statuses = asyncio.run(health_over_connections(target, CONNECTIONS))
        assert statuses == [health_pb2.HealthCheckResponse.SERVING] * CONNECTIONS
        assert "File descriptor limit reached" not in gateway_log(gateway)
    finally:
        signal_until_exit(gateway)
        gateway.wait(timeout=10)
