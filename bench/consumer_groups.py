"""Consumer groups: delivery against Subscribe's catch-up, live delivery, memory.

    python -m bench.consumer_groups [--store sqlite|postgresql://…] [--events 100000]
                                    [--members 1,2,4] [--rounds 2] [--live-members 100]

(``python -m bench --sections consumer-groups`` runs the same, beside the other sections.)

Backlog: a store of ``--events`` events is built straight through the store (as the
catch-up benchmark does), one gateway serves it, and then, round after round, interleaved
so that the machine's load falls on all of them alike:

- the baseline: one client subscribes from position 0 and counts every event;
- for each member count: a new group (16 partitions, from the beginning) and that many
  members, in one client process, acking every delivery as a client should (in batches:
  what arrived within 5 ms goes in one ``Ack``); timed from the first join until every
  event has been acked.

Live: on a fresh store, a group (from the end) and its members follow the closed-loop
CreateOrder load of the gRPC section, for 1, 2 and 4 members (16 partitions) and then for
``--live-members`` members (256 partitions, so that each owns some), in two client
processes. Measured: events committed per second, how far the group's checkpoint lags
behind the head when the load ends, how long until every event is acked, and the
gateway's RSS, idle and at its peak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from bench.loadgen import LoadSpec, run_load, split
from bench.report import GroupDrainResult, GroupLiveResult, print_consumer_groups
from bench.servers import restock, start_gateway
from bench.stores import StoreSpec
from bench.subscriptions import (
    MB,
    STREAM_TIMEOUT,
    build_store,
    catch_up_client,
    client_pool,
    in_client_process,
    with_rss_samples,
)

PARTITIONS = 16
MANY_PARTITIONS = 256
"""Partitions of the group with ``--live-members`` members: every member owns some."""
MAX_IN_FLIGHT = 1000
ACK_DELAY = 0.005
"""Seconds a member lets acks gather before it sends them (unless it has ``ACK_BATCH``)."""
ACK_BATCH = 200
CATCH_UP_TIMEOUT = 120.0
"""After a live load, how long the group gets to ack every committed event."""


class AckBatcher:
    """Acks a member's deliveries as a client should: what was handled within ``ACK_DELAY``
    goes out in one message (``Ack`` takes a list). Acking each delivery in a message of
    its own costs the server a message read per event; deliveries arrive one per message,
    so without the delay the batches stay at one id."""

    def __init__(self, call: Any, on_acked: Callable[[list[str]], None]) -> None:
        self._call = call
        self._on_acked = on_acked
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write_forever())

    def ack(self, event_id: str) -> None:
        self._pending.append(event_id)
        self._wake.set()

    async def close(self) -> None:
        # Awaited, not only cancelled: a writer task left pending when asyncio.run closes
        # the loop had grpc report "Event loop is closed" as the client exited.
        self._writer.cancel()
        # A write can also fail once the stream has ended (the group deleted).
        with contextlib.suppress(
            asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError
        ):
            await self._writer

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < ACK_BATCH:
                await asyncio.sleep(ACK_DELAY)
            batch, self._pending = self._pending, []
            await self._call.write(pb.ConsumeRequest(ack=pb.Ack(event_ids=batch)))
            self._on_acked(batch)


async def _member(
    stub: pb_grpc.ConsumerGroupServiceAsyncStub, group: str, member_id: str, on_acked: Any
) -> None:
    """One member: join, ack every delivery, until the stream ends (the group deleted)."""
    call = stub.Consume(timeout=STREAM_TIMEOUT)
    join = pb.Join(group=group, member_id=member_id, max_in_flight=MAX_IN_FLIGHT)
    await call.write(pb.ConsumeRequest(join=join))
    acks = AckBatcher(call, on_acked)
    try:
        async for response in call:
            if response.WhichOneof("message") == "delivery":
                acks.ack(response.delivery.event.event_id)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    finally:
        await acks.close()


async def _create(
    stub: pb_grpc.ConsumerGroupServiceAsyncStub, group: str, partitions: int, from_end: bool
) -> None:
    settings = pb.ConsumerGroupSettings(partitions=partitions, start_from_end=from_end)
    await stub.CreateConsumerGroup(pb.CreateConsumerGroupRequest(name=group, settings=settings))


async def _drain(target: str, group: str, members: int, expected: int) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        await _create(stub, group, PARTITIONS, from_end=False)
        acked: set[str] = set()
        done = asyncio.Event()

        def count(batch: list[str]) -> None:
            acked.update(batch)
            if len(acked) >= expected:
                done.set()

        started = time.perf_counter()
        tasks = [asyncio.create_task(_member(stub, group, f"m{n}", count)) for n in range(members)]
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


async def _follow(target: str, group: str, member_ids: list[str]) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        acked = 0

        def count(batch: list[str]) -> None:
            nonlocal acked
            acked += len(batch)

        await asyncio.gather(*(_member(stub, group, m, count) for m in member_ids))
    return acked


def follow_client(target: str, group: str, member_ids: list[str]) -> int:
    """In a client process: members that ack every delivery until the group is deleted;
    the number of acks sent."""
    return asyncio.run(_follow(target, group, member_ids))


async def _group(stub: pb_grpc.ConsumerGroupServiceAsyncStub, group: str) -> pb.ConsumerGroup:
    response = await stub.GetConsumerGroup(pb.GetConsumerGroupRequest(name=group))
    return response.group


async def _until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polls the gateway
            await asyncio.sleep(0.05)


async def measure_backlog(
    spec: StoreSpec,
    events: int,
    member_counts: Sequence[int],
    rounds: int,
    workdir: Path,
    report: Callable[[GroupDrainResult], None] = lambda _: None,
) -> list[GroupDrainResult]:
    """Subscribe's catch-up and groups of each member count, interleaved by rounds."""
    results: list[GroupDrainResult] = []
    with spec.fresh(workdir, "consumer-groups") as url:
        head = await build_store(url, events)
        async with await start_gateway(url, workdir) as gateway:
            with client_pool() as pool:
                for round_ in range(1, rounds + 1):
                    for members in (0, *member_counts):
                        cpu = gateway.cpu_seconds()
                        client = (
                            in_client_process(pool, catch_up_client, gateway.target, head)
                            if members == 0
                            else in_client_process(
                                pool,
                                drain_client,
                                gateway.target,
                                f"bench-{round_}-{members}",
                                members,
                                head,
                            )
                        )
                        (count, seconds), rss = await with_rss_samples(gateway.rss_bytes, client)
                        cpu = gateway.cpu_seconds() - cpu
                        result = GroupDrainResult(
                            spec.kind, round_, members, count, seconds, rss, cpu / count * 1e6
                        )
                        results.append(result)
                        report(result)
    return results


async def measure_live(
    spec: StoreSpec,
    member_counts: Sequence[int],
    many_members: int,
    load: LoadSpec,
    workdir: Path,
    report: Callable[[GroupLiveResult], None] = lambda _: None,
) -> list[GroupLiveResult]:
    """Groups following CreateOrder load on a fresh store, one member count after another."""
    results: list[GroupLiveResult] = []
    plan = [(n, PARTITIONS) for n in member_counts]
    if many_members:
        plan.append((many_members, MANY_PARTITIONS))
    with spec.fresh(workdir, "consumer-groups-live") as url:
        async with await start_gateway(url, workdir) as gateway:
            await restock(gateway.target)
            live_load = dataclasses.replace(load, target=gateway.target)
            async with grpc.aio.insecure_channel(gateway.target) as channel:
                stub = pb_grpc.ConsumerGroupServiceStub(channel)
                with client_pool() as pool:
                    for members, partitions in plan:
                        result = await _live_once(
                            spec.kind, gateway, stub, pool, members, partitions, live_load
                        )
                        results.append(result)
                        report(result)
    return results


async def _live_once(
    store: str,
    gateway: Any,
    stub: pb_grpc.ConsumerGroupServiceAsyncStub,
    pool: Any,
    members: int,
    partitions: int,
    load: LoadSpec,
) -> GroupLiveResult:
    group = f"live-{members}"
    rss_idle = gateway.rss_bytes() / MB
    await _create(stub, group, partitions, from_end=True)
    ids = [f"{group}-m{n}" for n in range(members)]
    shares = [share for share in split(members, 2) if share]
    clients, start = [], 0
    for share in shares:
        clients.append(
            asyncio.ensure_future(
                in_client_process(
                    pool, follow_client, gateway.target, group, ids[start : start + share]
                )
            )
        )
        start += share

    async def joined() -> bool:
        return len((await _group(stub, group)).members) == members

    try:
        await _until(joined, 60)
        before = (await _group(stub, group)).head_position
        result, peak_loaded = await with_rss_samples(
            gateway.rss_bytes, asyncio.to_thread(run_load, load, store, gateway.cpu_seconds)
        )
        at_end = await _group(stub, group)
        ended = time.perf_counter()

        async def caught_up() -> bool:
            seen = await _group(stub, group)
            return seen.checkpoint >= at_end.head_position

        _, peak_draining = await with_rss_samples(
            gateway.rss_bytes, _until(caught_up, CATCH_UP_TIMEOUT)
        )
        catch_up = time.perf_counter() - ended
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.DeleteConsumerGroup(pb.DeleteConsumerGroupRequest(name=group))
        acked = sum(await asyncio.gather(*clients))
    committed = at_end.head_position - before
    return GroupLiveResult(
        store=store,
        members=members,
        partitions=partitions,
        committed_events=committed,
        acked_events=acked,
        load_seconds=load.duration + load.warmup,
        lag_at_end=at_end.head_position - at_end.checkpoint,
        catch_up_seconds=catch_up,
        create_calls_per_s=result.calls_per_s,
        rss_idle_mb=rss_idle,
        rss_peak_mb=max(peak_loaded, peak_draining),
    )


def drain_line(result: GroupDrainResult) -> str:
    what = (
        "Subscribe catch-up"
        if result.members == 0
        else f"group, {result.members} member{'s' * (result.members > 1)}"
    )
    return (
        f"round {result.round}  {what:<22} {result.events:>9,} events  "
        f"{result.events_per_s:>10,.0f} events/s  "
        f"server CPU {result.server_cpu_us_per_event:5.0f} us/event  "
        f"peak RSS {result.peak_rss_mb:6.0f} MB"
    )


def live_line(result: GroupLiveResult) -> str:
    return (
        f"live   group, {result.members:>3} member{'s' * (result.members > 1):<1} "
        f"({result.partitions} partitions)  {result.committed_events / result.load_seconds:8,.0f} "
        f"events/s committed  lag at the end {result.lag_at_end:,}  "
        f"all acked {result.catch_up_seconds:.1f} s later  "
        f"RSS {result.rss_idle_mb:.0f} MB idle, {result.rss_peak_mb:.0f} MB peak"
    )


def _print(line: str) -> None:
    print(line, flush=True)


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
    parser.add_argument(
        "--live-members",
        type=int,
        default=100,
        help="members of the last live group (default 100; 0 skips it)",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of load per live group (default 5)"
    )
    parser.add_argument("--no-live", action="store_true", help="measure the backlog only")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.members.split(",") if n]
    spec = StoreSpec.parse(args.store)
    if spec.kind == "memory":
        parser.error("a memory store cannot be filled before the gateway starts")
    load = LoadSpec(
        target="", workload="create", concurrency=16, duration=args.duration, warmup=1.0,
        processes=2,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="order-gateway-bench-groups-") as scratch:
        workdir = Path(scratch)
        drained = asyncio.run(
            measure_backlog(
                spec, args.events, counts, args.rounds, workdir, lambda r: _print(drain_line(r))
            )
        )
        live = (
            []
            if args.no_live
            else asyncio.run(
                measure_live(
                    spec, counts, args.live_members, load, workdir, lambda r: _print(live_line(r))
                )
            )
        )
    print()
    print_consumer_groups(drained, live, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
