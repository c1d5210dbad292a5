"""A projection service: one member of the consumer group "order-status", building a read
model of orders (status and item count) in a SQLite file that every instance shares.

Run as many instances as you like with the same group: the gateway spreads the group's
partitions over them, delivers each order's events in order to one instance at a time,
and moves an instance's partitions to the others when it stops. Delivery is at least
once, so each event is applied together with its event_id in one transaction, and an
event_id seen before is acked without applying it again.

    python projection.py --target 127.0.0.1:50051 --db read-model.db [--member NAME]

It exits 0 when stopped (SIGTERM, Ctrl-C), and 1, for its supervisor to restart it, when
the gateway cannot be reached or does not answer within 10 s, refuses it, or ends its
stream, or its read model fails.

Needs the gateway's generated Python client (``orders.v1``) and grpcio.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator

import grpc
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc
from orders.v1 import events_pb2

GROUP = "order-status"

STOP_GRACE_SECONDS = 5.0
"""How long a stopping instance waits for the event it is applying to commit."""

CREATE_TIMEOUT_SECONDS = 10.0
"""How long an instance waits for the gateway to create (or find) its group."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, items INTEGER NOT NULL,
    status TEXT NOT NULL, handled_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS applied_events (event_id TEXT PRIMARY KEY);
"""


def open_read_model(path: str) -> sqlite3.Connection:
    # Several instances write this file: WAL, and wait for each other's transactions.
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    # Switching a new file to WAL needs it to itself, and SQLite answers "database is
    # locked" at once, without waiting out the timeout, when another instance is opening
    # it at the same moment: try again for a while.
    for attempt in itertools.count(1):
        try:
            db.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError:
            if attempt == 100:
                raise
            time.sleep(0.05)
    # IMMEDIATE: take the write lock (waiting for it) before reading the schema, so that
    # another instance's tables, created meanwhile, cannot make this transaction stale.
    db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
    return db


def apply(db: sqlite3.Connection, event: events_pb2.Event, member: str) -> None:
    """Apply one event exactly once to the read model, whatever the redeliveries."""
    db.execute("BEGIN IMMEDIATE")
    try:
        seen = db.execute("INSERT OR IGNORE INTO applied_events VALUES (?)", (event.event_id,))
        if seen.rowcount == 1:  # first time: apply it in the same transaction
            if event.HasField("order_created"):
                created = event.order_created
                db.execute(
                    "INSERT INTO orders VALUES (?, ?, ?, 'open', ?)",
                    (created.order_id, created.customer_id, len(created.items), member),
                )
            elif event.HasField("order_cancelled"):
                db.execute(
                    "UPDATE orders SET status = 'cancelled', handled_by = ? WHERE order_id = ?",
                    (member, event.order_cancelled.order_id),
                )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def consume(
    responses: Iterator[pb.ConsumeResponse],
    outgoing: queue.SimpleQueue[pb.ConsumeRequest | None],
    db: sqlite3.Connection,
    member: str,
) -> None:
    """Apply each delivery, then ack it; nack what could not be applied."""
    for response in responses:
        if response.WhichOneof("message") == "assignment":
            partitions = list(response.assignment.partitions)
            print(f"{member}: partitions {partitions}", file=sys.stderr, flush=True)
            continue
        event = response.delivery.event
        try:
            apply(db, event, member)
        except sqlite3.Error as error:
            # Try again later (1 s, 2 s, 4 s … then parked after max_deliveries).
            nack = pb.Nack(event_ids=[event.event_id], reason=str(error))
            outgoing.put(pb.ConsumeRequest(nack=nack))
            continue
        outgoing.put(pb.ConsumeRequest(ack=pb.Ack(event_ids=[event.event_id])))


def run(target: str, db_path: str, member: str) -> int:
    outgoing: queue.SimpleQueue[pb.ConsumeRequest | None] = queue.SimpleQueue()
    outgoing.put(pb.ConsumeRequest(join=pb.Join(group=GROUP, member_id=member)))

    def requests() -> Iterator[pb.ConsumeRequest]:
        while (request := outgoing.get()) is not None:
            yield request

    # Stopped by SIGTERM (a service manager) or Ctrl-C: the signal only sets a flag, and
    # the main thread then cancels the call; deliveries not acked go back to the group.
    # The event being applied then gets STOP_GRACE_SECONDS to commit: its ack can no
    # longer be sent, so waiting longer (SQLite waits up to 30 s for another instance's
    # write lock) would hold up the stop for nothing. Cut short, its transaction is
    # rolled back when the process exits, and the instance that gets the event applies it.
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ConsumerGroupServiceStub(channel)
        settings = pb.ConsumerGroupSettings(event_types=["OrderCreated", "OrderCancelled"])
        # Idempotent: every instance may create the group; the first one does. With a
        # deadline, and polled, so that a gateway that does not answer (or a stop that
        # comes meanwhile) does not hold the instance up.
        created = stub.CreateConsumerGroup.future(
            pb.CreateConsumerGroupRequest(name=GROUP, settings=settings),
            timeout=CREATE_TIMEOUT_SECONDS,
        )
        while not created.done() and not stopping.is_set():
            time.sleep(0.05)
        if stopping.is_set():
            created.cancel()
            return 0
        failed = created.exception()
        if failed is not None:
            reason = (
                f"{failed.code().name}: {failed.details()}"
                if isinstance(failed, grpc.Call)
                else repr(failed)
            )
            print(f"{member}: {reason}", file=sys.stderr)
            return 1
        call = stub.Consume(requests())
        failure: list[BaseException] = []

        def work() -> None:
            try:
                # Opened here: a SQLite connection belongs to the thread that opened it.
                consume(call, outgoing, open_read_model(db_path), member)
            except grpc.RpcError as error:
                if not stopping.is_set():
                    failure.append(error)
            except BaseException as error:
                # Anything else (a read model that cannot be opened, a bug in apply) ends
                # the instance with a failure status, so that its supervisor restarts it;
                # the thread's default hook prints the traceback.
                failure.append(error)
                raise

        worker = threading.Thread(target=work, name="consume", daemon=True)
        worker.start()
        # Polled, not stopping.wait(): the handler runs in this thread, between two
        # bytecodes, so it can come while wait() holds the event's lock, and its set()
        # would then wait for that lock forever.
        while worker.is_alive() and not stopping.is_set():
            worker.join(0.2)
        call.cancel()
        outgoing.put(None)
        worker.join(STOP_GRACE_SECONDS)
    for error in failure:
        if isinstance(error, grpc.Call):
            print(f"{member}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--db", default="read-model.db")
    parser.add_argument("--member", default="")
    args = parser.parse_args()
    return run(args.target, args.db, args.member or default_member())


def default_member() -> str:
    """This host's short name and this process's id: a member id may hold at most 64 of
    ``A-Z a-z 0-9 . _ -``, and a fully qualified host name can be longer."""
    host = socket.gethostname().split(".")[0] or "projection"
    pid = f"-{os.getpid()}"
    return host[: 64 - len(pid)] + pid


if __name__ == "__main__":
    status = main()
    # Exit without the interpreter's finalization. grpc runs the call on daemon threads,
    # which finalization stops wherever they are: one stopped while it held the call's
    # lock keeps it for good, and the cancelled call, which raised itself and so sits in
    # a reference cycle until that last collection, would wait for the lock in its
    # finalizer, and the process would never end. Everything this process wrote is
    # committed by now, or, unfinished, rolled back.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
