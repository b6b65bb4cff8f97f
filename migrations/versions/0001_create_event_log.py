"""Create the event table, its append-only triggers and the publish functions.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import zlib

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# The SQL functions enforce the library's limits. NOTE: a database keeps the
# limits of the revision that created its functions, so a changed limit needs a
# new revision that replaces them.
from eventlog._encoding import MAX_TOPIC_BYTES, MAX_TOPICS_PER_EVENT, MAX_TYPE_BYTES

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Namespace of the two-key advisory lock that orders publishing ("evlg" in ASCII);
# the second key is derived from the schema name, so each log has its own lock.
LOCK_CLASS = 0x65766C67

# The characters for which Python's str.isspace() is true (29 in Python 3.11),
# as escapes for a bracket expression of a PostgreSQL regular expression. They
# are spelt out because [[:space:]] depends on the database's locale, and under
# the C locale it matches neither U+001C to U+001F nor U+00A0. A test compares
# this list with str.isspace() over every code point.
WHITESPACE = (
    r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a"
    r"\u2028\u2029\u202f\u205f\u3000"
)


def lock_key(schema: str) -> int:
    return zlib.crc32(schema.encode()) & 0x7FFFFFFF


def upgrade() -> None:
    schema = op.get_context().opts["eventlog_schema"]

    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("topics", postgresql.ARRAY(sa.Text), nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("metadata", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column(
            "occurred_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.CheckConstraint("cardinality(topics) >= 1", name="events_topics_not_empty"),
        schema=schema,
    )
    op.create_index("events_topics_idx", "events", ["topics"], schema=schema, postgresql_using="gin")
    op.create_index(
        "events_occurred_at_idx", "events", ["occurred_at"], schema=schema, postgresql_using="brin"
    )
    op.execute(f"COMMENT ON TABLE {schema}.events IS 'eventlog: append-only event log'")

    for statement in _functions(schema):
        op.execute(statement)


def downgrade() -> None:
    schema = op.get_context().opts["eventlog_schema"]
    op.execute(f"DROP FUNCTION IF EXISTS {schema}.publish_batch_v1(jsonb, text[], jsonb[], jsonb[])")
    op.execute(f"DROP FUNCTION IF EXISTS {schema}.publish_v1(text[], text, jsonb, jsonb)")
    op.drop_table("events", schema=schema)
    op.execute(f"DROP FUNCTION IF EXISTS {schema}.reject_change_v1()")
    op.execute(f"DROP FUNCTION IF EXISTS {schema}.channel_v1(text)")
    op.execute(f"DROP FUNCTION IF EXISTS {schema}.ordering_lock_v1()")


def _functions(schema: str) -> list[str]:
    key = lock_key(schema)
    return [
        # The topic -> channel mapping; eventlog/_channels.py implements the same
        # rules for the listener, and a test compares the two. Declared STABLE (as
        # convert_to is) and not STRICT, so that the planner inlines it into the
        # publish functions' queries instead of calling it per topic; a NULL topic
        # still maps to NULL.
        f"""
CREATE FUNCTION {schema}.channel_v1(topic text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT CASE
        WHEN topic ~ '^[A-Za-z0-9_.:/-]+$' AND octet_length(topic) <= {63 - len(schema) - 1}
        THEN '{schema}:' || topic
        ELSE '{schema}#' || left(encode(sha256(convert_to(topic, 'UTF8')), 'hex'), 32)
    END
$fn$""",
        f"""
CREATE FUNCTION {schema}.reject_change_v1() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'the event log %.% is append-only: % is not allowed',
        TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = '55EL1',
              HINT = 'Publish a new event that corrects or reverses the earlier one.';
END
$fn$""",
        f"""
CREATE TRIGGER events_reject_update_delete
    BEFORE UPDATE OR DELETE ON {schema}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.reject_change_v1()""",
        f"""
CREATE TRIGGER events_reject_truncate
    BEFORE TRUNCATE ON {schema}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.reject_change_v1()""",
        # The ordering lock. Ids come from the identity sequence when a row is
        # inserted, but transactions commit in any order, so without a lock id 104
        # could commit after a reader already saw 105, and a reader that resumes
        # "after 105" would skip 104 for good. Every writer takes this
        # transaction-scoped lock before its INSERT, so ids are assigned one
        # transaction at a time and the lock is held until that transaction ends:
        # ids become visible in id order. Whatever takes it must be the last
        # statement of its transaction. A SQL function with one expression, so
        # that the planner inlines it into the statements that call it; the
        # library's own publish statement (eventlog/_sql.py) calls it too.
        f"""
CREATE FUNCTION {schema}.ordering_lock_v1() RETURNS void
LANGUAGE sql VOLATILE AS $fn$
    SELECT pg_advisory_xact_lock({LOCK_CLASS}, {key})
$fn$""",
        # Publishing one event, for SQL callers. No library code checked the
        # arguments first, so it applies the rules of eventlog._encoding itself
        # (see _topic_problem, _type_problem, _data_problem and _metadata_problem)
        # and stores each topic once, in first-seen order. The checks come before
        # the ordering lock, so that a rejected call never takes it.
        f"""
CREATE FUNCTION {schema}.publish_v1(
    topics text[], type text, data jsonb DEFAULT '{{}}', metadata jsonb DEFAULT '{{}}'
) RETURNS TABLE (id bigint, occurred_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    unique_topics text[];
    error_message text;
    new_id bigint;
    new_time timestamptz;
BEGIN
    IF publish_v1.topics IS NULL OR cardinality(publish_v1.topics) = 0 THEN
        error_message := 'no topic given: an event needs at least one topic';
    ELSIF array_ndims(publish_v1.topics) > 1 THEN
        error_message := format('invalid topics %s: expected a one-dimensional array',
                                {_shortened("publish_v1.topics::text")});
    ELSE
        SELECT (SELECT p.problem
                FROM unnest(publish_v1.topics) WITH ORDINALITY AS x(topic, pos),
                     LATERAL (SELECT {_topic_problem("x.topic", "''")}) AS p(problem)
                WHERE p.problem IS NOT NULL
                ORDER BY x.pos
                LIMIT 1),
               ARRAY(SELECT x.topic
                     FROM unnest(publish_v1.topics) WITH ORDINALITY AS x(topic, pos)
                     GROUP BY x.topic
                     ORDER BY min(x.pos))
        INTO error_message, unique_topics;
        error_message := coalesce(
            error_message,
            {_topic_count_problem("cardinality(unique_topics)", "''")},
            {_type_problem("publish_v1.type", "''")},
            {_data_problem("publish_v1.data", "''", _OMIT_DATA)},
            {_metadata_problem("publish_v1.metadata", "''")});
    END IF;
    IF error_message IS NOT NULL THEN
        RAISE EXCEPTION '%', error_message USING ERRCODE = '22023';
    END IF;

    PERFORM {schema}.ordering_lock_v1();
    INSERT INTO {schema}.events AS e (topics, type, data, metadata)
    VALUES (unique_topics, publish_v1.type,
            coalesce(publish_v1.data, '{{}}'), coalesce(publish_v1.metadata, '{{}}'))
    RETURNING e.id, e.occurred_at INTO new_id, new_time;

    -- A doorbell, not a message: the payload is only the new id, as a hint.
    PERFORM pg_notify(c.channel, new_id::text)
    FROM (SELECT DISTINCT {schema}.channel_v1(t) AS channel
          FROM unnest(unique_topics) AS t) AS c;

    id := new_id;
    occurred_at := new_time;
    RETURN NEXT;
END
$fn$""",
        # Publishing many events in one statement, under the ordering lock.
        # topics is a JSON array with one array of topics per event; types, data
        # and metadata are parallel arrays. Each event gets the checks of
        # publish_v1, before the lock, and an error names the first invalid event
        # by its position, counted from 1 as in the SQL arrays.
        f"""
CREATE FUNCTION {schema}.publish_batch_v1(
    topics jsonb, types text[], data jsonb[], metadata jsonb[]
) RETURNS TABLE (id bigint, occurred_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    batch_topics jsonb := publish_batch_v1.topics;
    has_duplicates boolean;
    error_message text;
    ids bigint[];
    times timestamptz[];
BEGIN
    IF jsonb_typeof(publish_batch_v1.topics) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid batch topics %: expected a JSON array with one array of topics per event',
            coalesce({_shortened("publish_batch_v1.topics::text")}, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF jsonb_array_length(publish_batch_v1.topics) <> coalesce(cardinality(publish_batch_v1.types), 0)
       OR cardinality(publish_batch_v1.types) <> cardinality(publish_batch_v1.data)
       OR cardinality(publish_batch_v1.types) <> cardinality(publish_batch_v1.metadata) THEN
        RAISE EXCEPTION 'invalid batch: topics, types, data and metadata must have one entry per event, not %, %, % and %',
            jsonb_array_length(publish_batch_v1.topics), cardinality(publish_batch_v1.types),
            cardinality(publish_batch_v1.data), cardinality(publish_batch_v1.metadata)
            USING ERRCODE = '22023';
    END IF;

    -- One pass over the events finds the first problem, in the order of the
    -- batch, and whether any event names a topic twice.
    SELECT (array_agg(c.problem ORDER BY c.ord) FILTER (WHERE c.problem IS NOT NULL))[1],
           coalesce(bool_or(c.repeats), false)
    INTO error_message, has_duplicates
    FROM (
        SELECT e.ord,
               t.distinct_topics < t.all_topics AS repeats,
               coalesce(
                   CASE
                       WHEN jsonb_typeof(e.event_topics) <> 'array' THEN format(
                           'invalid topics %s%s: expected a JSON array of strings',
                           {_shortened("e.event_topics::text")}, {_EVENT_PLACE})
                       WHEN t.all_topics = 0 THEN format(
                           'no topic given%s: an event needs at least one topic', {_EVENT_PLACE})
                   END,
                   t.first_problem,
                   {_topic_count_problem("t.distinct_topics", _EVENT_PLACE)},
                   {_type_problem("e.event_type", _EVENT_PLACE)},
                   {_data_problem("e.event_data", _EVENT_PLACE, _REPLACE_DATA)},
                   {_metadata_problem("e.event_metadata", _EVENT_PLACE)}) AS problem
        FROM ROWS FROM (jsonb_array_elements(publish_batch_v1.topics), unnest(publish_batch_v1.types),
                        unnest(publish_batch_v1.data), unnest(publish_batch_v1.metadata))
                 WITH ORDINALITY AS e(event_topics, event_type, event_data, event_metadata, ord),
             LATERAL (
                 SELECT count(*) AS all_topics,
                        count(DISTINCT x.topic) AS distinct_topics,
                        (array_agg(p.problem ORDER BY x.pos)
                             FILTER (WHERE p.problem IS NOT NULL))[1] AS first_problem
                 FROM jsonb_array_elements(
                          CASE WHEN jsonb_typeof(e.event_topics) = 'array' THEN e.event_topics END)
                          WITH ORDINALITY AS x(topic, pos),
                      LATERAL (SELECT {_topic_element_problem("x.topic", _EVENT_PLACE)}) AS p(problem)
             ) AS t
    ) AS c;
    IF error_message IS NOT NULL THEN
        RAISE EXCEPTION '%', error_message USING ERRCODE = '22023';
    END IF;

    -- Each event keeps the first of its equal topics. The Python library sends
    -- topics without duplicates, so only other callers' batches take this path.
    IF has_duplicates THEN
        SELECT jsonb_agg(u.unique_topics ORDER BY e.ord)
        INTO batch_topics
        FROM jsonb_array_elements(publish_batch_v1.topics) WITH ORDINALITY AS e(event_topics, ord),
             LATERAL (
                 SELECT jsonb_agg(f.topic ORDER BY f.pos) AS unique_topics
                 FROM (SELECT x.topic, min(x.pos) AS pos
                       FROM jsonb_array_elements_text(e.event_topics) WITH ORDINALITY AS x(topic, pos)
                       GROUP BY x.topic) AS f
             ) AS u;
    END IF;
    IF jsonb_array_length(batch_topics) = 0 THEN
        RETURN;  -- nothing to write, so no reason to wait for the lock
    END IF;

    PERFORM {schema}.ordering_lock_v1();
    WITH input AS (
        SELECT u.ord,
               ARRAY(SELECT jsonb_array_elements_text(batch_topics -> (u.ord::int - 1))) AS topics,
               u.type, u.data, u.metadata
        FROM unnest(publish_batch_v1.types, publish_batch_v1.data, publish_batch_v1.metadata)
             WITH ORDINALITY AS u(type, data, metadata, ord)
    ), inserted AS (
        INSERT INTO {schema}.events AS e (topics, type, data, metadata)
        SELECT i.topics, i.type, coalesce(i.data, '{{}}'), coalesce(i.metadata, '{{}}')
        FROM input AS i
        ORDER BY i.ord
        RETURNING e.id, e.occurred_at
    )
    SELECT array_agg(ins.id ORDER BY ins.id), array_agg(ins.occurred_at ORDER BY ins.id)
    INTO ids, times
    FROM inserted AS ins;

    -- Distinct topics first, so that channel_v1 (a regular expression match,
    -- and a SHA-256 hash for some topics) runs once per topic of the batch,
    -- not once per event that names it.
    PERFORM pg_notify(c.channel, ids[cardinality(ids)]::text)
    FROM (SELECT DISTINCT {schema}.channel_v1(d.t) AS channel
          FROM (SELECT DISTINCT t
                FROM jsonb_array_elements(publish_batch_v1.topics) AS per_event,
                     jsonb_array_elements_text(per_event) AS t) AS d) AS c;

    RETURN QUERY SELECT u.id, u.occurred_at FROM unnest(ids, times) AS u(id, occurred_at);
END
$fn$""",
    ]


# SQL expressions for the checks of publish_v1 and publish_batch_v1. Each returns
# the error message for the value it checks, or NULL when the value is valid.
# `place` is a SQL text expression that follows the value in the message, '' for
# publish_v1 and the event's position for publish_batch_v1.

# The position of event e.ord in publish_batch_v1's message, such as " in event 3 of 5".
_EVENT_PLACE = "format(' in event %s of %s', e.ord, cardinality(publish_batch_v1.types))"


def _topic_problem(topic: str, place: str) -> str:
    """Return a SQL expression that checks the text expression `topic` as validate_topic does.

    validate_topic also rejects a NUL character and a lone surrogate, which
    PostgreSQL text cannot contain.
    """
    size = f"octet_length(convert_to({topic}, 'UTF8'))"
    return f"""CASE
        WHEN {topic} IS NULL THEN format('invalid topic NULL%s: expected a string', {place})
        WHEN {topic} = '' THEN format('invalid topic ""%s: a topic must not be empty', {place})
        WHEN {size} > {MAX_TOPIC_BYTES} THEN format(
            'invalid topic %s%s: %s bytes in UTF-8, the maximum is {MAX_TOPIC_BYTES}',
            {_shown(topic)}, {place}, {size})
    END"""


def _topic_element_problem(element: str, place: str) -> str:
    """Return a SQL expression that checks `element`, a jsonb topic of a batch."""
    return f"""CASE
        WHEN jsonb_typeof({element}) <> 'string' THEN format(
            'invalid topic %s%s: expected a JSON string', {_shortened(f"{element}::text")}, {place})
        ELSE {_topic_problem(f"({element} #>> '{{}}')", place)}
    END"""


def _topic_count_problem(distinct_topics: str, place: str) -> str:
    """Return a SQL expression that checks the number of distinct topics as validate_topics does."""
    return f"""CASE WHEN {distinct_topics} > {MAX_TOPICS_PER_EVENT} THEN format(
        'too many topics (%s distinct)%s: an event may have at most {MAX_TOPICS_PER_EVENT}',
        {distinct_topics}, {place}) END"""


def _type_problem(event_type: str, place: str) -> str:
    """Return a SQL expression that checks the text expression `event_type` as validate_type does.

    A type of only WHITESPACE characters is what Python's str.strip() leaves
    empty. validate_type also rejects a NUL character and a lone surrogate,
    which PostgreSQL text cannot contain.
    """
    size = f"octet_length(convert_to({event_type}, 'UTF8'))"
    return f"""CASE
        WHEN {event_type} IS NULL THEN format('invalid event type NULL%s: expected a string', {place})
        WHEN {event_type} ~ '^[{WHITESPACE}]*$' THEN format(
            'invalid event type %s%s: it must contain a visible character', {_shown(event_type)}, {place})
        WHEN {size} > {MAX_TYPE_BYTES} THEN format(
            'invalid event type %s%s: %s bytes in UTF-8, the maximum is {MAX_TYPE_BYTES}',
            {_shown(event_type)}, {place}, {size})
    END"""


# How each function's message for JSON null data ends. publish_v1 can leave data
# out; an event of publish_batch_v1 cannot, though a SQL NULL element also stores {}.
_OMIT_DATA = "pass {} or omit data"
_REPLACE_DATA = "pass {} instead"


def _data_problem(data: str, place: str, remedy: str) -> str:
    """Return a SQL expression that checks the jsonb expression `data`.

    Data may be any JSON value except null, as docs/guide.md says, because the
    library stores {} for None. SQL NULL passes: the publish functions store it as {}.
    """
    return f"""CASE WHEN jsonb_typeof({data}) = 'null' THEN format(
        'invalid event data null%s: JSON null is not allowed; {remedy}', {place}) END"""


def _metadata_problem(metadata: str, place: str) -> str:
    """Return a SQL expression that checks the jsonb expression `metadata` as encode_metadata does.

    Metadata must be a JSON object, as the library requires a dict. SQL NULL
    passes: the publish functions store it as {}.
    """
    return f"""CASE WHEN jsonb_typeof({metadata}) <> 'object' THEN format(
        'invalid event metadata %s%s: expected a JSON object such as {{"correlation_id": "...", "actor": "..."}}',
        {_shortened(f"{metadata}::text")}, {place}) END"""


def _shown(text: str) -> str:
    """Return a SQL expression for the text expression `text` as an error message quotes it.

    A JSON string, so that a tab or a newline shows as \\t or \\n.
    """
    return f"to_json({_shortened(text)})::text"


def _shortened(text: str) -> str:
    """Return a SQL expression that shortens `text` to 80 characters, as _encoding._shorten does."""
    return f"CASE WHEN length({text}) <= 80 THEN {text} ELSE left({text}, 77) || '...' END"
