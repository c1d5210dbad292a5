"""How fast ``order-gateway verify`` reads and checks a log, in events per second.

Builds a consistent log (every product restocked, then orders placed, each with its
reservation) straight into the store, one command per commit as the gateway writes them,
then runs the same check as ``order-gateway verify``.

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
from domain.ports import Commit
from server.stores.factory import open_store
from server.verify import Report, verify

PRODUCTS = 100


def _restock(product: str) -> Commit:
    restocked = domain_events.ProductRestocked(
        product_id=product,
        quantity=workload.RESTOCK_QUANTITY,
        available_after=workload.RESTOCK_QUANTITY,
    )
    stream = f"product-{product}"
    return workload.raw_commit({stream: 0}, [to_new_event(restocked, str(uuid.uuid4()), stream, 1)])


def _order(product: str, version: int, available_after: int) -> Commit:
    """An order of one item of ``product``, whose stream is at ``version``."""
    order_id = str(uuid.uuid4())
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
    order_stream, product_stream = f"order-{order_id}", f"product-{product}"
    return workload.raw_commit(
        {order_stream: 0, product_stream: version},
        [
            to_new_event(created, str(uuid.uuid4()), order_stream, 1),
            to_new_event(reserved, str(uuid.uuid4()), product_stream, version + 1),
        ],
    )


async def build_log(url: str, events: int) -> int:
    """A consistent log of about ``events`` events, one command per commit as the gateway
    writes them: every product restocked, then orders of one item, each with its
    reservation. Commits on different products are appended together, for the store to
    commit in groups. Returns the log's head position."""
    store = await open_store(url)
    products = [workload.product_id(n) for n in range(PRODUCTS)]
    try:
        await asyncio.gather(*(store.append(_restock(product)) for product in products))
        versions = dict.fromkeys(products, 1)
        available = dict.fromkeys(products, workload.RESTOCK_QUANTITY)
        appended = len(products)
        while appended < events:
            commits: list[Commit] = []
            for product in products[: max(1, (events - appended) // 2)]:
                available[product] -= 1
                commits.append(_order(product, versions[product], available[product]))
                versions[product] += 1
            await asyncio.gather(*(store.append(commit) for commit in commits))
            appended += 2 * len(commits)
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
    parser = argparse.ArgumentParser(
        prog="python -m bench.verify_rate", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--store", help="an empty store's URL (default: SQLite, temporary)")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.events, args.store))


if __name__ == "__main__":
    main()
