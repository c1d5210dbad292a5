"""How fast ``order-gateway verify`` reads and checks a log, in events per second.

Builds a consistent log (every product restocked, then orders placed, each with its
reservation) straight into the store in large commits, then runs the same check as
``order-gateway verify``.

    python -m bench.verify_rate [--events 1000000] [--store URL]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench import workload
from domain import events as domain_events
from domain.mapper import to_new_event
from domain.ports import NewEvent
from server.stores.factory import open_store
from server.verify import Report, verify

COMMIT_EVENTS = 2_000
PRODUCTS = 100


def _order_events(order_id: str, product: str, available_after: int) -> tuple[NewEvent, ...]:
    price = domain_events.MoneyAmount(currency_code="EUR", units=10)
    created = domain_events.OrderCreated(
        order_id=order_id,
        customer_id=order_id,
        items=(
            domain_events.OrderedItem(
                product_id=product, quantity=1, unit_price=price, line_total=price
            ),
        ),
        shipping_address=domain_events.ShippingAddress(
            recipient="Ada Lovelace", line1="1 Analytical St", city="London", country_code="GB"
        ),
        total=price,
    )
    reserved = domain_events.StockReserved(
        product_id=product, order_id=order_id, quantity=1, available_after=available_after
    )
    return (
        to_new_event(created, str(uuid.uuid4()), f"order-{order_id}", 1),
        to_new_event(reserved, str(uuid.uuid4()), f"product-{product}", 0),
    )


async def build_log(url: str, events: int) -> int:
    """A consistent log of about ``events`` events; returns its head position."""
    store = await open_store(url)
    versions: dict[str, int] = {}
    available: dict[str, int] = {}
    try:
        appended = 0
        pair = 0
        while appended < events:
            batch: list[NewEvent] = []
            expected: dict[str, int] = {}
            while len(batch) < COMMIT_EVENTS and appended + len(batch) < events:
                product = workload.product_id(pair % PRODUCTS)
                stream = f"product-{product}"
                pair += 1
                version = versions.get(stream, 0)
                expected.setdefault(stream, version)
                if version == 0:
                    restocked = domain_events.ProductRestocked(
                        product_id=product,
                        quantity=workload.RESTOCK_QUANTITY,
                        available_after=workload.RESTOCK_QUANTITY,
                    )
                    batch.append(to_new_event(restocked, str(uuid.uuid4()), stream, 1))
                    versions[stream] = version = 1
                    available[stream] = workload.RESTOCK_QUANTITY
                available[stream] -= 1
                order_id = str(uuid.uuid4())
                created, reserved = _order_events(order_id, product, available[stream])
                expected[created.stream_id] = 0
                versions[stream] = version + 1
                batch += [created, NewEvent(
                    reserved.event_id, stream, version + 1, reserved.event_type,
                    reserved.data, reserved.schema_version,
                )]  # fmt: skip
            await store.append(workload.raw_commit(expected, batch))
            appended += len(batch)
        return await store.head_position()
    finally:
        await store.close()


async def measure(url: str) -> Report:
    store = await open_store(url)
    try:
        return await verify(store)
    finally:
        await store.close()


async def main_async(events: int, url: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = url or f"sqlite:///{Path(tmp) / 'log.db'}"
        await build_log(target, events)
        report = await measure(target)
    for line in report.lines():
        print(line)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--store", help="an empty store's URL (default: SQLite, temporary)")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.events, args.store))


if __name__ == "__main__":
    main()
