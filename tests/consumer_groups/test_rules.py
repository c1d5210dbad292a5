"""The consumer-group rules that need no server: partitions, balance, retry delays."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest

from server.consumer_groups.balance import assign
from server.consumer_groups.model import partition_of, retry_delay


def _crc32(data: bytes) -> int:
    """CRC-32/IEEE bit by bit (reflected polynomial 0xEDB88320), as clients may write it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_the_reference_crc_gives_the_published_check_value() -> None:
    assert _crc32(b"123456789") == 0xCBF43926


@pytest.mark.parametrize(
    "stream_id",
    ["", "a", "product-ABC", "order-1b4e28ba-2fa1-11d2-883f-0016d3cca427", "product-é.ü_-"],
)
def test_partition_is_crc32_of_the_utf8_stream_id_modulo_partitions(stream_id: str) -> None:
    crc = _crc32(stream_id.encode())
    assert crc == zlib.crc32(stream_id.encode())
    for partitions in (1, 7, 16, 256):
        assert partition_of(stream_id, partitions) == crc % partitions


def test_retry_delays_double_from_one_second_and_stop_at_sixty() -> None:
    assert [retry_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(1000) == 60


def _moves(before: dict[str, list[int]], after: dict[str, list[int]]) -> int:
    owner = {p: m for m, ps in before.items() for p in ps}
    return sum(1 for m, ps in after.items() for p in ps if owner.get(p) not in (None, m))


def _check_balanced(plan: dict[str, list[int]], members: list[str], partitions: int) -> None:
    assert set(plan) == set(members)
    everything = sorted(p for ps in plan.values() for p in ps)
    assert everything == list(range(partitions)), "every partition owned exactly once"
    counts = [len(ps) for ps in plan.values()]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(("members", "partitions"), [(1, 16), (3, 16), (5, 7), (20, 16), (4, 1)])
def test_a_fresh_assignment_is_balanced(members: int, partitions: int) -> None:
    names = [f"m{n}" for n in range(members)]
    plan = assign({}, names, partitions)
    _check_balanced(plan, names, partitions)
    if members > partitions:
        assert sum(not ps for ps in plan.values()) == members - partitions, "standbys"


def test_a_joining_member_takes_only_its_share() -> None:
    before = assign({}, ["a", "b"], 16)
    after = assign(before, ["a", "b", "c"], 16)
    _check_balanced(after, ["a", "b", "c"], 16)
    # c gets 5 (16 = 6 + 5 + 5): exactly those move, nothing is shuffled between a and b.
    assert _moves(before, after) == len(after["c"]) == 5


def test_a_leaving_member_s_partitions_are_the_only_ones_that_move() -> None:
    before = assign({}, ["a", "b", "c"], 16)
    survivors = {m: before[m] for m in ("a", "c")}
    after = assign(survivors, ["a", "c"], 16)
    _check_balanced(after, ["a", "c"], 16)
    assert _moves(survivors, after) == 0
    assert all(set(survivors[m]) <= set(after[m]) for m in ("a", "c"))


def _least_moves(kept: dict[str, list[int]], partitions: int) -> int:
    """What must move at least: each member keeps at most its quota, and the larger
    quotas are best given to those holding the most."""
    base, extra = divmod(partitions, len(kept))
    holdings = sorted((len(ps) for ps in kept.values()), reverse=True)
    return sum(max(0, held - base - (n < extra)) for n, held in enumerate(holdings))


def test_fewest_moves_under_random_churn() -> None:
    rng = random.Random(7)
    current: dict[str, list[int]] = {}
    names = itertools.count()
    members: list[str] = []
    for _ in range(300):
        if members and rng.random() < 0.45:
            members.remove(rng.choice(members))
        else:
            members.append(f"m{next(names)}")
        partitions = rng.choice((1, 5, 16))
        kept = {m: [p for p in current.get(m, []) if p < partitions] for m in members}
        plan = assign(kept, members, partitions)
        if not members:
            assert plan == {}
            continue
        _check_balanced(plan, members, partitions)
        assert _moves(kept, plan) == _least_moves(kept, partitions)
        current = plan
