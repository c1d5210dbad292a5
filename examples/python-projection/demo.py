"""Runs the projection example end to end and checks the read model it builds.

Starts a gateway (memory store), two projection instances in one consumer group, writes
orders and cancels some, stops one instance half way (its partitions move to the other),
and waits until the shared read model holds every order with the right status, each
event applied once. Exit status 0 when it does.

    python examples/python-projection/demo.py
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from google.type import money_pb2
from orders.v1 import (
    inventory_command_service_pb2,
    inventory_command_service_pb2_grpc,
    order_command_service_pb2,
    order_command_service_pb2_grpc,
    types_pb2,
)

HERE = Path(__file__).resolve().parent
ORDERS = 40


def start_gateway(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    gateway = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--listen", "127.0.0.1:0",
         "--store", "memory://"],
        stderr=log.open("wb"),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on (127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return gateway, found.group(1)
        if gateway.poll() is not None:
            raise SystemExit(f"the gateway exited:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit("the gateway did not start within 30 s")


def projection(target: str, db: Path, member: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "projection.py"), "--target", target, "--db", str(db),
         "--member", member],
        stderr=log.open("wb"),
    )  # fmt: skip


def write_orders(target: str, count: int, first: int = 0) -> dict[str, str]:
    """Creates ``count`` orders and cancels every third; their expected statuses."""
    expected = {}
    with grpc.insecure_channel(target) as channel:
        inventory = inventory_command_service_pb2_grpc.InventoryCommandServiceStub(channel)
        orders = order_command_service_pb2_grpc.OrderCommandServiceStub(channel)
        for _ in inventory.RestockProduct(
            inventory_command_service_pb2.RestockProductRequest(product_id="mug", quantity=1000)
        ):
            pass
        for n in range(first, first + count):
            request = order_command_service_pb2.CreateOrderRequest(
                customer_id=str(uuid.uuid4()),
                items=[
                    types_pb2.OrderItem(
                        product_id="mug",
                        quantity=1,
                        unit_price=money_pb2.Money(currency_code="EUR", units=9),
                    )
                ],
                shipping_address=types_pb2.Address(
                    recipient="Ada", line1="1 Main St", city="London", country_code="GB"
                ),
            )
            order_id = next(iter(orders.CreateOrder(request))).event.order_created.order_id
            expected[order_id] = "open"
            if n % 3 == 0:
                cancel = order_command_service_pb2.CancelOrderRequest(order_id=order_id)
                for _ in orders.CancelOrder(cancel):
                    pass
                expected[order_id] = "cancelled"
    return expected


def wait_until_sharing(work: Path, names: tuple[str, ...]) -> None:
    """Until each instance logged an assignment with partitions: the group is shared."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = [(work / f"{name}.log") for name in names]
        last = [log.read_text().strip().splitlines()[-1:] if log.exists() else [] for log in logs]
        if all(lines and not lines[0].endswith("[]") for lines in last):
            return
        time.sleep(0.1)
    raise SystemExit("the projection instances did not share the group within 30 s")


def read_model(db: Path) -> tuple[dict[str, str], dict[str, int], int]:
    if not db.exists():
        return {}, {}, 0
    with sqlite3.connect(db, timeout=30) as connection:
        rows = connection.execute("SELECT order_id, status, handled_by FROM orders").fetchall()
        (applied,) = connection.execute("SELECT count(*) FROM applied_events").fetchone()
    by_member: dict[str, int] = {}
    for _, _, member in rows:
        by_member[member] = by_member.get(member, 0) + 1
    return {order_id: status for order_id, status, _ in rows}, by_member, applied


def complete(db: Path, expected: dict[str, str]) -> tuple[dict[str, int], int] | None:
    """Waits up to a minute for the read model to hold exactly ``expected``, each event
    applied once; the rows each instance wrote last and the events applied, or None."""
    events = len(expected) + sum(status == "cancelled" for status in expected.values())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        model, by_member, applied = read_model(db)
        if model == expected and applied == events:
            return by_member, applied
        time.sleep(0.2)
    return None


def main() -> int:
    os.chdir(HERE.parent.parent)  # the repository, for `python -m server.cli`
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        db = work / "read-model.db"
        gateway, target = start_gateway(work / "gateway.log")
        instances = []
        try:
            instances = [
                projection(target, db, name, work / f"{name}.log") for name in ("alpha", "beta")
            ]
            wait_until_sharing(work, ("alpha", "beta"))
            expected = write_orders(target, ORDERS // 2)
            # Both instances apply their share of the first half before one stops (else,
            # on a busy machine, the stopped one may not have handled anything yet).
            complete(db, expected)
            # Stop one instance half way: its partitions (and unacked events) move on.
            instances[1].send_signal(signal.SIGTERM)
            instances[1].wait(30)
            expected |= write_orders(target, ORDERS - ORDERS // 2, first=ORDERS // 2)
            found = complete(db, expected)
            if found is not None:
                by_member, applied = found
                print(f"read model complete: {len(expected)} orders, {applied} events applied")
                print(f"rows last written by each instance: {by_member}")
                return 0
            model, _, _ = read_model(db)
            print(f"read model incomplete: {len(model)} of {len(expected)} orders", file=sys.stderr)
            for log in sorted(work.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            return 1
        finally:
            for process in (*instances, gateway):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(15)
                    except subprocess.TimeoutExpired:
                        process.kill()


if __name__ == "__main__":
    sys.exit(main())
