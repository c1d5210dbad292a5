"""og_append's array parameters, encoded in PostgreSQL's binary array format in a few C calls.

psycopg adapts a Python list element by element through its general machinery (a dumper
looked up per list, dimensions and NULLs checked, each element dumped by a call of its
own): for the fifteen arguments of a 20-commit batch that was the store's largest client
cost, 1.75 million CPU instructions (counted with valgrind), 1.1 million with this module.
These arrays need none of that generality: one dimension, no NULLs, one known element
type. In binary, such an array is a fixed header then each element's length and bytes,
which ``struct`` and ``bytes.join`` build without a Python-level loop.

Register the dumpers on a connection with ``register``; then pass ``TextArray(values)``
and friends as query parameters.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from itertools import chain
from typing import Any

from psycopg.abc import AdaptContext
from psycopg.adapt import Dumper
from psycopg.postgres import types
from psycopg.pq import Format

_HEADER = struct.Struct(">iiIii")
"""Dimensions (1), has-NULLs flag (0), element type, then the dimension's length and
lower bound (1)."""
_EMPTY = struct.Struct(">iiI")
"""An empty array: no dimensions."""
_LENGTH = struct.Struct(">i").pack
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class TextArray(list[str]):
    """A ``text[]`` parameter."""


class BytesArray(list[bytes]):
    """A ``bytea[]`` parameter."""


class IntArray(list[int]):
    """An ``integer[]`` parameter: every value must fit in 32 bits."""


class BigintArray(list[int]):
    """A ``bigint[]`` parameter."""


class TimestamptzArray(list[dt.datetime]):
    """A ``timestamptz[]`` parameter: every value must be aware."""


def _variable(oid: int, items: list[bytes]) -> bytes:
    if not items:
        return _EMPTY.pack(0, 0, oid)
    lengths = map(_LENGTH, map(len, items))
    return b"".join(
        [
            _HEADER.pack(1, 0, oid, len(items), 1),
            *chain.from_iterable(zip(lengths, items, strict=True)),
        ]
    )


def _fixed(oid: int, code: str, size: int, values: list[int]) -> bytes:
    if not values:
        return _EMPTY.pack(0, 0, oid)
    fields: list[int] = [size, 0] * len(values)
    fields[1::2] = values
    # Each element: its length, then its value.
    layout = ">iiIii" + ("i" + code) * len(values)
    return struct.pack(layout, 1, 0, oid, len(values), 1, *fields)


def _text(oid: int, values: TextArray) -> bytes:
    return _variable(oid, [value.encode() for value in values])


def _bytes(oid: int, values: BytesArray) -> bytes:
    return _variable(oid, values)


def _int(oid: int, values: IntArray) -> bytes:
    return _fixed(oid, "i", 4, values)


def _bigint(oid: int, values: BigintArray) -> bytes:
    return _fixed(oid, "q", 8, values)


def _timestamptz(oid: int, values: TimestamptzArray) -> bytes:
    # PostgreSQL's binary timestamp: microseconds since 2000-01-01 UTC.
    return _fixed(oid, "q", 8, [(value - _PG_EPOCH) // _MICROSECOND for value in values])


def _dumper(element: str, encode: Callable[[int, Any], bytes]) -> type[Dumper]:
    info = types[element]

    class ArrayDumper(Dumper):
        format = Format.BINARY
        oid = info.array_oid

        def dump(self, obj: Any) -> bytes:
            return encode(info.oid, obj)

    return ArrayDumper


_DUMPERS: dict[type[list[Any]], type[Dumper]] = {
    TextArray: _dumper("text", _text),
    BytesArray: _dumper("bytea", _bytes),
    IntArray: _dumper("int4", _int),
    BigintArray: _dumper("int8", _bigint),
    TimestamptzArray: _dumper("timestamptz", _timestamptz),
}


def register(context: AdaptContext) -> None:
    """Dump the array types of this module in binary on connections of ``context``."""
    for cls, dumper in _DUMPERS.items():
        context.adapters.register_dumper(cls, dumper)
