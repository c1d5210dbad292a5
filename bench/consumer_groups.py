"""Consumer-group delivery against Subscribe's catch-up, on the same backlog, in one run.

    python -m bench.consumer_groups [--store sqlite|postgresql://…] [--events 100000]
                                    [--members 1,2,4] [--rounds 2]

A store of ``--events`` events is built straight through the store (as the catch-up
benchmark does), one gateway serves it, and then, round after round, interleaved so that
the machine's load falls on all of them alike:

- the baseline: one client subscribes from position 0 and counts every event;
- for each member count: a new group (16 partitions, from the beginning) and that many
  members, in one client process, each acking every delivery (in batches: what
  arrived while the last ack was being sent); timed from the
  first join until every event has been acked.

Printed: events/s of each, the ratio to the Subscribe rate of the same round, and the
gateway's peak RSS during each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from bench.servers import start_gateway
from bench.stores import StoreSpec
from bench.subscriptions import (
    STREAM_TIMEOUT,
    build_store,
    catch_up_client,
    client_pool,
    in_client_process,
    with_rss_samples,
)

PARTITIONS = 16
MAX_IN_FLIGHT = 1000
ACK_DELAY = 0.005
"""Seconds a member lets acks gather before it sends them (unless it has ``ACK_BATCH``)."""
ACK_BATCH = 200


@dataclass(frozen=True)
class Row:
    round: int
    what: str
    events: int
    seconds: float
    peak_rss_mb: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


class AckBatcher:
    """Acks a member's deliveries as a client should: whatever was handled while the
    previous ack message was being written goes out in the next one (``Ack`` takes a list),
    so a backlog costs a handful of ack messages, not one per event."""

    def __init__(self, call: Any, on_acked: Callable[[list[str]], None]) -> None:
        self._call = call
        self._on_acked = on_acked
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def ack(self, event_id: str) -> None:
        self._pending.append(event_id)
        self._wake.set()

    def close(self) -> None:
        self._writer.cancel()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < ACK_BATCH:
                await asyncio.sleep(ACK_DELAY)
            batch, self._pending = self._pending, []
            await self._call.write(pb.ConsumeRequest(ack=pb.Ack(event_ids=batch)))
            self._on_acked(batch)


async def _drain(target: str, group: str, members: int, expected: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        await stub.CreateConsumerGroup(
            pb.CreateConsumerGroupRequest(
                name=group, settings=pb.ConsumerGroupSettings(partitions=PARTITIONS)
            )
        )
        acked: set[str] = set()
        done = asyncio.Event()

        def count(batch: list[str]) -> None:
            acked.update(batch)
            if len(acked) >= expected:
                done.set()

        async def member(n: int) -> None:
            call = stub.Consume(timeout=STREAM_TIMEOUT)
            join = pb.Join(group=group, member_id=f"m{n}", max_in_flight=MAX_IN_FLIGHT)
            await call.write(pb.ConsumeRequest(join=join))
            acks = AckBatcher(call, count)
            try:
                async for response in call:
                    if response.WhichOneof("message") == "delivery":
                        acks.ack(response.delivery.event.event_id)
            finally:
                acks.close()

        started = time.perf_counter()
        tasks = [asyncio.create_task(member(n)) for n in range(members)]
        await asyncio.wait_for(done.wait(), STREAM_TIMEOUT)
        elapsed = time.perf_counter() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stub.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name=group))
    return len(acked), elapsed


def drain_client(target: str, group: str, members: int, expected: int) -> tuple[int, float]:
    """In a client process: ``members`` members of a new group ack ``expected`` events."""
    return asyncio.run(_drain(target, group, members, expected))


async def measure(
    spec: StoreSpec, events: int, member_counts: Sequence[int], rounds: int, workdir: Path
) -> list[Row]:
    rows: list[Row] = []
    with spec.fresh(workdir, "consumer-groups") as url:
        head = await build_store(url, events)
        async with await start_gateway(url, workdir) as gateway:
            with client_pool() as pool:
                for round_ in range(1, rounds + 1):
                    (count, seconds), rss = await with_rss_samples(
                        gateway.rss_bytes,
                        in_client_process(pool, catch_up_client, gateway.target, head),
                    )
                    rows.append(Row(round_, "Subscribe catch-up", count, seconds, rss))
                    _print(rows[-1], rows)
                    for members in member_counts:
                        group = f"bench-{round_}-{members}"
                        (count, seconds), rss = await with_rss_samples(
                            gateway.rss_bytes,
                            in_client_process(
                                pool, drain_client, gateway.target, group, members, head
                            ),
                        )
                        what = f"group, {members} member{'s' * (members > 1)}"
                        rows.append(Row(round_, what, count, seconds, rss))
                        _print(rows[-1], rows)
    return rows


def _print(row: Row, rows: list[Row]) -> None:
    baseline = next(
        r for r in rows if r.round == row.round and r.what.startswith("Subscribe")
    ).events_per_s
    print(
        f"round {row.round}  {row.what:<22} {row.events:>9,} events  "
        f"{row.events_per_s:>10,.0f} events/s  {row.events_per_s / baseline:5.2f} x Subscribe  "
        f"peak RSS {row.peak_rss_mb:6.0f} MB",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.consumer_groups",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", default="sqlite", help="sqlite or postgresql://…")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--members", default="1,2,4", help="member counts, comma-separated (default 1,2,4)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.members.split(",") if n]
    spec = StoreSpec.parse(args.store)
    if spec.kind == "memory":
        parser.error("a memory store cannot be filled before the gateway starts")
    with tempfile.TemporaryDirectory(prefix="order-gateway-bench-groups-") as scratch:
        asyncio.run(measure(spec, args.events, counts, args.rounds, Path(scratch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
