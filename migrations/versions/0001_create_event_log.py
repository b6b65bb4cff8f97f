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

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Namespace of the two-key advisory lock that orders publishing ("evlg" in ASCII);
# the second key is derived from the schema name, so each log has its own lock.
LOCK_CLASS = 0x65766C67


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
        # Publishing one event, for SQL callers; it validates its arguments, since
        # no library code checked them first.
        f"""
CREATE FUNCTION {schema}.publish_v1(
    topics text[], type text, data jsonb DEFAULT '{{}}', metadata jsonb DEFAULT '{{}}'
) RETURNS TABLE (id bigint, occurred_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    new_id bigint;
    new_time timestamptz;
BEGIN
    IF publish_v1.topics IS NULL OR cardinality(publish_v1.topics) = 0
       OR array_position(publish_v1.topics, NULL) IS NOT NULL
       OR array_position(publish_v1.topics, '') IS NOT NULL THEN
        RAISE EXCEPTION 'invalid topics %: pass one or more non-empty topics', publish_v1.topics
            USING ERRCODE = '22023';
    END IF;
    IF coalesce(btrim(publish_v1.type), '') = '' THEN
        RAISE EXCEPTION 'invalid event type %: it must not be empty', quote_nullable(publish_v1.type)
            USING ERRCODE = '22023';
    END IF;

    PERFORM {schema}.ordering_lock_v1();
    INSERT INTO {schema}.events AS e (topics, type, data, metadata)
    VALUES (publish_v1.topics, publish_v1.type,
            coalesce(publish_v1.data, '{{}}'), coalesce(publish_v1.metadata, '{{}}'))
    RETURNING e.id, e.occurred_at INTO new_id, new_time;

    -- A doorbell, not a message: the payload is only the new id, as a hint.
    PERFORM pg_notify(c.channel, new_id::text)
    FROM (SELECT DISTINCT {schema}.channel_v1(t) AS channel
          FROM unnest(publish_v1.topics) AS t) AS c;

    id := new_id;
    occurred_at := new_time;
    RETURN NEXT;
END
$fn$""",
        # Publishing many events in one statement, under the ordering lock.
        # topics is a JSON array with one array of
        # topics per event; types, data and metadata are parallel arrays.
        f"""
CREATE FUNCTION {schema}.publish_batch_v1(
    topics jsonb, types text[], data jsonb[], metadata jsonb[]
) RETURNS TABLE (id bigint, occurred_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    ids bigint[];
    times timestamptz[];
BEGIN
    IF jsonb_typeof(publish_batch_v1.topics) IS DISTINCT FROM 'array'
       OR jsonb_array_length(publish_batch_v1.topics) <> coalesce(cardinality(publish_batch_v1.types), 0)
       OR cardinality(publish_batch_v1.types) <> cardinality(publish_batch_v1.data)
       OR cardinality(publish_batch_v1.types) <> cardinality(publish_batch_v1.metadata) THEN
        RAISE EXCEPTION 'invalid batch: topics, types, data and metadata must have one entry per event'
            USING ERRCODE = '22023';
    END IF;

    PERFORM {schema}.ordering_lock_v1();
    WITH input AS (
        SELECT u.ord,
               ARRAY(SELECT jsonb_array_elements_text(publish_batch_v1.topics -> (u.ord::int - 1))) AS topics,
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

    -- Distinct topics first: PostgreSQL does not inline channel_v1 (a STRICT
    -- SQL function with a CASE body), so each call costs about 4 microseconds,
    -- and a batch has at least one topic per event.
    PERFORM pg_notify(c.channel, ids[cardinality(ids)]::text)
    FROM (SELECT DISTINCT {schema}.channel_v1(d.t) AS channel
          FROM (SELECT DISTINCT t
                FROM jsonb_array_elements(publish_batch_v1.topics) AS per_event,
                     jsonb_array_elements_text(per_event) AS t) AS d) AS c;

    RETURN QUERY SELECT u.id, u.occurred_at FROM unnest(ids, times) AS u(id, occurred_at);
END
$fn$""",
    ]
