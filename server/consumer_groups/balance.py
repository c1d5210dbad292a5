"""Spreading a group's partitions over its members: counts differ by at most one, and a
change of members moves as few partitions as possible."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def assign(
    current: Mapping[str, Sequence[int]], members: Sequence[str], partitions: int
) -> dict[str, list[int]]:
    """Each of ``members``' partitions (ascending), starting from ``current`` ownership.

    Members beyond the partition count get none (they stand by). Fewest moves: the
    larger quotas (one extra partition) go to the members that hold the most, each member
    keeps as many of its partitions as its quota allows, and only the rest move.
    """
    if not members:
        return {}
    rank = {member: n for n, member in enumerate(members)}
    kept = {
        member: sorted({p for p in current.get(member, ()) if 0 <= p < partitions})
        for member in members
    }
    base, extra = divmod(partitions, len(members))
    by_holding = sorted(members, key=lambda member: (-len(kept[member]), rank[member]))
    quota = {member: base + (n < extra) for n, member in enumerate(by_holding)}
    taken: set[int] = set()
    for member in members:
        # A partition claimed by two members (stale input) stays with the first.
        mine = [p for p in kept[member] if p not in taken][: quota[member]]
        kept[member] = mine
        taken.update(mine)
    free = [p for p in range(partitions) if p not in taken]
    free.reverse()
    for member in by_holding:
        while len(kept[member]) < quota[member]:
            kept[member].append(free.pop())
        kept[member].sort()
    return kept
