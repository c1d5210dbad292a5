"""Deciding a whole group-committed batch of appends in Python, for the SQLite writer.

The writer holds SQLite's one write lock (``BEGIN IMMEDIATE``) while it writes a batch,
so nothing it reads under that lock can change before its COMMIT. It reads the current
version of every stream the batch names, and which of the batch's command ids are
already recorded, in two statements for the whole batch; ``decide`` then walks the
commits in order, as the database would see them one after another, and says which ones
commit. That replaces a savepoint and two statements per commit.

``decide`` is exact or declines, and the batch then goes to the writer's per-commit
path, where the unique keys decide: an event whose version is not above its stream's
current version might or might not collide with a stored one (versions need not be
contiguous), and an event on a stream that no commit of the batch names in
``expected_versions`` has no current version looked up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set

from domain.errors import ConcurrencyConflictError, DomainError, DuplicateCommandError
from domain.ports import Commit


def stream_ids(commits: Iterable[Commit]) -> list[str]:
    """Every stream ``commits`` expect a version of or follow, each once: what to look up.

    Streams a commit appends to without naming them are not looked up; ``decide``
    declines such a batch (the unit of work names every stream it appends to).
    """
    streams: dict[str, object] = {}
    for commit in commits:
        streams.update(commit.expected_versions)  # only the keys matter
        streams.update(commit.follows)
    return list(streams)


def decide(
    commits: Sequence[Commit],
    versions: Mapping[str, int],
    last_events: Mapping[str, str | None] | None = None,
    recorded: Set[str] = frozenset(),
) -> list[DomainError | None] | None:
    """For each commit in order, the error that rejects it or None if it commits.

    ``versions``: the current version of each of ``stream_ids(commits)`` (0: no events);
    ``last_events``: the id of each one's last event (None: no events), for ``follows``;
    ``recorded``: which of the commits' command ids are stored already.
    A commit following a commit of the same batch sees that commit's events.
    A command id is a duplicate if it is in ``recorded`` or an earlier commit of the
    batch took it. A rejected
    commit changes nothing, so a later commit with the same command id, or one expecting
    the versions the rejected commit saw, can still commit, just as if each had been
    appended alone. Returns None when some commit needs the database's unique keys to
    decide (see the module's docstring).
    """
    taken: set[str] = set()
    current = dict(versions)
    lasts = dict(last_events or {})
    decisions: list[DomainError | None] = []
    for commit in commits:
        if commit.command_id in taken or commit.command_id in recorded:
            decisions.append(DuplicateCommandError(commit.command_id))
            continue
        stale = conflict(commit, current, lasts)
        if stale is not None:
            decisions.append(stale)
            continue
        for event in commit.events:
            version = current.get(event.stream_id)
            if version is None or event.stream_version <= version:
                return None
            # Updated event by event, so that two events of one commit claiming the same
            # version also end up here (the unique key rejects that commit).
            current[event.stream_id] = event.stream_version
            lasts[event.stream_id] = event.event_id
        taken.add(commit.command_id)
        decisions.append(None)
    return decisions


def conflict(
    commit: Commit, current: Mapping[str, int], lasts: Mapping[str, str | None]
) -> ConcurrencyConflictError | None:
    """Why ``commit`` cannot follow streams at ``current`` versions and ``lasts`` last
    events (both for every stream in ``stream_ids([commit])``), or None."""
    for stream_id, expected in commit.expected_versions.items():
        version = current[stream_id]
        if version != expected:
            return ConcurrencyConflictError(f"{stream_id} is at version {version}, not {expected}")
    for stream_id, event_id in commit.follows.items():
        if lasts.get(stream_id) != event_id:
            return ConcurrencyConflictError(f"{stream_id} has moved on from event {event_id}")
    return None
