"""Settings to and from the JSON the SQL stores keep them in."""

from __future__ import annotations

import json
from typing import Any

from server.consumer_groups.model import GroupSettings


def settings_fields(settings: GroupSettings) -> dict[str, Any]:
    return {
        "event_types": list(settings.event_types),
        "start_after_position": settings.start_after_position,
        "start_from_end": settings.start_from_end,
        "partitions": settings.partitions,
        "ack_timeout": settings.ack_timeout,
        "max_deliveries": settings.max_deliveries,
    }


def settings_json(settings: GroupSettings) -> str:
    return json.dumps(settings_fields(settings), sort_keys=True)


def settings_from(data: str | dict[str, Any]) -> GroupSettings:
    fields = json.loads(data) if isinstance(data, str) else data
    return GroupSettings(
        event_types=tuple(fields["event_types"]),
        start_after_position=int(fields["start_after_position"]),
        start_from_end=bool(fields["start_from_end"]),
        partitions=int(fields["partitions"]),
        ack_timeout=float(fields["ack_timeout"]),
        max_deliveries=int(fields["max_deliveries"]),
    )
