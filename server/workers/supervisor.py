"""The supervisor of ``serve --workers N``: starts N workers and keeps them running.

The supervisor never serves gRPC itself. It refuses an address a stranger holds and
reserves it (``listen_address``), prepares the store (runs the migrations once; on SQLite
it keeps the consumer groups), runs the hub that tells workers of each other's commits
(``hub``), spawns the workers, replaces one that dies (logged, and counted in
``order_gateway_worker_restarts_total``), serves ``/metrics`` for all of them, and on
SIGTERM, SIGINT or SIGHUP stops them all gracefully: each worker turns its health
NOT_SERVING, refuses new calls, finishes those in flight and ends its subscription
streams; one still running half a second past its own stop deadline is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Final

from domain.errors import StoreError
from server.app import (
    authenticators_from,
    reported_while_slow,
    stop_deadline,
    stop_on_signals,
    unless_stopped,
)
from server.config import Settings, credential_files, keep_setting_files
from server.consumer_groups.store_sqlite import SQLiteConsumerGroupStore
from server.event_loop import running_loop_name
from server.launch import stop_signals
from server.observability.metrics import MetricsServer, check_metrics_address
from server.security.tls import server_credentials
from server.stores.factory import is_memory_url, migrate, sqlite_path
from server.stores.postgres import PostgresEventStore
from server.stores.urls import redacted_url
from server.workers.groups import GroupsHost
from server.workers.hub import WorkerHub
from server.workers.hub_client import FOLLOW_ONLY_NOTICE_DELAY_SECONDS, NOTICE_DELAY_SECONDS
from server.workers.listen_address import reserve
from server.workers.metrics import SupervisorMetrics
from server.workers.worker import WorkerReady, WorkerSpec, run_worker

log = logging.getLogger("order_gateway.workers")

KILL_MARGIN_SECONDS: Final = 0.5
"""How long past a worker's own stop deadline the supervisor waits before it kills the
worker. A worker exits by itself at that deadline (``worker._bound``), counted from when
its event loop takes the SIGTERM, a little after the supervisor sends it: killed at the
same deadline, it raced the kill, and the stop logged two errors for it. With
``STOP_DEADLINE_SECONDS`` (9 s) this keeps the whole stop within the 10 s promised."""

RESTART_DELAY_SECONDS: Final = 1.0
"""Pause before replacing a worker that died within this long of starting: a worker that
cannot start is not respawned in a tight loop."""


class WorkerStartError(RuntimeError):
    pass


class WorkersConfigurationError(ValueError):
    pass


def kill_deadline(settings: Settings) -> float:
    """Seconds from the SIGTERM to a worker to its kill, if it still runs then."""
    return stop_deadline(settings) + KILL_MARGIN_SECONDS


def worker_count(workers: int) -> int:
    """``--workers``: 0 means one per CPU this process may run on."""
    return workers or len(os.sched_getaffinity(0))


async def _readable(*fds: int) -> int:
    """Wait until one of ``fds`` is readable (or closed); returns it."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()

    def wake(fd: int) -> None:
        if not ready.done():
            ready.set_result(fd)

    for fd in fds:
        loop.add_reader(fd, wake, fd)
    try:
        return await ready
    finally:
        for fd in fds:
            loop.remove_reader(fd)


class _Slot:
    """Worker number ``index``: the process serving as it now, replaced when it dies."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.process: BaseProcess | None = None
        self.started_at = 0.0
        self.metrics_port: int | None = None
        self.replica_id: str | None = None
        """Of the worker now serving, once it said so (``WorkerReady``)."""
        self._lifeline: Connection | None = None
        self._unread_ready: Connection | None = None
        """The end of a worker's ready pipe that a stop stopped reading (``start``)."""

    async def start(self, stopping: asyncio.Event) -> bool:
        """Spawn the worker; True once it serves, False if it died first or the
        supervisor is ``stopping``."""
        if stopping.is_set():
            # A stopping supervisor ignores SIGTERM (stop_on_signals), and a process it
            # spawned now would inherit that: its terminate() would go unheard.
            return False
        context = multiprocessing.get_context("spawn")
        self.metrics_port = None
        with contextlib.ExitStack() as pipes:
            receiver, sender = context.Pipe(duplex=False)
            pipes.callback(receiver.close)
            watched, lifeline = context.Pipe(duplex=False)
            pipes.callback(lifeline.close)
            process = context.Process(
                target=run_worker,
                args=(self.spec, sender, watched),
                name=f"order-gateway-worker-{self.spec.index}",
            )
            try:
                process.start()
            finally:
                # The worker's ends: it holds its own copies once started.
                sender.close()
                watched.close()
            pipes.pop_all()
        self.process, self.started_at, self._lifeline = process, time.monotonic(), lifeline
        try:
            return await self._wait_ready(receiver, process)
        except asyncio.CancelledError:
            # A stop while the worker starts: its end stays open until the worker has
            # exited (``close_pipes``). A worker that begins to serve just then still
            # says so, and stops on its SIGTERM as the others do; with the pipe closed,
            # it took the failed send for its supervisor's death and logged an ERROR.
            self._unread_ready = receiver
            raise
        finally:
            if self._unread_ready is not receiver:
                receiver.close()

    async def _wait_ready(self, receiver: Connection, process: BaseProcess) -> bool:
        await _readable(receiver.fileno(), process.sentinel)
        if not receiver.poll():
            return False
        try:
            ready: WorkerReady = receiver.recv()
        except EOFError:
            return False
        self.metrics_port, self.replica_id = ready.metrics_port, ready.replica_id
        return True

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def exited(self) -> int | None:
        process = self.process
        assert process is not None
        await _readable(process.sentinel)
        process.join()
        self.metrics_port = None
        self.close_pipes()
        return process.exitcode

    def close_pipes(self) -> None:
        """Close the supervisor's ends of the pipes to a worker that has exited."""
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        if self._unread_ready is not None:
            self._unread_ready.close()
            self._unread_ready = None

    def terminate(self) -> None:
        if self.process is not None and self.process.exitcode is None:
            self.process.terminate()


class Supervisor:
    def __init__(
        self, settings: Settings, specs: list[WorkerSpec], stopping: asyncio.Event
    ) -> None:
        """``stopping`` is set by SIGTERM, SIGINT or SIGHUP (``stop_on_signals``, from the
        start)."""
        self._settings = settings
        self._slots = [_Slot(spec) for spec in specs]
        self._stopping = stopping
        self._forgetting: set[asyncio.Task[None]] = set()
        """Dead workers' consumer-group members being freed (``_forget_members``)."""
        self.metrics = SupervisorMetrics(self._metrics_ports)

    def _metrics_ports(self) -> dict[int, int]:
        return {
            slot.spec.index: slot.metrics_port
            for slot in self._slots
            if slot.metrics_port is not None
        }

    def _count_serving(self) -> None:
        self.metrics.workers.set(sum(1 for slot in self._slots if slot.metrics_port is not None))

    async def run(self, on_serving: Callable[[], None]) -> None:
        keepers: list[asyncio.Task[None]] = []
        log.info("starting %d workers", len(self._slots))
        try:
            starting = asyncio.gather(*(slot.start(self._stopping) for slot in self._slots))
            stopped = asyncio.ensure_future(self._stopping.wait())
            # A stop while workers start (many take seconds on few CPUs) is not kept
            # waiting for them: the stop bound counts from the signal.
            await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if self._stopping.is_set():
                # Also when the workers' start ended first for the stop (Slot.start).
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                log.info("stopping while %d workers start", len(self._slots))
                return
            started = starting.result()
            if not all(started):
                raise WorkerStartError(
                    "a worker exited before it served (its log lines above say why)"
                )
            self._count_serving()
            on_serving()
            keepers = [asyncio.create_task(self._keep(slot)) for slot in self._slots]
            await self._stopping.wait()
            log.info("shutting down %d workers", len(self._slots))
        finally:
            for task in [*keepers, *self._forgetting]:
                task.cancel()
            await asyncio.gather(*keepers, *self._forgetting, return_exceptions=True)
            await self._stop_all()

    async def _keep(self, slot: _Slot) -> None:
        """Replace ``slot``'s worker each time it exits, until the gateway stops."""
        while True:
            pid = slot.pid
            code = await slot.exited()
            self._count_serving()
            if self._stopping.is_set():
                return
            lived = time.monotonic() - slot.started_at
            log.warning(
                "worker %d (pid %s) exited with %s after %.1f s; starting a replacement",
                slot.spec.index,
                pid,
                f"signal {-code}" if code is not None and code < 0 else f"code {code}",
                lived,
            )
            self.metrics.restarts.inc()
            # Beside the replacement, which has an id of its own: an unreachable database
            # (connect_timeout, 10 s by default) must not hold it up.
            replica_id, slot.replica_id = slot.replica_id, None
            if replica_id is not None and sqlite_path(self._settings.store) is None:
                forgetting = asyncio.create_task(self._forget_members(slot, replica_id))
                self._forgetting.add(forgetting)
                forgetting.add_done_callback(self._forgetting.discard)
            if lived < RESTART_DELAY_SECONDS:
                await asyncio.sleep(RESTART_DELAY_SECONDS)
            await self._replace(slot)

    async def _replace(self, slot: _Slot) -> None:
        """Start ``slot``'s worker again. A spawn the system refuses (no process or file
        descriptor to spare, as when workers die for want of them) is tried again after a
        delay: the slot must not stay empty for the rest of the gateway's life."""
        while True:
            try:
                started = await slot.start(self._stopping)
            except OSError as error:
                log.error(
                    "could not start a replacement for worker %d (%s); trying again in %.0f s",
                    slot.spec.index,
                    error,
                    RESTART_DELAY_SECONDS,
                )
                await asyncio.sleep(RESTART_DELAY_SECONDS)
                continue
            if started:
                self._count_serving()
                log.info("worker %d replaced (pid %s)", slot.spec.index, slot.pid)
            return

    async def _forget_members(self, slot: _Slot, replica_id: str) -> None:
        """On PostgreSQL, free the dead worker's consumer-group members and partitions now:
        its consumers, reconnecting to another worker, would otherwise find their ids
        taken until the leases expire. (On SQLite the supervisor keeps the leases and
        frees them as the worker's connection to the hub closes.)"""
        try:
            await PostgresEventStore.forget_group_replica(self._settings.store, replica_id)
        except StoreError as error:
            log.warning(
                "could not free the consumer-group members of worker %d (their leases"
                " expire instead): %s",
                slot.spec.index,
                error,
            )

    async def _stop_all(self) -> None:
        """SIGTERM to every worker, then wait; kill those still running at the deadline."""
        for slot in self._slots:
            slot.terminate()
        deadline = kill_deadline(self._settings)
        running = [s.process for s in self._slots if s.process is not None]
        try:
            async with asyncio.timeout(deadline):
                for process in running:
                    if process.exitcode is None:
                        await _readable(process.sentinel)
                    process.join()
        except TimeoutError:
            for process in running:
                if process.exitcode is None:
                    log.error(
                        "worker pid %s did not stop in %.1f s; killing it", process.pid, deadline
                    )
                    process.kill()
                    process.join()
        for slot in self._slots:
            slot.close_pipes()


async def _migrated(url: str) -> bool:
    """The store at ``url`` migrated, logged while it is slow to answer, as one process's
    start logs it."""
    migrating = asyncio.ensure_future(migrate(url))
    try:
        await reported_while_slow(migrating, url)
    except BaseException:
        migrating.cancel()
        await asyncio.gather(migrating, return_exceptions=True)
        raise
    migrating.result()
    return True


async def supervise(settings: Settings) -> None:
    """Run ``settings.workers`` workers (more than one) until SIGTERM, SIGINT or SIGHUP."""
    count = worker_count(settings.workers)
    if is_memory_url(settings.store):
        raise WorkersConfigurationError(
            f"--workers {settings.workers} needs a store the processes share: memory:// "
            "lives inside one process, so each worker would keep a log of its own. Use "
            "sqlite:///… or postgresql://…, or one worker."
        )
    # Read once, here, for every worker to serve with (``keep_setting_files``); and
    # checked here, so that a bad one is one clear error, not N workers failing.
    credentials = credential_files(settings)
    keep_setting_files(credentials)
    authenticators_from(settings)
    server_credentials(settings)
    # From here on a stop is a stop: while the store opens (an unreachable database
    # takes its connect timeout) as while workers start or serve.
    stopping = asyncio.Event()
    stop_on_signals(stop_signals(), stopping)
    reservation = reserve(settings.listen)
    try:
        if settings.metrics_listen:
            # Before migrate() opens the store, which on SQLite creates its file: a
            # refused start leaves nothing behind. After the reservation, which the
            # metrics address may clash with.
            check_metrics_address(settings.metrics_listen, reservation.listen)
        with tempfile.TemporaryDirectory(prefix="order-gateway-") as run_dir:
            await _run(settings, count, reservation.listen, Path(run_dir), stopping, credentials)
    finally:
        reservation.release()


async def _run(
    settings: Settings,
    count: int,
    listen: str,
    run_dir: Path,
    stopping: asyncio.Event,
    credentials: dict[str, bytes],
) -> None:
    worker_settings = settings.model_copy(
        update={
            "listen": listen,
            "workers": 1,
            "metrics_listen": "127.0.0.1:0" if settings.metrics_listen else None,
        }
    )
    database = sqlite_path(settings.store)
    # Only SQLite's workers hear of each other's commits from the hub alone: PostgreSQL's
    # LISTEN wakes every worker's subscriptions at each commit, and there the notices
    # only keep the caches up to date, which can wait a little longer.
    notice_delay = (
        NOTICE_DELAY_SECONDS if database is not None else FOLLOW_ONLY_NOTICE_DELAY_SECONDS
    )
    hub_path = run_dir / "hub.sock"
    specs = [
        WorkerSpec(
            worker_settings,
            index,
            str(hub_path),
            # On SQLite the supervisor keeps the consumer groups' leases and writes their
            # records.
            groups_via_hub=database is not None,
            notice_delay=notice_delay,
            credential_files=credentials,
        )
        for index in range(1, count + 1)
    ]
    supervisor = Supervisor(settings, specs, stopping)
    metrics_server = (
        MetricsServer(supervisor.metrics.registry, settings.metrics_listen)
        if settings.metrics_listen
        else None
    )

    def serving() -> None:
        log.info(
            "order-gateway listening on %s with %d workers (store %s, event loop %s)",
            listen,
            count,
            redacted_url(settings.store),
            running_loop_name(),
        )

    hub: WorkerHub | None = None
    try:
        if metrics_server is not None and settings.metrics_listen:
            # Before the store opens (a database may take seconds to answer) and before
            # the workers: /metrics answers (with the workers serving so far, and
            # order_gateway_workers) from the start, as with one process, and its address
            # is known as soon.
            port = metrics_server.start()
            host = settings.metrics_listen.rpartition(":")[0]
            log.info("metrics of all workers at http://%s:%d/metrics", host, port)
        if not await unless_stopped(_migrated(settings.store), stopping):
            log.info("stopped before serving")
            return
        groups = (
            GroupsHost(await SQLiteConsumerGroupStore.open(database))
            if database is not None
            else None
        )
        hub = WorkerHub(hub_path, groups)
        await hub.start()
        await supervisor.run(serving)
    finally:
        if metrics_server is not None:
            await metrics_server.stop()
        if hub is not None:
            await hub.close()
