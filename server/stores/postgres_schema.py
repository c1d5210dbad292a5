"""The PostgreSQL store's schema: numbered migrations, applied once each, in order.

``apply_migrations`` runs when a store opens (``serve``) and alone (``migrate``). It holds a
session-level advisory lock for the whole run, so replicas starting at once take turns: the
first applies what is missing, the others then find nothing left to do. Each migration and
its ``schema_migrations`` row commit in one transaction (DDL is transactional in
PostgreSQL), so a crash mid-way leaves the schema at a known version.

A database that is already up to date needs no privilege beyond reading
``schema_migrations``: nothing is created unless something is missing, so replicas may run
as a role that cannot change the schema once an owner has run ``migrate``. What that role
does need, ``check_schema`` asks for when a store opens (docs/operations.md, Privileges).

Append-only: never edit a released migration, add the next number instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

from domain.errors import StoreError
from server.stores.event_rows import GATEWAY_COLUMNS

log = logging.getLogger("order_gateway.store.postgres")

MIGRATION_LOCK = 0x6F67_6D69_6772_6174
"""``pg_advisory_lock`` key held while migrating ("ogmigrat"), one per database."""
APPEND_LOCK = 0x6F67_6170_7065_6E64
"""``pg_advisory_xact_lock`` key that serialises appends ("ogappend"); see ``og_append``."""
STREAM_LOCK_SPACE = 0x6F67_7374
"""First key of the two-key ``pg_advisory_lock`` a replica takes on a contended stream
("ogst"); the second is the stream id's hash."""
TURNS_CHANNEL = "order_gateway_turns"
"""A replica that begins to take turns at a stream notifies this channel with the stream's
id, so that the others take turns at it too (``domain.locks.StreamTurns``)."""
NOTIFY_CHANNEL = "order_gateway_events"
"""Every append transaction notifies this channel with the new head position."""
HEAD_POSITION = "SELECT coalesce(max(position), 0) FROM events"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE schema_migrations (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

_V1_EVENTS = f"""
CREATE TABLE commands (
    command_id text PRIMARY KEY,
    fingerprint text NOT NULL,
    -- The command's events are positions first_position .. first_position + event_count - 1.
    first_position bigint NOT NULL,
    event_count integer NOT NULL
);

CREATE TABLE events (
    position bigint PRIMARY KEY,
    event_id text NOT NULL,
    stream_id text NOT NULL,
    stream_version bigint NOT NULL,
    event_type text NOT NULL,
    data bytea NOT NULL,
    command_id text NOT NULL,
    correlation_id text NOT NULL,
    user_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

-- Appends a batch of commits (group commit) in one statement and, in autocommit mode, one
-- transaction: one round trip and one WAL flush for any number of commits. Returns one row
-- per commit, in order: outcome 'appended' (first_position set), 'duplicate' (command_id
-- already recorded) or 'conflict' (detail names the stream). A rejected commit writes
-- nothing; the others in the batch still commit. Commits of one call must be independent
-- (no stream or command_id in two of them: the caller splits batches there), so each is
-- checked against the committed state alone and the whole batch is handled set-wise, in
-- a fixed number of statements whatever its size. The unique keys back that up: a batch
-- breaking the rule fails as a whole rather than storing anything inconsistent.
--
-- Positions must never become visible out of order: a reader that has seen position N must
-- never later find a new event below N. With a sequence they would, because transactions
-- commit in a different order than they drew their numbers (Marten, Eventuous,
-- SQLStreamStore and commanded all shipped that bug). So every append first takes one
-- transaction-scoped advisory lock, and assigns positions under it as max(position) + 1.
-- PostgreSQL releases the lock only after the commit is visible, so the next writer's
-- positions are both higher and visible later: visibility order is position order, and
-- read_all needs no filter. Positions are also gapless, because a rolled-back append
-- never drew any. An advisory lock rather than LOCK TABLE ... IN EXCLUSIVE MODE (as the
-- eventsourcing library does) because it does not queue behind autovacuum or DDL on the
-- table, and readers never touch it.
--
-- The cost: appends from every process are serialised for the time of the checks, the
-- inserts and the commit's WAL flush, so throughput is bounded by one flush per batch.
-- Batching commits (the caller's group commit) is what buys it back. The lock is taken
-- first, before anything is written, because the checks below are only exact under it,
-- and because a writer holding a row of commands while waiting for the lock could
-- deadlock with the lock's holder.
CREATE FUNCTION og_append(
    p_command_ids text[],
    p_fingerprints text[],
    p_correlation_ids text[],
    p_user_ids text[],
    p_occurred_at timestamptz[],
    p_event_counts integer[],
    -- One row per (commit, stream it expects at a version); p_expected_commits holds the
    -- commit's index (1-based) in the arrays above.
    p_expected_commits integer[],
    p_expected_streams text[],
    p_expected_versions bigint[],
    -- One row per event, commits' events laid end to end in commit order.
    p_event_commits integer[],
    p_event_ids text[],
    p_stream_ids text[],
    p_stream_versions bigint[],
    p_event_types text[],
    p_data bytea[]
) RETURNS TABLE (outcome text, first_position bigint, detail text)
LANGUAGE plpgsql AS $$
DECLARE
    head bigint;
    appended bigint;
    outcomes text[];
    details text[];
    firsts bigint[];
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE the snapshot predates the lock, and the reads
    -- below could miss the append that committed just before it was ours.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'og_append needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'invalid_transaction_state';
    END IF;
    PERFORM pg_advisory_xact_lock({APPEND_LOCK});
    -- A statement of its own: in READ COMMITTED each statement of a plpgsql function takes
    -- a new snapshot, so this one sees every append that committed before the lock was ours.
    SELECT coalesce(max(e.position), 0) INTO head FROM events e;

    WITH stale AS (
        SELECT DISTINCT ON (x.commit_index)
               x.commit_index, format('%s is not at version %s', x.stream_id, x.expected) AS why
        FROM unnest(p_expected_commits, p_expected_streams, p_expected_versions)
            AS x(commit_index, stream_id, expected)
        WHERE x.expected <> coalesce(
            (SELECT max(e.stream_version) FROM events e WHERE e.stream_id = x.stream_id), 0)
        ORDER BY x.commit_index
    )
    SELECT array_agg(CASE WHEN k.command_id IS NOT NULL THEN 'duplicate'
                          WHEN s.why IS NOT NULL THEN 'conflict'
                          ELSE 'appended' END ORDER BY c.i),
           array_agg(CASE WHEN k.command_id IS NULL THEN s.why END ORDER BY c.i)
    INTO outcomes, details
    FROM unnest(p_command_ids) WITH ORDINALITY AS c(command_id, i)
    LEFT JOIN commands k ON k.command_id = c.command_id
    LEFT JOIN stale s ON s.commit_index = c.i;

    -- Appended commits take consecutive positions in commit order.
    SELECT array_agg(CASE WHEN r.outcome = 'appended' THEN head + 1 + r.before END ORDER BY r.i)
    INTO firsts
    FROM (
        SELECT c.outcome, c.i, coalesce(sum(c.event_count) FILTER (WHERE c.outcome = 'appended')
            OVER (ORDER BY c.i ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
        FROM unnest(outcomes, p_event_counts) WITH ORDINALITY AS c(outcome, event_count, i)
    ) r;

    INSERT INTO events (
        position, event_id, stream_id, stream_version, event_type, data,
        command_id, correlation_id, user_id, occurred_at)
    SELECT head + row_number() OVER (ORDER BY x.n), x.event_id, x.stream_id, x.stream_version,
           x.event_type, x.data, c.command_id, c.correlation_id, c.user_id, c.occurred_at
    FROM unnest(p_event_commits, p_event_ids, p_stream_ids, p_stream_versions, p_event_types,
                p_data) WITH ORDINALITY
        AS x(commit_index, event_id, stream_id, stream_version, event_type, data, n)
    JOIN unnest(p_command_ids, p_correlation_ids, p_user_ids, p_occurred_at, outcomes)
        WITH ORDINALITY AS c(command_id, correlation_id, user_id, occurred_at, outcome, i)
        ON c.i = x.commit_index
    WHERE c.outcome = 'appended';
    GET DIAGNOSTICS appended = ROW_COUNT;

    INSERT INTO commands (command_id, fingerprint, first_position, event_count)
    SELECT c.command_id, c.fingerprint, c.first_position, c.event_count
    FROM unnest(p_command_ids, p_fingerprints, firsts, p_event_counts)
        AS c(command_id, fingerprint, first_position, event_count)
    WHERE c.first_position IS NOT NULL;

    IF appended > 0 THEN
        -- Delivered at commit, to every process that LISTENs (other replicas included).
        PERFORM pg_notify('{NOTIFY_CHANNEL}', (head + appended)::text);
    END IF;
    RETURN QUERY SELECT * FROM unnest(outcomes, firsts, details);
END
$$;
"""

_V2_LOOKUPS_STAY_LOOKUPS = f"""
-- og_append as in version 1 (see its comment), with every read written so that it stays an
-- index lookup. PL/pgSQL caches each statement's plan per connection; after a few calls it
-- is a generic plan, made with the table sizes of that moment and kept until something
-- (an ANALYZE, maybe minutes later) invalidates it. On a new database, version 1's plans
-- were made for nearly empty tables and read whole tables instead: the duplicate check
-- hashed all of commands and, once the empty tables had been analyzed, the head position
-- was an aggregate over all of events' index. Appends got slower with every one (10 ms
-- per 20-commit batch at 20,000 commands, against 0.6 ms). Here:
-- * the head position and each stream's version are "ORDER BY ... DESC LIMIT 1", which an
--   index answers with the one entry at its end;
-- * the duplicate check is a scalar subquery, a primary key lookup per commit (an EXISTS
--   or a join may be planned as a hash of the whole table);
-- * sequential and bitmap scans are off inside the function, so that the indexes are the
--   only way to run these reads, whatever the statistics say.
-- Same signature and results, so replicas of the previous release keep working.
CREATE OR REPLACE FUNCTION og_append(
    p_command_ids text[],
    p_fingerprints text[],
    p_correlation_ids text[],
    p_user_ids text[],
    p_occurred_at timestamptz[],
    p_event_counts integer[],
    p_expected_commits integer[],
    p_expected_streams text[],
    p_expected_versions bigint[],
    p_event_commits integer[],
    p_event_ids text[],
    p_stream_ids text[],
    p_stream_versions bigint[],
    p_event_types text[],
    p_data bytea[]
) RETURNS TABLE (outcome text, first_position bigint, detail text)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    head bigint;
    appended bigint;
    outcomes text[];
    details text[];
    firsts bigint[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'og_append needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'invalid_transaction_state';
    END IF;
    PERFORM pg_advisory_xact_lock({APPEND_LOCK});
    head := coalesce((SELECT e.position FROM events e ORDER BY e.position DESC LIMIT 1), 0);

    WITH stale AS (
        SELECT DISTINCT ON (x.commit_index)
               x.commit_index, format('%s is not at version %s', x.stream_id, x.expected) AS why
        FROM unnest(p_expected_commits, p_expected_streams, p_expected_versions)
            AS x(commit_index, stream_id, expected)
        WHERE x.expected <> coalesce((
            SELECT e.stream_version FROM events e WHERE e.stream_id = x.stream_id
            ORDER BY e.stream_version DESC LIMIT 1), 0)
        ORDER BY x.commit_index
    ), checked AS MATERIALIZED (  -- so that the lookup runs once per commit, not per use
        SELECT c.i, s.why,
               (SELECT k.command_id FROM commands k WHERE k.command_id = c.command_id)
                   IS NOT NULL AS recorded
        FROM unnest(p_command_ids) WITH ORDINALITY AS c(command_id, i)
        LEFT JOIN stale s ON s.commit_index = c.i
    )
    SELECT array_agg(CASE WHEN d.recorded THEN 'duplicate'
                          WHEN d.why IS NOT NULL THEN 'conflict'
                          ELSE 'appended' END ORDER BY d.i),
           array_agg(CASE WHEN NOT d.recorded THEN d.why END ORDER BY d.i)
    INTO outcomes, details
    FROM checked d;

    SELECT array_agg(CASE WHEN r.outcome = 'appended' THEN head + 1 + r.before END ORDER BY r.i)
    INTO firsts
    FROM (
        SELECT c.outcome, c.i, coalesce(sum(c.event_count) FILTER (WHERE c.outcome = 'appended')
            OVER (ORDER BY c.i ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
        FROM unnest(outcomes, p_event_counts) WITH ORDINALITY AS c(outcome, event_count, i)
    ) r;

    INSERT INTO events (
        position, event_id, stream_id, stream_version, event_type, data,
        command_id, correlation_id, user_id, occurred_at)
    SELECT head + row_number() OVER (ORDER BY x.n), x.event_id, x.stream_id, x.stream_version,
           x.event_type, x.data, c.command_id, c.correlation_id, c.user_id, c.occurred_at
    FROM unnest(p_event_commits, p_event_ids, p_stream_ids, p_stream_versions, p_event_types,
                p_data) WITH ORDINALITY
        AS x(commit_index, event_id, stream_id, stream_version, event_type, data, n)
    JOIN unnest(p_command_ids, p_correlation_ids, p_user_ids, p_occurred_at, outcomes)
        WITH ORDINALITY AS c(command_id, correlation_id, user_id, occurred_at, outcome, i)
        ON c.i = x.commit_index
    WHERE c.outcome = 'appended';
    GET DIAGNOSTICS appended = ROW_COUNT;

    INSERT INTO commands (command_id, fingerprint, first_position, event_count)
    SELECT c.command_id, c.fingerprint, c.first_position, c.event_count
    FROM unnest(p_command_ids, p_fingerprints, firsts, p_event_counts)
        AS c(command_id, fingerprint, first_position, event_count)
    WHERE c.first_position IS NOT NULL;

    IF appended > 0 THEN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', (head + appended)::text);
    END IF;
    RETURN QUERY SELECT * FROM unnest(outcomes, firsts, details);
END
$$;
"""

_LOCK_STREAM_HEADER = "-- Takes a replica's session lock"
_V3_CHAINED = f"""
-- og_append as in version 2 (same lock, same positions, same results), except that:
-- * a commit may follow an earlier commit of the same call on a stream: the commits are
--   judged one after another, each against the state the ones before it left (a rejected
--   one leaves nothing), so a process can send a hot stream's pipelined commits in one
--   call instead of one call (and one WAL flush) per commit;
-- * each expected stream may also name the id of its last event (p_expected_events, ''
--   for none): a commit decided on a state that never committed conflicts even when
--   another writer filled its version.
-- The judging is a loop over the commits, on arrays read once: the version and last event
-- of every stream named (one index lookup each) and whether each command id is recorded.
-- og_append stays for replicas of the previous release.
CREATE FUNCTION og_append_chain(
    p_command_ids text[],
    p_fingerprints text[],
    p_correlation_ids text[],
    p_user_ids text[],
    p_occurred_at timestamptz[],
    p_event_counts integer[],
    p_expected_commits integer[],
    p_expected_streams text[],
    p_expected_versions bigint[],
    p_expected_events text[],
    p_event_commits integer[],
    p_event_ids text[],
    p_stream_ids text[],
    p_stream_versions bigint[],
    p_event_types text[],
    p_data bytea[]
) RETURNS TABLE (outcome text, first_position bigint, detail text)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    head bigint;
    appended bigint;
    commit_count integer := coalesce(array_length(p_command_ids, 1), 0);
    expected_count integer := coalesce(array_length(p_expected_commits, 1), 0);
    event_count integer := coalesce(array_length(p_event_commits, 1), 0);
    outcomes text[] := '{{}}';
    details text[] := '{{}}';
    firsts bigint[];
    recorded boolean[];
    streams text[];
    versions bigint[];
    lasts text[];
    taken text[] := '{{}}';
    x integer := 1;
    e integer := 1;
    k integer;
    why text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'og_append_chain needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'invalid_transaction_state';
    END IF;
    PERFORM pg_advisory_xact_lock({APPEND_LOCK});
    head := coalesce((SELECT e.position FROM events e ORDER BY e.position DESC LIMIT 1), 0);

    SELECT array_agg(s.stream_id), array_agg(coalesce(l.stream_version, 0)),
           array_agg(l.event_id)
    INTO streams, versions, lasts
    FROM (SELECT DISTINCT n.stream_id FROM unnest(p_expected_streams || p_stream_ids)
          AS n(stream_id)) s
    LEFT JOIN LATERAL (
        SELECT ev.stream_version, ev.event_id FROM events ev WHERE ev.stream_id = s.stream_id
        ORDER BY ev.stream_version DESC LIMIT 1) l ON true;

    SELECT array_agg((SELECT k.command_id FROM commands k WHERE k.command_id = c.command_id)
                     IS NOT NULL ORDER BY c.i)
    INTO recorded
    FROM unnest(p_command_ids) WITH ORDINALITY AS c(command_id, i);

    FOR i IN 1 .. commit_count LOOP
        why := NULL;
        WHILE x <= expected_count AND p_expected_commits[x] = i LOOP
            k := array_position(streams, p_expected_streams[x]);
            IF why IS NOT NULL THEN
                NULL;
            ELSIF versions[k] <> p_expected_versions[x] THEN
                why := format('%s is at version %s, not %s',
                              p_expected_streams[x], versions[k], p_expected_versions[x]);
            ELSIF p_expected_events[x] <> ''
                  AND lasts[k] IS DISTINCT FROM p_expected_events[x] THEN
                why := format('%s has moved on from event %s',
                              p_expected_streams[x], p_expected_events[x]);
            END IF;
            x := x + 1;
        END LOOP;
        IF recorded[i] OR p_command_ids[i] = ANY(taken) THEN
            outcomes := outcomes || 'duplicate'::text;
            details := details || NULL::text;
        ELSIF why IS NOT NULL THEN
            outcomes := outcomes || 'conflict'::text;
            details := details || why;
        ELSE
            outcomes := outcomes || 'appended'::text;
            details := details || NULL::text;
            taken := taken || p_command_ids[i];
        END IF;
        WHILE e <= event_count AND p_event_commits[e] = i LOOP
            IF outcomes[i] = 'appended' THEN
                k := array_position(streams, p_stream_ids[e]);
                versions[k] := p_stream_versions[e];
                lasts[k] := p_event_ids[e];
            END IF;
            e := e + 1;
        END LOOP;
    END LOOP;

    SELECT array_agg(CASE WHEN r.outcome = 'appended' THEN head + 1 + r.before END ORDER BY r.i)
    INTO firsts
    FROM (
        SELECT c.outcome, c.i, coalesce(sum(c.event_count) FILTER (WHERE c.outcome = 'appended')
            OVER (ORDER BY c.i ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
        FROM unnest(outcomes, p_event_counts) WITH ORDINALITY AS c(outcome, event_count, i)
    ) r;

    INSERT INTO events (
        position, event_id, stream_id, stream_version, event_type, data,
        command_id, correlation_id, user_id, occurred_at)
    SELECT head + row_number() OVER (ORDER BY x.n), x.event_id, x.stream_id, x.stream_version,
           x.event_type, x.data, c.command_id, c.correlation_id, c.user_id, c.occurred_at
    FROM unnest(p_event_commits, p_event_ids, p_stream_ids, p_stream_versions, p_event_types,
                p_data) WITH ORDINALITY
        AS x(commit_index, event_id, stream_id, stream_version, event_type, data, n)
    JOIN unnest(p_command_ids, p_correlation_ids, p_user_ids, p_occurred_at, outcomes)
        WITH ORDINALITY AS c(command_id, correlation_id, user_id, occurred_at, outcome, i)
        ON c.i = x.commit_index
    WHERE c.outcome = 'appended';
    GET DIAGNOSTICS appended = ROW_COUNT;

    INSERT INTO commands (command_id, fingerprint, first_position, event_count)
    SELECT c.command_id, c.fingerprint, c.first_position, c.event_count
    FROM unnest(p_command_ids, p_fingerprints, firsts, p_event_counts)
        AS c(command_id, fingerprint, first_position, event_count)
    WHERE c.first_position IS NOT NULL;

    IF appended > 0 THEN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', (head + appended)::text);
    END IF;
    RETURN QUERY SELECT * FROM unnest(outcomes, firsts, details);
END
$$;

{_LOCK_STREAM_HEADER} on a stream it contends for with other replicas (the
-- namespace, then the stream id's hash), waiting behind whoever holds it; returns whether
-- it had to wait. One round trip either way.
CREATE FUNCTION og_lock_stream(p_stream_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_lock({STREAM_LOCK_SPACE}, hashtext(p_stream_id)) THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_lock({STREAM_LOCK_SPACE}, hashtext(p_stream_id));
    RETURN true;
END
$$;
"""


def _replaced(text: str, *changes: tuple[str, str]) -> str:
    for old, new in changes:
        if text.count(old) != 1:
            raise AssertionError(f"expected one {old!r} in the migration it derives from")
        text = text.replace(old, new)
    return text


_V2_SIGNATURE = (
    "text[], text[], text[], text[], timestamptz[], integer[], integer[], text[], bigint[],"
    " integer[], text[], text[], bigint[], text[], bytea[]"
)
_CHAIN_SIGNATURE = (
    "text[], text[], text[], text[], timestamptz[], integer[], integer[], text[], bigint[],"
    " text[], integer[], text[], text[], bigint[], text[], bytea[]"
)


def _with_schema_versions(function_sql: str) -> str:
    """An append function's text with one more argument, each event's schema version,
    written into the new column. Its default keeps calls of the previous release working
    during a rolling upgrade: that release writes every payload in version 1, which is
    what a missing version means."""
    return _replaced(
        function_sql,
        (
            "    p_data bytea[]\n)",
            "    p_data bytea[],\n    p_schema_versions integer[] DEFAULT NULL\n)",
        ),
        (
            "x.event_type, x.data, c.command_id,",
            "x.event_type, x.data, coalesce(x.schema_version, 1), c.command_id,",
        ),
        (
            "position, event_id, stream_id, stream_version, event_type, data,\n",
            "position, event_id, stream_id, stream_version, event_type, data, schema_version,\n",
        ),
        (
            "                p_data) WITH ORDINALITY\n",
            "                p_data, p_schema_versions) WITH ORDINALITY\n",
        ),
        (
            "AS x(commit_index, event_id, stream_id, stream_version, event_type, data, n)",
            "AS x(commit_index, event_id, stream_id, stream_version, event_type, data,"
            " schema_version, n)",
        ),
    )


_V4_SCHEMA_VERSIONS = (
    # Existing rows read as 1, the version of every event stored before versions were; a
    # column with a constant default rewrites no row.
    "ALTER TABLE events ADD COLUMN schema_version integer NOT NULL DEFAULT 1;\n"
    f"DROP FUNCTION og_append({_V2_SIGNATURE});\n"
    + _with_schema_versions(_V2_LOOKUPS_STAY_LOOKUPS)
    + f"DROP FUNCTION og_append_chain({_CHAIN_SIGNATURE});\n"
    + _with_schema_versions(_V3_CHAINED[: _V3_CHAINED.index(_LOCK_STREAM_HEADER)])
)

_V6_CONSUMER_GROUPS = """
-- Consumer groups (server.consumer_groups.store_postgres), shared by every replica.
-- settings: the effective settings; start_position: start_from_end resolved at creation.
CREATE TABLE consumer_groups (
    name text PRIMARY KEY,
    settings jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    start_position bigint NOT NULL
);

CREATE TABLE consumer_group_checkpoints (
    group_name text NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
    partition integer NOT NULL,
    position bigint NOT NULL,
    PRIMARY KEY (group_name, partition)
);

CREATE TABLE consumer_group_parked (
    group_name text NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
    event_id text NOT NULL,
    position bigint NOT NULL,
    partition integer NOT NULL,
    reason text NOT NULL,
    parked_at timestamptz NOT NULL,
    replaying boolean NOT NULL DEFAULT false,
    PRIMARY KEY (group_name, event_id)
);

CREATE INDEX consumer_group_parked_age
    ON consumer_group_parked (group_name, replaying, parked_at, position);

-- Members connected to any replica, heartbeated; a row not renewed by expires_at is a
-- member whose replica died (server.consumer_groups.leases).
CREATE TABLE consumer_group_members (
    group_name text NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
    member_id text NOT NULL,
    replica_id text NOT NULL,
    user_id text NOT NULL,
    joined_at timestamptz NOT NULL,
    in_flight integer NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, member_id)
);

-- Which member may deliver a partition, until expires_at unless renewed. A claim only
-- takes a free or expired lease (or one its own replica holds).
CREATE TABLE consumer_group_leases (
    group_name text NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
    partition integer NOT NULL,
    member_id text NOT NULL,
    replica_id text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, partition)
);
"""

_V8_LOCK_AND_READ = f"""
-- og_lock_stream, and in the same round trip the stream's events after the version the
-- replica already knows: a replica's turn at a contended stream (domain.locks.StreamTurns)
-- begins by reading what the previous holder wrote, and paid a second round trip for it.
-- The read is a statement of its own, after the lock is granted: in READ COMMITTED it
-- takes a new snapshot, which holds every append the previous holder made in its turn (a
-- holder lets go only once its appends have committed). Returns one row per event, in
-- version order, each with whether the lock had to be waited for; one row of nulls but
-- that when there is no event. og_lock_stream stays for replicas of the previous release;
-- both take the same lock.
CREATE FUNCTION og_lock_stream_after(p_stream_id text, p_after_version bigint)
RETURNS TABLE (
    waited boolean, event_id text, stream_id text, stream_version bigint, "position" bigint,
    occurred_at timestamptz, command_id text, correlation_id text, user_id text,
    event_type text, data bytea, schema_version integer
)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    had_to_wait boolean := false;
BEGIN
    IF NOT pg_try_advisory_lock({STREAM_LOCK_SPACE}, hashtext(p_stream_id)) THEN
        PERFORM pg_advisory_lock({STREAM_LOCK_SPACE}, hashtext(p_stream_id));
        had_to_wait := true;
    END IF;
    RETURN QUERY
        SELECT had_to_wait, e.event_id, e.stream_id, e.stream_version, e.position,
               e.occurred_at, e.command_id, e.correlation_id, e.user_id, e.event_type,
               e.data, e.schema_version
        FROM events e
        WHERE e.stream_id = p_stream_id AND e.stream_version > p_after_version
        ORDER BY e.stream_version;
    IF NOT FOUND THEN
        RETURN QUERY SELECT had_to_wait, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
            NULL::timestamptz, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bytea,
            NULL::integer;
    END IF;
END
$$;
"""

_V10_TRY_LOCK_AND_READ = f"""
-- og_lock_stream_after without the wait: takes the stream's lock only if no other session
-- holds it and, if it did, reads in the same round trip the stream's events after the
-- version the replica already knows. A replica tries this first on the one session that
-- holds every stream lock it could take at once, so that contending for many streams
-- does not cost it a connection per stream; only a lock it has to wait for takes a
-- session of its own (og_lock_stream_after). The read is a statement of its own after the
-- lock, for the snapshot reason og_lock_stream_after gives. One row per event, each with
-- whether the lock was taken; one row of nulls but that when it was not or there is no
-- event.
CREATE FUNCTION og_try_lock_stream_after(p_stream_id text, p_after_version bigint)
RETURNS TABLE (
    locked boolean, event_id text, stream_id text, stream_version bigint, "position" bigint,
    occurred_at timestamptz, command_id text, correlation_id text, user_id text,
    event_type text, data bytea, schema_version integer
)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
    IF pg_try_advisory_lock({STREAM_LOCK_SPACE}, hashtext(p_stream_id)) THEN
        RETURN QUERY
            SELECT true, e.event_id, e.stream_id, e.stream_version, e.position,
                   e.occurred_at, e.command_id, e.correlation_id, e.user_id, e.event_type,
                   e.data, e.schema_version
            FROM events e
            WHERE e.stream_id = p_stream_id AND e.stream_version > p_after_version
            ORDER BY e.stream_version;
        IF FOUND THEN
            RETURN;
        END IF;
        RETURN QUERY SELECT true, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
            NULL::timestamptz, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bytea,
            NULL::integer;
        RETURN;
    END IF;
    RETURN QUERY SELECT false, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
        NULL::timestamptz, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bytea,
        NULL::integer;
END
$$;
"""

_V9_ATTEMPTS = """
-- The failed attempts of consumer groups' unsettled events, so that the count goes on
-- whichever replica delivers the event next, and after a restart. A row exists only for
-- an event that failed at least once and is not settled yet.
CREATE TABLE consumer_group_attempts (
    group_name text NOT NULL REFERENCES consumer_groups ON DELETE CASCADE,
    event_id text NOT NULL,
    position bigint NOT NULL,
    partition integer NOT NULL,
    attempts integer NOT NULL,
    PRIMARY KEY (group_name, event_id)
);
"""

_V12_LOCK_STREAM = (
    "-- og_lock_stream came into migration 3 after databases had been migrated by its first\n"
    "-- text, which lacked it: those have no such function, and a replica's turn at a stream\n"
    "-- it has not cached calls it. Made (again) here, the same function.\n"
    + _replaced(
        _V3_CHAINED[_V3_CHAINED.index(_LOCK_STREAM_HEADER) :],
        ("CREATE FUNCTION og_lock_stream(", "CREATE OR REPLACE FUNCTION og_lock_stream("),
    )
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events, commands and og_append()", _V1_EVENTS),
    Migration(2, "og_append() reads only by index lookups", _V2_LOOKUPS_STAY_LOOKUPS),
    Migration(
        3,
        "og_append_chain(): commits that follow one another, in one call; og_lock_stream()",
        _V3_CHAINED,
    ),
    Migration(
        4,
        "events.schema_version, written by og_append() and og_append_chain()",
        _V4_SCHEMA_VERSIONS,
    ),
    Migration(
        5,
        "snapshots",
        """
        CREATE TABLE snapshots (
            stream_id text PRIMARY KEY,
            stream_version bigint NOT NULL,
            schema_version integer NOT NULL,
            data bytea NOT NULL
        )
        """,
    ),
    Migration(
        6,
        "consumer groups: groups, checkpoints, parked events, members, partition leases",
        _V6_CONSUMER_GROUPS,
    ),
    Migration(
        7,
        "consumer group leases carry their partition's deliveries in flight",
        "ALTER TABLE consumer_group_leases ADD COLUMN in_flight integer NOT NULL DEFAULT 0",
    ),
    Migration(
        8,
        "og_lock_stream_after(): a stream's lock and its new events in one round trip",
        _V8_LOCK_AND_READ,
    ),
    Migration(
        9,
        "consumer groups: the failed attempts of unsettled events",
        _V9_ATTEMPTS,
    ),
    Migration(
        10,
        "og_try_lock_stream_after(): a stream's lock if free, and its new events",
        _V10_TRY_LOCK_AND_READ,
    ),
    Migration(
        11,
        "consumer groups: when a failed event's next delivery may be made (a nack's backoff)",
        "ALTER TABLE consumer_group_attempts ADD COLUMN retry_at timestamptz",
    ),
    Migration(
        12,
        "og_lock_stream() where migration 3 was applied before it held that function",
        _V12_LOCK_STREAM,
    ),
)


CONSUMER_GROUP_TABLES = (
    "consumer_groups",
    "consumer_group_checkpoints",
    "consumer_group_parked",
    "consumer_group_attempts",
    "consumer_group_members",
    "consumer_group_leases",
)
TABLES = ("schema_migrations", "events", "commands", "snapshots", *CONSUMER_GROUP_TABLES)
"""Every table of this release's schema."""
FUNCTIONS = (
    "og_append_chain",
    "og_lock_stream",
    "og_lock_stream_after",
    "og_try_lock_stream_after",
)
"""The functions this release calls (og_append stays for replicas of older releases)."""

_OBJECTS = (*(("table", name) for name in TABLES), *(("function", name) for name in FUNCTIONS))

SERVING_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "schema_migrations": ("SELECT",),
    "events": ("SELECT", "INSERT"),
    "commands": ("SELECT", "INSERT"),
    **{name: ("SELECT", "INSERT", "UPDATE", "DELETE") for name in CONSUMER_GROUP_TABLES},
    **{name: ("EXECUTE",) for name in FUNCTIONS},
}
"""What a role serving the store needs: docs/operations.md, Privileges (besides CONNECT
and USAGE on the schema, which it could not have got this far without)."""
SNAPSHOT_PRIVILEGES: dict[str, tuple[str, ...]] = {"snapshots": ("SELECT", "INSERT", "UPDATE")}
"""What a role serving the store needs to keep snapshots, which it can serve without."""
READING_PRIVILEGES: dict[str, tuple[str, ...]] = {
    name: ("SELECT",) for name in ("schema_migrations", "events", "commands")
}
"""What a role verifying the store needs."""

_CHECK = """
SELECT current_user, r.kind, r.name, r.privilege, o.id IS NOT NULL,
       CASE r.kind WHEN 'table' THEN has_table_privilege(o.id, r.privilege)
                   ELSE has_function_privilege(o.id, r.privilege) END
FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS r(kind, name, privilege, i)
CROSS JOIN LATERAL (
    SELECT CASE r.kind WHEN 'table' THEN to_regclass(r.name)::oid
                       ELSE to_regproc(r.name)::oid END AS id
) AS o
ORDER BY r.i
"""


@dataclass(frozen=True, slots=True)
class SchemaCheck:
    role: str
    """The session's role (``current_user``)."""
    missing: list[str]
    """The tables and functions the database lacks, as "table commands" or "function
    og_append_chain()"."""
    denied: list[tuple[str, str]]
    """The privileges asked for that the role lacks, as (privilege, table or function),
    a function's name followed by "()"."""


async def check_schema(
    conn: psycopg.AsyncConnection[TupleRow], privileges: dict[str, tuple[str, ...]]
) -> SchemaCheck:
    """Which of ``TABLES`` and ``FUNCTIONS`` the database lacks (none once its migrations
    are applied, unless one was dropped since) and which of ``privileges`` (by table or
    function) the role lacks on the others, in one query."""
    asked = [
        (kind, name, privilege)
        for kind, name in _OBJECTS
        # None: only whether it exists (has_table_privilege is strict: NULL).
        for privilege in privileges.get(name, (None,))
    ]
    kinds, names, wanted = (list(column) for column in zip(*asked, strict=True))
    cursor = await conn.execute(_CHECK, (kinds, names, wanted))
    rows = await cursor.fetchall()
    missing = [f"{kind} {_shown(kind, name)}" for _, kind, name, _, exists, _ in rows if not exists]
    return SchemaCheck(
        role=str(rows[0][0]),
        missing=list(dict.fromkeys(missing)),
        denied=[
            (privilege, _shown(kind, name))
            for _, kind, name, privilege, exists, granted in rows
            if exists and privilege is not None and not granted
        ],
    )


def _shown(kind: str, name: str) -> str:
    return f"{name}()" if kind == "function" else name


class ForeignDatabaseError(StoreError):
    """The database holds another program's tables under the gateway's names."""


_RECORDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "schema_migrations": ("version", "description"),
    "events": GATEWAY_COLUMNS,
}
"""The columns without which a table of the gateway's name is not the gateway's: the
migrations table that another framework may have under the same name (Rails' holds
``version`` alone), and the log's."""

_OURS_IN_CURRENT_SCHEMA = """
SELECT c.relname,
       array_agg(a.attname::text) FILTER (WHERE a.attnum > 0 AND NOT a.attisdropped)
FROM pg_class AS c
LEFT JOIN pg_attribute AS a ON a.attrelid = c.oid
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
  AND c.relname = ANY(%s)
GROUP BY c.relname
"""
"""The relations of the gateway's table names in the schema its tables are created in,
with their columns: a relation of any kind there (an index, a view) stops a CREATE
TABLE of its name."""


async def _refuse_foreign_tables(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    """Refuse, before anything is created, a database whose tables of the gateway's names
    are another program's: there without a ``schema_migrations`` table recording them,
    or without the gateway's columns. The first migration would fail on them ("relation
    events already exists"), or the gateway's tables would be mixed with theirs."""
    cursor = await conn.execute(_OURS_IN_CURRENT_SCHEMA, (list(TABLES),))
    present = {str(name): set(columns or ()) for name, columns in await cursor.fetchall()}
    if "schema_migrations" not in present:
        foreign = sorted(present)
    else:
        foreign = sorted(
            name
            for name, needed in _RECORDED_COLUMNS.items()
            if name in present and not present[name].issuperset(needed)
        )
    if foreign:
        raise ForeignDatabaseError(
            f"the database holds another program's tables ({', '.join(foreign)}): give the"
            " gateway a database or schema of its own; see docs/operations.md"
        )


async def apply_migrations(conn: psycopg.AsyncConnection[TupleRow]) -> list[int]:
    """Apply every missing migration in order; returns the versions applied now.

    ``conn`` must be in autocommit mode; it holds the migration lock until this returns.
    """
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        # Under the lock: a replica migrating meanwhile has recorded what it created.
        await _refuse_foreign_tables(conn)
        return await _apply_missing(conn)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


async def missing_migrations(conn: psycopg.AsyncConnection[TupleRow]) -> list[int]:
    """The versions of this release's migrations that the database lacks, changing
    nothing (a store opened only to be read is not upgraded)."""
    applied = await _applied(conn)
    return [m.version for m in MIGRATIONS if applied is None or m.version not in applied]


async def _applied(conn: psycopg.AsyncConnection[TupleRow]) -> set[int] | None:
    """The versions recorded in ``schema_migrations``; None without that table."""
    cursor = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return None
    cursor = await conn.execute("SELECT version FROM schema_migrations")
    return {int(version) for (version,) in await cursor.fetchall()}


async def _apply_missing(conn: psycopg.AsyncConnection[TupleRow]) -> list[int]:
    found = await _applied(conn)
    recorded = found is not None
    applied = found or set()
    known = {migration.version for migration in MIGRATIONS}
    if newer := sorted(applied - known):
        # A newer release migrated this database (a rolling upgrade): keep serving, as
        # migrations only ever add, but say so.
        log.warning("the database has schema versions %s that this release does not know", newer)
    done: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in applied:
            continue
        async with conn.transaction():
            if not recorded:
                # In the first migration's transaction: a database it fails on (another
                # program's, with a table of the gateway's names) is left as it was.
                await conn.execute(_CREATE_MIGRATIONS_TABLE)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
        recorded = True
        log.info("applied schema migration %d: %s", migration.version, migration.description)
        done.append(migration.version)
    return done
