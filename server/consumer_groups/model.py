"""The vocabulary of consumer groups: settings, stored records, partitions and errors."""

from __future__ import annotations

import datetime as dt
import re
import zlib
from dataclasses import dataclass

DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 256
DEFAULT_ACK_TIMEOUT = 30.0
MIN_ACK_TIMEOUT = 1.0
MAX_ACK_TIMEOUT = 3600.0
DEFAULT_MAX_DELIVERIES = 5
MAX_MAX_DELIVERIES = 100
DEFAULT_MAX_IN_FLIGHT = 100
MAX_MAX_IN_FLIGHT = 1000
RETRY_BASE = 1.0
"""Seconds before the first retry of a nacked event; doubled for every later failure."""
RETRY_CAP = 60.0
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""Group names and member ids."""


def partition_of(stream_id: str, partitions: int) -> int:
    """CRC-32 (IEEE, as zlib's) of the stream id's UTF-8 bytes, modulo ``partitions``:
    every event of a stream lands in one partition."""
    return zlib.crc32(stream_id.encode()) % partitions


def retry_delay(failures: int, base: float = RETRY_BASE) -> float:
    """Seconds to wait after the ``failures``-th failed delivery of an event: ``base``
    doubled for each failure after the first, at most ``RETRY_CAP``."""
    return min(base * 2.0 ** min(failures - 1, 32), RETRY_CAP)


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """A group's effective settings (defaults filled in), fixed for its life."""

    event_types: tuple[str, ...] = ()
    start_after_position: int = 0
    start_from_end: bool = False
    partitions: int = DEFAULT_PARTITIONS
    ack_timeout: float = DEFAULT_ACK_TIMEOUT
    """Seconds."""
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    def __post_init__(self) -> None:
        if self.start_from_end and self.start_after_position:
            # ``start_from_end`` wins: a position beside it is no part of where the group
            # starts, so it is neither reported nor compared (also for groups stored with
            # one, before this was so).
            object.__setattr__(self, "start_after_position", 0)


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """A group as stored."""

    name: str
    settings: GroupSettings
    created_at: dt.datetime
    start_position: int
    """Where delivery starts for a partition with no stored checkpoint: the settings'
    start, with ``start_from_end`` resolved to the head when the group was created."""


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event parked for a group, as stored."""

    event_id: str
    position: int
    partition: int
    reason: str
    parked_at: dt.datetime
    replaying: bool = False
    """Returned to delivery by ReplayParked and not settled again yet."""


@dataclass(frozen=True, slots=True)
class FailedAttempts:
    """The failed deliveries so far of an unsettled event, as stored for its group: its
    next delivery is attempt ``attempts + 1``, whichever process makes it."""

    event_id: str
    position: int
    partition: int
    attempts: int
    retry_at: float = 0.0
    """When its next delivery may be made (seconds since the epoch, as ``time.time()``):
    the end of the backoff after a nack, 0 after a timeout or a departure (at once)."""


class ConsumerGroupError(Exception):
    """Base of the errors a consumer-group call can fail with."""

    reason = "CONSUMER_GROUP_ERROR"


class GroupNotFoundError(ConsumerGroupError):
    reason = "CONSUMER_GROUP_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"consumer group {name!r} does not exist")
        self.name = name


class GroupExistsError(ConsumerGroupError):
    reason = "CONSUMER_GROUP_EXISTS"

    def __init__(self, name: str) -> None:
        super().__init__(f"consumer group {name!r} already exists with other settings")
        self.name = name


class MemberIdTakenError(ConsumerGroupError):
    reason = "MEMBER_ID_TAKEN"

    def __init__(self, group: str, member_id: str) -> None:
        super().__init__(f"member {member_id!r} is already connected to group {group!r}")
        self.group = group
        self.member_id = member_id


class GroupClosedError(ConsumerGroupError):
    """The gateway is shutting down."""
