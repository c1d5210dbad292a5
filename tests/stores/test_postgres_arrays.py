"""og_append's array parameters arrive in PostgreSQL exactly as they left Python."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from server.stores import postgres_arrays
from server.stores.postgres_arrays import (
    BigintArray,
    BytesArray,
    IntArray,
    TextArray,
    TimestamptzArray,
)

pytestmark = pytest.mark.postgres

PARIS = dt.timezone(dt.timedelta(hours=2))


@pytest.fixture
def conn(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        postgres_arrays.register(connection)
        connection.execute("SET TimeZone TO 'UTC'")
        yield connection


@pytest.mark.parametrize(
    ("array", "sql_type"),
    [
        (
            TextArray(["a", "", "Zoë «admin» 用户 💡", "x" * 10_000, '{"quoted", \\ NULL}']),
            "text[]",
        ),
        (BytesArray([b"", b"\x00\xff\x00", bytes(range(256))]), "bytea[]"),
        (IntArray([0, 1, -1, 2**31 - 1, -(2**31)]), "integer[]"),
        (BigintArray([0, 2**63 - 1, -(2**63)]), "bigint[]"),
        (
            TimestamptzArray(
                [
                    dt.datetime(2026, 11, 29, 15, 47, 52, 123456, tzinfo=dt.UTC),
                    dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
                    dt.datetime(1, 1, 1, tzinfo=dt.UTC),
                    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
                ]
            ),
            "timestamp with time zone[]",
        ),
        (TextArray(), "text[]"),
        (BigintArray(), "bigint[]"),
    ],
)
def test_arrays_round_trip_with_their_type(
    conn: psycopg.Connection[Any], array: list[Any], sql_type: str
) -> None:
    """No cast in the query: PostgreSQL reads the binary value as the type it is sent as."""
    row = conn.execute("SELECT %b, pg_typeof(%b)::text", (array, array)).fetchone()
    assert row == (list(array), sql_type)


def test_timestamps_in_another_zone_are_the_same_instants(conn: psycopg.Connection[Any]) -> None:
    paris = dt.datetime(2026, 6, 1, 12, 0, tzinfo=PARIS)
    row = conn.execute("SELECT %b::timestamptz[]", (TimestamptzArray([paris]),)).fetchone()
    assert row == ([dt.datetime(2026, 6, 1, 10, 0, tzinfo=dt.UTC)],)


def test_text_with_a_nul_character_is_refused_by_the_server(
    conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(psycopg.DataError):
        conn.execute("SELECT %b::text[]", (TextArray(["bad\x00text"]),))
