"""One ``--workers`` process: a gateway on the shared address, run by the supervisor.

Workers are spawned (a fresh interpreter each), never forked: grpc's state cannot be
forked once it exists (grpc issue 16001), and the supervisor may hold SQLite
connections. A worker stops gracefully on SIGTERM, which only its supervisor sends (SIGINT
and SIGHUP from a terminal reach the whole process group; the supervisor turns them into
SIGTERM), and also when its supervisor is gone, so that no worker outlives a killed
supervisor: the supervisor holds the only write end of a pipe whose read end the worker
watches, and the kernel closes it when the supervisor dies, however it dies.

Once a stop begins, it is bounded: past ``stop_deadline`` the worker exits at once,
whatever it still waits for. A live supervisor would kill it half a second later
(``supervisor.KILL_MARGIN_SECONDS``: the worker's own exit comes first, not a race with
the kill); without one nothing else would, and a worker that stopped gracefully except
for one wait that never ended (seen under load: a cancelled task that carried on) would
serve nobody and hold its store for ever.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

from domain.errors import StoreError, StoreUnavailableError
from domain.ports import SharedStreamLocks
from domain.unit_of_work import AggregateCache
from server import event_loop
from server.app import Gateway, LastLines, serve, stop_deadline
from server.config import Settings, keep_setting_files
from server.observability.logs import configure_logging
from server.stores.event_rows import EventRowReader, StreamRowReader
from server.stores.factory import open_store
from server.workers.cache_follower import CacheFollower
from server.workers.hub_client import (
    NOTICE_DELAY_SECONDS,
    HubClient,
    HubLockingWorkerStore,
    LockingRowStore,
    LockingWorkerStore,
    RowStore,
    WorkerStore,
)

log = logging.getLogger("order_gateway.workers")


@dataclass(frozen=True)
class WorkerSpec:
    settings: Settings
    """The gateway's settings, ``listen`` holding the port every worker shares."""
    index: int
    """1 to N: the worker's number in logs and metrics, kept by its replacements."""
    hub_socket: str
    """The supervisor's hub (``server.workers.hub``)."""
    groups_via_hub: bool
    """The supervisor keeps the consumer groups (SQLite)."""
    notice_delay: float = NOTICE_DELAY_SECONDS
    """How long the worker's notice of a commit waits for more (``hub_client``)."""
    credential_files: dict[str, bytes] = field(default_factory=dict)
    """The files of the credential settings as the supervisor read them at start, by
    path: what this worker serves with (``server.config.keep_setting_files``)."""


@dataclass(frozen=True)
class WorkerReady:
    """What a worker tells the supervisor once it serves."""

    metrics_port: int | None
    """Where its internal metrics are served, if they are."""
    replica_id: str
    """The replica its consumer-group members are registered under."""


def run_worker(spec: WorkerSpec, ready: Connection, lifeline: Connection) -> None:
    """The worker process's entry point: sends its metrics port (or None) on ``ready``
    once it serves, and stops when ``lifeline`` (whose other end only the supervisor
    holds) reaches its end."""
    # A terminal's Ctrl-C or hang-up reaches the whole process group: the supervisor
    # stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = spec.settings
    configure_logging(settings.log_format, settings.log_level, worker=spec.index)
    keep_setting_files(spec.credential_files)
    try:
        event_loop.run(_serve(spec, ready, lifeline), settings.event_loop)
    except SupervisorGoneError as gone:
        # The supervisor died as this worker started (a replacement, say): nothing failed
        # here, and the supervisor's own end is what the log must show.
        log.error("the supervisor process is gone (%s); stopping", gone)
        raise SystemExit(1) from None
    except StoreError as error:
        # The store's own account (unreachable, full): one line, as `serve` prints it;
        # the supervisor tries again, and a traceback each time would bury it.
        log.error("worker %d failed: store error: %s", spec.index, error)
        raise SystemExit(1) from None
    except Exception:
        log.exception("worker %d failed", spec.index)
        raise SystemExit(1) from None


class SupervisorGoneError(Exception):
    """The supervisor's hub could not be reached when the worker started."""


async def _serve(spec: WorkerSpec, ready: Connection, lifeline: Connection) -> None:
    stop = asyncio.Event()
    told = False

    def supervisor_gone() -> None:
        # Told by the lifeline, by the hub's connection ending, or by a ready message
        # that cannot be sent, whichever comes first; logged once. (Not by
        # remove_reader's result: uvloop's is None.)
        nonlocal told
        if not told:
            told = True
            asyncio.get_running_loop().remove_reader(lifeline.fileno())
            log.error("the supervisor process is gone; stopping")
        stop.set()

    asyncio.get_running_loop().add_reader(lifeline.fileno(), supervisor_gone)
    try:
        hub = await HubClient.connect(spec.hub_socket, spec.notice_delay)
    except (OSError, StoreUnavailableError) as e:
        raise SupervisorGoneError(e) from e
    # On SQLite the workers take turns at the file's write lock (``sqlite_turns``).
    inner = await open_store(
        spec.settings.store, pool_size=spec.settings.store_pool_size, writer_turns=True
    )
    if not (isinstance(inner, EventRowReader) and isinstance(inner, StreamRowReader)):
        raise TypeError(f"{type(inner).__name__} cannot serve as a worker's store")
    store: WorkerStore
    if isinstance(inner, SharedStreamLocks):
        store = LockingWorkerStore(cast(LockingRowStore, inner), hub, spec.groups_via_hub)
    else:
        store = HubLockingWorkerStore(cast(RowStore, inner), hub, spec.groups_via_hub)
    cache = AggregateCache(spec.settings.aggregate_cache)
    hub.on_others = CacheFollower(cache).committed_elsewhere
    last_lines = LastLines()
    background = [
        asyncio.create_task(_call_when_set(hub.lost, supervisor_gone)),
        asyncio.create_task(_bound(stop, stop_deadline(spec.settings), spec.index, last_lines)),
    ]
    deletions: set[asyncio.Task[None]] = set()

    def on_serving(gateway: Gateway) -> None:
        last_lines.gateway = gateway
        hub.on_group_deleted = functools.partial(_group_deleted, gateway, deletions)
        gateway.hub.on_subscribed = hub.listening
        if gateway.hub.subscriber_count:
            hub.listening(True)
        try:
            ready.send(WorkerReady(gateway.metrics_port, gateway.groups.replica_id))
        except OSError:
            # Gone as this worker started, before its lifeline told: stop as for that.
            supervisor_gone()
        ready.close()

    try:
        await serve(
            spec.settings,
            store=store,
            cache=cache,
            reuse_port=True,
            on_serving=on_serving,
            stop=stop,
            signals=(signal.SIGTERM,),
            bounded=False,
            internal_metrics=True,
        )
    finally:
        for task in background:
            task.cancel()


def _group_deleted(
    gateway: Gateway, tasks: set[asyncio.Task[None]], name: str, created_at: dt.datetime
) -> None:
    """A group was deleted (through any worker): its members here end too."""
    task = asyncio.create_task(gateway.groups.deleted_elsewhere(name, created_at))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _call_when_set(event: asyncio.Event, then: Callable[[], None]) -> None:
    await event.wait()
    then()


async def _bound(
    stop: asyncio.Event, seconds: float, index: int, last_lines: LastLines | None = None
) -> None:
    """Once ``stop`` is set, exit the process if it still runs ``seconds`` later, once
    ``last_lines`` are written. A thread, not the event loop: the loop's own end
    (``asyncio.run`` cancelling what is left) is part of what it bounds."""
    await stop.wait()

    def exit_now() -> None:
        log.error("worker %d did not stop within %.0f s; exiting now", index, seconds)
        if last_lines is not None:
            last_lines.write()
        os._exit(1)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()
