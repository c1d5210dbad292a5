"""SQLite appends per second with group commit, against one transaction (one fsync) per commit.

Each commit has the shape of a CreateOrder: three events on three streams (the order and
two products), each product stream advancing with its expected version. ``--in-flight``
appends are kept waiting at once, as concurrent RPCs would; ``max_batch=1`` gives every
commit its own transaction and fsync, which is what group commit saves.

    python -m bench.group_commit [--seconds 1] [--rounds 5] [--in-flight 256]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from domain.ports import Commit, NewEvent
from server.stores.sqlite import SQLiteEventStore

PAYLOAD = b'{"order_id": "%s", "quantity": 1, "available_after": 100}' + b" " * 300
"""About the size of a serialised OrderCreated."""


async def run(path: Path, max_batch: int, seconds: float, in_flight: int) -> float:
    """Commits per second appended by ``in_flight`` concurrent writers for ``seconds``."""
    store = await SQLiteEventStore.open(path, max_batch=max_batch)
    deadline = time.perf_counter() + seconds
    committed = 0

    async def writer(n: int) -> None:
        nonlocal committed
        version = 0
        while time.perf_counter() < deadline:
            order = f"order-{uuid.uuid4()}"
            streams = [(order, 1), (f"product-{n}-a", version + 1), (f"product-{n}-b", version + 1)]
            await store.append(
                Commit(
                    command_id=str(uuid.uuid4()),
                    fingerprint="bench",
                    correlation_id="",
                    user_id="",
                    occurred_at=dt.datetime.now(dt.UTC),
                    expected_versions={stream: v - 1 for stream, v in streams},
                    events=[
                        NewEvent(str(uuid.uuid4()), stream, v, "Bench", PAYLOAD % order.encode())
                        for stream, v in streams
                    ],
                )
            )
            version += 1
            committed += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(in_flight)))
    elapsed = time.perf_counter() - started
    await store.close()
    return committed / elapsed


async def main_async(seconds: float, in_flight: int, rounds: int) -> None:
    modes = (
        ("one fsync per commit, 1 in flight", 1, 1),
        (f"one fsync per commit, {in_flight} in flight", 1, in_flight),
        (f"group commit (<=128), {in_flight} in flight", 128, in_flight),
    )
    rates: list[list[float]] = [[] for _ in modes]
    with tempfile.TemporaryDirectory() as tmp:
        # Modes take turns, round after round, so that a busy disk or CPU weighs on all.
        for round_ in range(rounds):
            for (_, max_batch, writers), measured in zip(modes, rates, strict=True):
                path = Path(tmp) / f"{max_batch}-{writers}-{round_}.db"
                measured.append(await run(path, max_batch, seconds, writers))
    medians = [statistics.median(measured) for measured in rates]
    print(f"SQLite appends of 3-event commits, median of {rounds} rounds of {seconds} s")
    print(f"{'':<44} {'commits/s':>10} {'events/s':>10} {'min..max commits/s':>20}")
    for (label, _, _), median, measured in zip(modes, medians, rates, strict=True):
        spread = f"{min(measured):,.0f}..{max(measured):,.0f}"
        print(f"{label:<44} {median:>10,.0f} {3 * median:>10,.0f} {spread:>20}")
    print(f"group commit speed-up at {in_flight} in flight: {medians[2] / medians[1]:.1f}x")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.group_commit",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.seconds, args.in_flight, args.rounds))


if __name__ == "__main__":
    main()
