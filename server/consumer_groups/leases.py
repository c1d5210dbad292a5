"""Partition ownership across replicas, arbitrated by the database (PostgreSQL).

Every replica with members of a group runs a ``LeaseCoordinator`` for it. Each round
(every ``interval`` seconds, and at once when a local member joins or leaves) it

1. heartbeats its members (rows that expire after ``ttl`` unless renewed),
2. reads the live members of every replica and the valid partition leases,
3. computes the same balanced plan every replica computes from that data
   (``balance.assign``: counts differ by at most one, fewest moves): from the members
   the previous round read, less its own that left since (a departed member's
   partitions that the plan gives to a member here pass to it, their leases kept),
4. gives up the partitions the plan moves away from its members (their checkpoints are
   stored first), and claims or renews those the plan gives them. A claim succeeds only
   on a free or expired lease, or one this replica holds: two replicas can never hold one
   partition at once, whatever their plans say at a given moment. Each renewal carries the
   partition's deliveries in flight, so that any replica can report them.

A replica delivers a partition only while its lease is valid by its own clock: the local
deadline is taken from before the renewal was sent, so it always ends before the one in
the database. A replica that dies or loses the database stops renewing; its members and
leases expire after ``ttl`` and the others take its partitions over in the next round:
within ``ttl + interval`` (12 s with the defaults; docs/consumer-groups.md promises 15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from domain.errors import StoreError, StoreUnavailableError
from server.cancellation import raise_if_cancelling
from server.consumer_groups import balance

log = logging.getLogger("order_gateway.consumer_groups")

LEASE_TTL = 10.0
"""Seconds a member row or a partition lease lives without renewal."""
ROUND_INTERVAL = 2.0
"""Seconds between a coordinator's rounds."""
MIN_ROUND_GAP = 0.05
"""Seconds between two rounds at the least."""
LOCAL_MARGIN = 1.0
"""Seconds a lease ends earlier by this replica's clock than in the database."""
FAILURE_LOG_INTERVAL = 10.0
"""Seconds between two lines about lease rounds that cannot reach the store: a round runs
every ``ROUND_INTERVAL``, and a line each time, per group, would bury the store's own."""


class GroupGoneError(Exception):
    """The group a round was for no longer exists as it was created: it was deleted
    (and perhaps created anew) through another replica."""


@dataclass(frozen=True, slots=True)
class LiveMember:
    member_id: str
    replica_id: str
    user_id: str
    joined_at: dt.datetime
    in_flight: int


@dataclass(frozen=True, slots=True)
class LocalMember:
    member_id: str
    user_id: str
    joined_at: dt.datetime
    in_flight: int


@dataclass(frozen=True, slots=True)
class PartitionLease:
    member_id: str
    in_flight: int
    """The partition's deliveries in flight, as of the lease's last renewal."""


class LeaseStore(Protocol):
    """Where members and partition leases are kept (PostgreSQL:
    ``store_postgres.PostgresLeases``)."""

    ttl: float

    async def register(self, group: str, replica_id: str, member: LocalMember) -> None:
        """Add a member, or raise MemberIdTakenError while another replica has a live
        member with its id. The caller registers only ids none of its own members has, so
        an entry of ``replica_id``'s under the id is a departed member's: taken over."""
        ...

    async def round(
        self,
        group: str,
        replica_id: str,
        members: Sequence[LocalMember],
        release: Sequence[int],
        claims: Mapping[int, str],
        in_flight: Mapping[int, int] | None = None,
        created_at: dt.datetime | None = None,
    ) -> tuple[list[LiveMember], dict[int, str], set[int]]:
        """Heartbeat ``members`` (forgetting this replica's others), release partitions,
        claim or renew ``claims`` (partition: member id) with each one's deliveries in
        flight (``in_flight``, partition: count), all at once. Returns the live members
        (join order), the valid leases (partition: member id) and the partitions this
        replica holds after the claims. Raises GroupGoneError, having changed nothing,
        when the group created at ``created_at`` (if given) does not exist any more."""
        ...

    async def leave(self, group: str, replica_id: str) -> None:
        """This replica has no member in the group any more: free what it holds."""
        ...

    async def snapshot(self, group: str) -> tuple[list[LiveMember], dict[int, PartitionLease]]:
        """Live members and valid leases (by partition)."""
        ...


class LeaseCoordinator:
    """Keeps a runtime's partition ownership in step with the leases (see the module doc).

    ``apply(owned)`` is called with the partitions this replica may deliver, each with its
    local member id; ``release(partitions)`` before giving partitions up (it stores their
    checkpoints); ``local_members()`` lists this replica's members and ``in_flight()``
    counts the deliveries in flight per partition.
    """

    def __init__(
        self,
        leases: LeaseStore,
        group: str,
        replica_id: str,
        partitions: int,
        local_members: Callable[[], list[LocalMember]],
        apply: Callable[[dict[int, str]], Coroutine[Any, Any, None]],
        release: Callable[[set[int]], Coroutine[Any, Any, None]],
        in_flight: Callable[[], dict[int, int]],
        interval: float = ROUND_INTERVAL,
        created_at: dt.datetime | None = None,
        gone: Callable[[], None] | None = None,
    ) -> None:
        self._leases = leases
        self._group = group
        self._replica_id = replica_id
        self._partitions = partitions
        self._local_members = local_members
        self._apply = apply
        self._release = release
        self._in_flight = in_flight
        self._interval = interval
        self._created_at = created_at
        self._gone = gone
        self._wake = asyncio.Event()
        self._held: dict[int, str] = {}
        self._valid_until = 0.0
        self._expiry: asyncio.TimerHandle | None = None
        self._expired_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed_rounds = 0
        """Rounds that failed since the last that worked."""
        self._said_failed_at = 0.0
        self._giving_up: asyncio.Future[None] | None = None
        """A give-up (``release``) under way: carried to its end when the rounds are
        cancelled, since it stores the checkpoints of the partitions given up."""
        self.live: list[LiveMember] = []
        self.leases: dict[int, str] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"group-leases-{self._group}")

    def nudge(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._giving_up is not None:
            # A give-up the stop cut its round short of: its checkpoints are stored before
            # the leases are let go.
            try:
                await self._giving_up
            except Exception:
                log.exception("consumer group %r: giving partitions up failed", self._group)
        try:
            await self._leases.leave(self._group, self._replica_id)
        except StoreUnavailableError as e:
            # Expected when the store (or a worker's supervisor) is gone: the leases then
            # lapse after their time to live, as a crashed replica's do.
            log.warning(
                "consumer group %r: releasing leases failed (%s); they lapse on their own",
                self._group,
                e,
            )
        except StoreError as e:
            # Refused by the store (a privilege revoked, say): its message says why.
            log.error(
                "consumer group %r: releasing leases failed (%s); they lapse on their own",
                self._group,
                e,
            )
        except Exception:
            log.exception("consumer group %r: releasing leases failed", self._group)

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
                if self._failed_rounds:
                    log.info(
                        "consumer group %r: lease rounds work again (%d failed meanwhile)",
                        self._group,
                        self._failed_rounds,
                    )
                    self._failed_rounds = 0
            except GroupGoneError:
                # Deleted through another replica: the rounds end here, and ``gone``
                # ends this replica's members (their leases went with the group).
                log.info("consumer group %r was deleted through another replica", self._group)
                if self._gone is not None:
                    self._gone()
                return
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as e:
                # The store (or a worker's supervisor) cannot be reached: the next round
                # tries again.
                self._round_failed(logging.WARNING, e)
            except StoreError as e:
                # The store answered, and refused: a privilege revoked from the gateway's
                # role, say, which the operator must put right. The store's message says
                # what, and a traceback every round (2 s) would bury it.
                self._round_failed(logging.ERROR, e)
            except Exception as e:
                self._round_failed(logging.ERROR, e, with_traceback=True)
            raise_if_cancelling()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            # However urgent, rounds never spin: replicas converge within a few anyway.
            await asyncio.sleep(MIN_ROUND_GAP)

    def _round_failed(self, level: int, error: Exception, *, with_traceback: bool = False) -> None:
        """Say that a round failed: at its first failure, then at most every
        ``FAILURE_LOG_INTERVAL`` while rounds go on failing (one line per round and
        group would drown every other line); once they work again, ``_run`` says so."""
        self._failed_rounds += 1
        now = time.monotonic()
        if self._failed_rounds == 1 or now - self._said_failed_at >= FAILURE_LOG_INTERVAL:
            self._said_failed_at = now
            log.log(
                level,
                "consumer group %r: lease round failed (%s)",
                self._group,
                error,
                exc_info=error if with_traceback else None,
            )

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        delay = max(0.0, self._valid_until - time.monotonic())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        """Renewals failed (or hung) for as long as a lease lives locally: deliver
        nothing any more, before another replica may claim the partitions."""
        self._expiry = None
        if self._held:
            log.warning("consumer group %r: leases expired unrenewed", self._group)
            self._held = {}
            self._expired_task = asyncio.create_task(self._apply({}))

    async def _round(self) -> None:
        members = self._local_members()
        local_ids = {m.member_id for m in members}
        # First, from what was known, what this replica must give up: its checkpoints
        # are stored before the lease is, so the next owner resumes from them. A
        # partition that moves between members here is not given up: its lease changes
        # hands in the claims, and the runtime hands the partition's deliveries in flight
        # to the new member at once, with the attempts they had.
        plan = self._plan(self._present(local_ids), self.leases)
        giving_up = {p for p, m in self._held.items() if plan.get(p, m) not in local_ids}
        if giving_up:
            self._held = {p: m for p, m in self._held.items() if p not in giving_up}
            give_up = self._giving_up = asyncio.ensure_future(self._release(giving_up))
            try:
                # Shielded: a stop that cancels this round awaits the give-up instead.
                await asyncio.shield(give_up)
            finally:
                if give_up.done():
                    self._giving_up = None
        claims = {p: m for p, m in plan.items() if m in local_ids}
        claims.update({p: m for p, m in self._held.items() if p not in claims})
        counts = self._in_flight()
        started = time.monotonic()
        live, leases, held = await self._leases.round(
            self._group,
            self._replica_id,
            members,
            sorted(giving_up),
            claims,
            {p: counts.get(p, 0) for p in claims},
            self._created_at,
        )
        self.live, self.leases = live, leases
        self._valid_until = started + self._leases.ttl - LOCAL_MARGIN
        self._held = {p: claims[p] for p in held}
        self._arm_expiry()
        await self._apply(dict(self._held))
        if self._plan(live, leases) != plan:
            # The plan changed with what this round learnt: act on it now, not later.
            self._wake.set()

    def _present(self, local_ids: set[str]) -> list[LiveMember]:
        """The members the last round learnt of, less this replica's that left since.

        Planned with the members that left, their partitions were given up (their lease
        let go, free for another replica to claim) and only claimed again for a member
        still here a round later. Members that joined here since wait for the next round,
        which has registered them: the other replicas do not know them yet, and a plan
        with them could give one of this replica's partitions to another replica's
        member, a move the plan made once every replica knows them may not make."""
        return [
            m for m in self.live if m.replica_id != self._replica_id or m.member_id in local_ids
        ]

    def _plan(self, live: list[LiveMember], leases: dict[int, str]) -> dict[int, str]:
        ids = [m.member_id for m in live]
        current: dict[str, list[int]] = {}
        for partition, member_id in leases.items():
            current.setdefault(member_id, []).append(partition)
        assigned = balance.assign(current, ids, self._partitions)
        return {p: m for m, ps in assigned.items() for p in ps}
