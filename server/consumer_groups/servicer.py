"""``ConsumerGroupService``: validates requests, maps them to ``ConsumerGroups`` and back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from orders.v1 import consumer_group_service_pb2 as pb
from orders.v1 import consumer_group_service_pb2_grpc as pb_grpc

from domain.events import EVENT_TYPES
from server.consumer_groups.engine import GroupRuntime, Member
from server.consumer_groups.model import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PARTITIONS,
    MAX_ACK_TIMEOUT,
    MAX_MAX_DELIVERIES,
    MAX_MAX_IN_FLIGHT,
    MAX_PARTITIONS,
    MIN_ACK_TIMEOUT,
    NAME,
    ConsumerGroupError,
    GroupClosedError,
    GroupExistsError,
    GroupNotFoundError,
    GroupSettings,
    MemberIdTakenError,
)
from server.consumer_groups.service import ConsumerGroups, GroupView
from server.rpc.decoding import UNPARSEABLE_STATUS, UnparseableRequestError
from server.rpc.status_mapping import ERROR_DOMAIN, bad_request_status, plain_status, status_for
from server.rpc.status_mapping import unexpected_error_status as _unexpected
from server.security.identity import current_caller

log = logging.getLogger("order_gateway.consumer_groups")

Context = grpc.aio.ServicerContext[Any, Any]
MAX_POSITION = 2**63 - 1
"""Positions are signed 64-bit in every store."""
MAX_DURATION_NANOS = 999_999_999
"""A protobuf Duration's nanos, either side of zero."""
NAME_RULE = "must be 1 to 64 characters of A-Z a-z 0-9 . _ -"


MAX_PAGE_SIZE = 1_000
"""ListConsumerGroups' largest page; a larger page_size asks for this many."""
_PAGE_TOKEN_PREFIX = "after:"


def page_token(last_name: str) -> str:
    """The ``next_page_token`` of a page that ends with the group ``last_name``: opaque to
    clients, and free to change shape with a prefix of its own."""
    return base64.urlsafe_b64encode((_PAGE_TOKEN_PREFIX + last_name).encode()).decode()


def page_token_name(token: str) -> str | None:
    """The group name a ``page_token`` continues after ("" for none), or None if it is
    not a token as this server writes them. A token names the group a page begins after,
    on any gateway of the store, whether or not that group still exists."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (ValueError, UnicodeError):
        return None
    name = text.removeprefix(_PAGE_TOKEN_PREFIX)
    # Decoding skips what is not base64 (spaces, "!", padding to spare): only the one
    # spelling this server writes is a token.
    if name == text or not NAME.fullmatch(name) or page_token(name) != token:
        return None
    return name


def _name_violations(path: str, name: str, required: bool = True) -> list[tuple[str, str]]:
    if not name and not required:
        return []
    return [] if NAME.fullmatch(name) else [(path, NAME_RULE)]


def settings_violations(settings: pb.ConsumerGroupSettings) -> list[tuple[str, str]]:
    known = ", ".join(EVENT_TYPES)
    violations = [
        (f"settings.event_types[{n}]", f"unknown event type {name!r}; known types: {known}")
        for n, name in enumerate(settings.event_types)
        if name not in EVENT_TYPES
    ]
    if settings.start_after_position > MAX_POSITION:
        violations.append(("settings.start_after_position", f"must be at most {MAX_POSITION}"))
    if settings.partitions > MAX_PARTITIONS:
        violations.append(("settings.partitions", f"must be 1 to {MAX_PARTITIONS} (0: 16)"))
    if settings.HasField("ack_timeout"):
        timeout = settings.ack_timeout
        seconds = timeout.seconds + timeout.nanos / 1e9
        if abs(timeout.nanos) > MAX_DURATION_NANOS or (
            timeout.seconds and timeout.nanos and (timeout.seconds < 0) != (timeout.nanos < 0)
        ):
            # Not a Duration at all, whatever it adds up to: protobuf's JSON mapping (and
            # so grpcurl and buf curl) refuses it, and so do the stubs of some languages.
            violations.append(
                (
                    "settings.ack_timeout",
                    "is no valid Duration: nanos must be from -999999999 to 999999999,"
                    " with the sign of seconds",
                )
            )
        elif not MIN_ACK_TIMEOUT <= seconds <= MAX_ACK_TIMEOUT:
            violations.append(("settings.ack_timeout", "must be from 1 s to 1 h (unset: 30 s)"))
    if settings.max_deliveries > MAX_MAX_DELIVERIES:
        violations.append(("settings.max_deliveries", f"must be 1 to {MAX_MAX_DELIVERIES} (0: 5)"))
    return violations


def effective_settings(settings: pb.ConsumerGroupSettings) -> GroupSettings:
    ack_timeout = (
        settings.ack_timeout.seconds + settings.ack_timeout.nanos / 1e9
        if settings.HasField("ack_timeout")
        else DEFAULT_ACK_TIMEOUT
    )
    return GroupSettings(
        event_types=tuple(sorted(set(settings.event_types))),
        start_after_position=settings.start_after_position,
        start_from_end=settings.start_from_end,
        partitions=settings.partitions or DEFAULT_PARTITIONS,
        ack_timeout=ack_timeout,
        max_deliveries=settings.max_deliveries or DEFAULT_MAX_DELIVERIES,
    )


def _settings_message(settings: GroupSettings) -> pb.ConsumerGroupSettings:
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(round(settings.ack_timeout * 1e9))
    return pb.ConsumerGroupSettings(
        event_types=settings.event_types,
        start_after_position=settings.start_after_position,
        start_from_end=settings.start_from_end,
        partitions=settings.partitions,
        ack_timeout=timeout,
        max_deliveries=settings.max_deliveries,
    )


def _timestamp(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def group_message(view: GroupView) -> pb.ConsumerGroup:
    return pb.ConsumerGroup(
        name=view.record.name,
        settings=_settings_message(view.record.settings),
        created_at=_timestamp(view.record.created_at),
        checkpoint=view.checkpoint,
        head_position=view.head_position,
        in_flight=view.in_flight,
        parked=view.parked,
        members=[
            pb.ConsumerGroupMember(
                member_id=m.member_id,
                user_id=m.user_id,
                partitions=m.partitions,
                in_flight=m.in_flight,
                joined_at=_timestamp(m.joined_at),
            )
            for m in view.members
        ],
        partition_states=[
            pb.PartitionState(
                partition=p.partition,
                checkpoint=p.checkpoint,
                member_id=p.member_id,
                in_flight=p.in_flight,
            )
            for p in view.partitions
        ],
    )


def group_status(error: BaseException) -> grpc.Status:
    """The status of a failed consumer-group call."""
    if isinstance(error, GroupNotFoundError):
        return _error_info_status(
            code_pb2.NOT_FOUND, str(error), error.reason, {"name": error.name}
        )
    if isinstance(error, GroupExistsError):
        return _error_info_status(
            code_pb2.ALREADY_EXISTS, str(error), error.reason, {"name": error.name}
        )
    if isinstance(error, MemberIdTakenError):
        return _error_info_status(
            code_pb2.ALREADY_EXISTS,
            str(error),
            error.reason,
            {"group": error.group, "member_id": error.member_id},
        )
    if isinstance(error, GroupClosedError):
        return plain_status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    return status_for(error) or _unexpected(error)


def _error_info_status(
    code: int, message: str, reason: str, metadata: dict[str, str]
) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=message, details=[detail])
    )
    return status


class ConsumerGroupServicer(pb_grpc.ConsumerGroupServiceServicer):
    def __init__(self, groups: ConsumerGroups) -> None:
        self._groups = groups

    async def CreateConsumerGroup(
        self, request: pb.CreateConsumerGroupRequest, context: Context
    ) -> pb.CreateConsumerGroupResponse:
        violations = _name_violations("name", request.name) + settings_violations(request.settings)
        if violations:
            await context.abort_with_status(bad_request_status(violations))
        try:
            created = await self._groups.create(request.name, effective_settings(request.settings))
            # Of the group created, not read again by name: deleted meanwhile, the create
            # still happened first (it answered NOT_FOUND, which a create has no use for).
            view = await self._groups.view_of(created)
        except Exception as error:
            await context.abort_with_status(group_status(error))
        return pb.CreateConsumerGroupResponse(group=group_message(view))

    async def GetConsumerGroup(
        self, request: pb.GetConsumerGroupRequest, context: Context
    ) -> pb.GetConsumerGroupResponse:
        await self._check_name(request.name, context)
        try:
            view = await self._groups.view(request.name)
        except Exception as error:
            await context.abort_with_status(group_status(error))
        return pb.GetConsumerGroupResponse(group=group_message(view))

    async def ListConsumerGroups(
        self, request: pb.ListConsumerGroupsRequest, context: Context
    ) -> pb.ListConsumerGroupsResponse:
        violations: list[tuple[str, str]] = []
        if request.page_size < 0:
            violations.append(("page_size", "must not be negative"))
        after = page_token_name(request.page_token)
        if after is None:
            violations.append(("page_token", "is not a next_page_token this server gave"))
        if violations or after is None:
            await context.abort_with_status(bad_request_status(violations))
        try:
            views, more = await self._groups.views(after, min(request.page_size, MAX_PAGE_SIZE))
        except Exception as error:
            await context.abort_with_status(group_status(error))
        return pb.ListConsumerGroupsResponse(
            groups=[group_message(view) for view in views],
            next_page_token=page_token(views[-1].record.name) if more else "",
        )

    async def DeleteConsumerGroup(
        self, request: pb.DeleteConsumerGroupRequest, context: Context
    ) -> pb.DeleteConsumerGroupResponse:
        await self._check_name(request.name, context)
        try:
            await self._groups.delete(request.name)
        except Exception as error:
            await context.abort_with_status(group_status(error))
        return pb.DeleteConsumerGroupResponse()

    async def ReplayParked(
        self, request: pb.ReplayParkedRequest, context: Context
    ) -> pb.ReplayParkedResponse:
        await self._check_name(request.name, context)
        try:
            replayed = await self._groups.replay_parked(request.name, request.limit)
        except Exception as error:
            await context.abort_with_status(group_status(error))
        return pb.ReplayParkedResponse(replayed=replayed)

    async def _check_name(self, name: str, context: Context) -> None:
        violations = _name_violations("name", name)
        if violations:
            await context.abort_with_status(bad_request_status(violations))

    async def Consume(
        self, request_iterator: AsyncIterator[pb.ConsumeRequest], context: Context
    ) -> AsyncIterator[pb.ConsumeResponse]:
        caller = current_caller.get()
        first = await _first_request(request_iterator, context)
        join = first.join
        violations = _name_violations("join.group", join.group) + _name_violations(
            "join.member_id", join.member_id, required=False
        )
        if join.max_in_flight > MAX_MAX_IN_FLIGHT:
            violations.append(("join.max_in_flight", f"must be 1 to {MAX_MAX_IN_FLIGHT} (0: 100)"))
        if violations:
            await context.abort_with_status(bad_request_status(violations))
        try:
            runtime, member = await self._groups.join(
                join.group,
                join.member_id,
                caller.user_id,
                join.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
            )
        except Exception as error:
            await context.abort_with_status(group_status(error))
        reader = asyncio.create_task(_read_requests(request_iterator, runtime, member))
        try:
            async for message in member.messages():
                yield message
        except _RequestsEndedError:
            pass
        except Exception as error:
            # As in Subscribe: the status is set, not aborted with, since the client may
            # already be gone (a shutdown or a delete racing a disconnect).
            status = _consume_failure(error)
            context.set_trailing_metadata(status.trailing_metadata)
            context.set_code(status.code)
            context.set_details(status.details)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await self._groups.leave(runtime, member)


async def _first_request(
    requests: AsyncIterator[pb.ConsumeRequest], context: Context
) -> pb.ConsumeRequest:
    try:
        first = await anext(requests, None)
    except UnparseableRequestError:
        await _refuse(context, UNPARSEABLE_STATUS)
    except Exception:
        first = None
    if first is None or first.WhichOneof("message") != "join":
        await _refuse(
            context, bad_request_status([("join", "the first message of Consume must be a join")])
        )
    assert first is not None
    return first


async def _refuse(context: Context, status: grpc.Status) -> NoReturn:
    """End a Consume that has not joined with ``status``."""
    try:
        await context.abort_with_status(status)
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The status could not be sent: the client went away (cancelled) before it
        # joined. Nothing to answer, and no fault of the server's.
        raise asyncio.CancelledError() from None
    raise AssertionError("abort_with_status returned")


class _BadStreamError(Exception):
    """The member sent something that is not a ConsumeRequest after joining."""


class _RequestsEndedError(Exception):
    """The member closed its side of the stream: no ack can come any more, so the call
    ends (OK) and its unsettled deliveries go back to the group."""


def _consume_failure(error: BaseException) -> grpc.Status:
    if isinstance(error, UnparseableRequestError):
        return UNPARSEABLE_STATUS
    if isinstance(error, _BadStreamError):
        return bad_request_status([("join", str(error))])
    if isinstance(error, ConsumerGroupError):
        return group_status(error)
    return status_for(error) or _unexpected(error)


MAX_REASON = 500


def _reason(reason: str) -> str:
    """A nack's reason as stored: its first ``MAX_REASON`` characters, each NUL replaced
    by U+FFFD, since PostgreSQL's text cannot hold NUL, and a reason it refused would stop
    the group from storing anything (the same on every store)."""
    return reason[:MAX_REASON].replace("\x00", "\ufffd")


async def _read_requests(
    requests: AsyncIterator[pb.ConsumeRequest], runtime: GroupRuntime, member: Member
) -> None:
    """Apply the member's acks, nacks and extends; the end of its requests ends its call."""
    try:
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind == "ack":
                runtime.ack(member, request.ack.event_ids)
            elif kind == "nack":
                nack = request.nack
                if nack.action == pb.NACK_ACTION_PARK:
                    runtime.park(member, nack.event_ids, _reason(nack.reason))
                elif nack.action == pb.NACK_ACTION_SKIP:
                    runtime.skip(member, nack.event_ids)
                else:
                    runtime.retry(member, nack.event_ids, _reason(nack.reason))
            elif kind == "extend":
                runtime.extend(member, request.extend.event_ids)
            elif kind == "join":
                member.end(_BadStreamError("join may only be the first message"))
                return
    except asyncio.CancelledError:
        raise
    except UnparseableRequestError as unparseable:
        member.end(unparseable)
        return
    except Exception:
        member.end(_BadStreamError("a request message could not be parsed"))
        return
    member.end(_RequestsEndedError())
