"""Stream ids: the streams aggregates write, as a subscriber names them."""

from __future__ import annotations

import re

from domain.aggregates import Order, Product
from domain.values import PRODUCT_ID_PATTERN, UUID_PATTERN

STREAM_ID_FORMS = f"{Order.stream_prefix}-<order UUID> or {Product.stream_prefix}-<product_id>"


def recorded_stream_id(stream_id: str) -> str:
    """``stream_id`` as the store records it: an order's UUID in lower case, as the server
    writes every UUID. ValueError for an id that no aggregate's stream can have."""
    prefix, dash, aggregate_id = stream_id.partition("-")
    if dash and prefix == Order.stream_prefix and re.fullmatch(UUID_PATTERN, aggregate_id):
        return f"{prefix}-{aggregate_id.lower()}"
    if dash and prefix == Product.stream_prefix and re.fullmatch(PRODUCT_ID_PATTERN, aggregate_id):
        return stream_id
    raise ValueError(f"must be {STREAM_ID_FORMS}")
