"""In-process command throughput: the gateway's bus, domain and store with no gRPC, side
by side with the ``eventsourcing`` library doing the same work on the same backend.

The work is a closed loop of "place an order of one unit of a random product, then cancel
it": two commands, four events, two aggregates each. The gateway's commands are built
from plain dicts exactly as the servicers build them (so validation is included), and run
at a chosen number of concurrent callers, so that the store can commit them in groups.
``eventsourcing``'s API is synchronous and one caller is how it is used; it runs with the
same aggregate cache size as the gateway.

Each runs with its production garbage-collector settings: the gateway's path with those
``serve`` applies (``server.app.tune_garbage_collection``), ``eventsourcing`` with
Python's defaults; the defaults are restored after the gateway's run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from bench import es_app, workload
from domain.commands import CancelOrder, CreateOrder, RestockProduct
from server.app import tune_garbage_collection
from server.bootstrap import bootstrap
from server.stores.factory import open_store

PRODUCTS = 100
"""Products the in-process work spreads over (each restocked once, up front)."""


@dataclass(frozen=True)
class InProcessResult:
    system: str
    """"gateway" or "eventsourcing"."""
    backend: str
    concurrency: int
    commands: int
    seconds: float

    @property
    def commands_per_s(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


@contextlib.contextmanager
def gateway_gc_settings() -> Iterator[None]:
    """The garbage-collector settings the gateway runs with, then Python's again."""
    thresholds = gc.get_threshold()
    tune_garbage_collection()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def gateway_commands(
    url: str, backend: str, concurrency: int, duration: float, warmup: float
) -> InProcessResult:
    """Create-then-cancel through ``bootstrap(store)`` and ``bus.dispatch`` for ``duration``."""
    with gateway_gc_settings():
        return await _gateway_commands(url, backend, concurrency, duration, warmup)


async def _gateway_commands(
    url: str, backend: str, concurrency: int, duration: float, warmup: float
) -> InProcessResult:
    store = await open_store(url)
    try:
        bus = bootstrap(store)
        for n in range(PRODUCTS):
            await bus.dispatch(
                RestockProduct.model_validate(
                    {
                        "command_id": "",
                        "product_id": workload.product_id(n),
                        "quantity": workload.RESTOCK_QUANTITY,
                    }
                )
            )
        started = time.perf_counter()
        measure_from = started + warmup
        deadline = measure_from + duration
        counted = 0

        async def caller(seed: int) -> None:
            nonlocal counted
            rng = random.Random(seed)
            customer_id = str(uuid.uuid4())
            while time.perf_counter() < deadline:
                created = await bus.dispatch(
                    CreateOrder.model_validate(
                        workload.order_input(
                            workload.product_id(rng.randrange(PRODUCTS)), customer_id
                        )
                    )
                )
                order_id = created[0].stream_id.removeprefix("order-")
                await bus.dispatch(
                    CancelOrder.model_validate(
                        {"command_id": "", "order_id": order_id, "reason": "bench"}
                    )
                )
                if time.perf_counter() >= measure_from:
                    counted += 2

        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        # Callers finish their last pair after the deadline: time to when the last ended.
        elapsed = time.perf_counter() - measure_from
    finally:
        await store.close()
    return InProcessResult("gateway", backend, concurrency, counted, elapsed)


def eventsourcing_commands(
    env: dict[str, str], backend: str, duration: float, warmup: float
) -> InProcessResult:
    """The same work with ``eventsourcing``, one synchronous caller."""
    shop = es_app.open_shop(env)
    try:
        for n in range(PRODUCTS):
            shop.restock(workload.product_id(n), workload.RESTOCK_QUANTITY)
        rng = random.Random(0)
        customer_id = str(uuid.uuid4())
        measure_from = time.perf_counter() + warmup
        deadline = measure_from + duration
        counted = 0
        while time.perf_counter() < deadline:
            order_id = shop.create_order(
                customer_id, workload.product_id(rng.randrange(PRODUCTS)), 1
            )
            shop.cancel_order(order_id, "bench")
            if time.perf_counter() >= measure_from:
                counted += 2
        elapsed = time.perf_counter() - measure_from
    finally:
        shop.close()
    return InProcessResult("eventsourcing", backend, 1, counted, elapsed)
