"""Translation between domain events and the store's neutral records.

Records keep the payload as stored; reading one upcasts it to the event's current shape
first when it was stored in an older one (``domain.upcasting``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter

from pydantic import Json, TypeAdapter, ValidationError
from pydantic_core import from_json

from domain.errors import UnreadableEventError
from domain.events import EVENT_TYPES, UPCASTERS, DomainEvent
from domain.ports import EventPayload, NewEvent, RecordedEvent


def to_new_event(event: DomainEvent, event_id: str, stream_id: str, version: int) -> NewEvent:
    # From positions: a ``NewEvent`` built from keywords cost 5,300 instructions, from
    # positions 2,500, twice per CreateOrder.
    return NewEvent(
        event_id,
        stream_id,
        version,
        event.event_type,
        _ADAPTERS[type(event)].serializer.to_json(event),
        event.SCHEMA_VERSION,
    )


UNDECODABLE = (KeyError, TypeError, ValueError)
"""What ``decode`` and ``decode_all`` raise for a payload that does not decode: an unknown
type (KeyError), an unknown version or a payload that is not JSON or does not fit
(ValueError, pydantic's ValidationError among them), or an upcaster given another shape
than its version's (TypeError, KeyError)."""


def to_domain_event(record: RecordedEvent) -> DomainEvent:
    """``decode`` of ``record``; raises ``UnreadableEventError`` naming its position, stream
    and type if it does not decode, so that the log of the command that failed on it says
    where the store is damaged."""
    try:
        return decode(record.event_type, record.schema_version, record.data)
    except UNDECODABLE as error:
        raise unreadable_event(
            record.position, record.stream_id, record.event_type, error
        ) from error


def unreadable_event(
    position: int, stream_id: str, event_type: str, error: Exception
) -> UnreadableEventError:
    """The error to raise ``from error``, which decoding the event at ``position`` raised,
    with a reason of one line: the log's traceback of ``error`` has the rest."""
    return UnreadableEventError(position, stream_id, event_type, undecodable_reason(error))


def undecodable_reason(error: Exception) -> str:
    """Why a payload did not decode (one of ``UNDECODABLE``), on one line."""
    if isinstance(error, ValidationError):
        # Its first problem without the input, which may be a customer's address; its
        # str begins with a heading ("1 validation error for OrderCreated") only.
        problems = error.errors(include_url=False, include_input=False)
        where = ".".join(map(str, problems[0]["loc"]))
        first = f"{where}: {problems[0]['msg']}" if where else problems[0]["msg"]
        return first + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    if isinstance(error, KeyError):
        return f"KeyError: {error}"  # its str is the key alone
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def decode(event_type: str, schema_version: int, data: bytes) -> DomainEvent:
    """The current-version event stored as ``data`` in ``schema_version`` of ``event_type``.

    Raises KeyError for an unknown type, ``UnknownSchemaVersionError`` for an unknown
    version, ``pydantic.ValidationError`` for a payload that does not fit.
    """
    adapter = _ADAPTERS[EVENT_TYPES[event_type]]
    if schema_version == EVENT_TYPES[event_type].SCHEMA_VERSION:
        return adapter.validate_json(data)
    payload = UPCASTERS.upcast(event_type, schema_version, from_json(data))
    return adapter.validate_python(payload)


def decode_all(payloads: Sequence[EventPayload]) -> list[DomainEvent]:
    """``decode`` of every payload, in order.

    Each run of events of one type stored in its current version is validated in one call
    of a list validator, which parses each payload on its own (``Json``): the tail a cold
    load replays after a snapshot decodes in about half the time of one call per event.
    """
    events: list[DomainEvent] = []
    for (event_type, schema_version), run in groupby(payloads, key=itemgetter(1, 2)):
        data = [payload[3] for payload in run]
        if len(data) > 1 and schema_version == EVENT_TYPES[event_type].SCHEMA_VERSION:
            events += _LIST_VALIDATORS[event_type].validate_python(data)
        else:
            events += [decode(event_type, schema_version, one) for one in data]
    return events


_ADAPTERS: dict[type[DomainEvent], TypeAdapter[DomainEvent]] = {
    event_class: TypeAdapter(event_class) for event_class in EVENT_TYPES.values()
}
"""How pydantic reads and writes each event class (JSON of its fields, in their order)."""

_LIST_VALIDATORS: dict[str, TypeAdapter[list[DomainEvent]]] = {
    name: TypeAdapter(list[Json[event_class]])  # type: ignore[valid-type]
    for name, event_class in EVENT_TYPES.items()
}
"""Built once (~0.2 ms each), not on a first load."""
