"""SQLAlchemy Core description of a log's tables.

This is the one description of the schema: the migrations create exactly this (a
test runs Alembic's autogenerate against it and expects no difference), and
auditors can query the table with SQLAlchemy::

    from sqlalchemy import select
    from eventlog.schema import events_table

    events = events_table("eventlog")
    stmt = select(events).where(events.c.topics.any_("shop:products")).order_by(events.c.id)
"""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP

__all__ = ["EVENTS_TABLE", "VERSION_TABLE", "build_metadata", "events_table"]

EVENTS_TABLE = "events"
# Alembic's version table for eventlog's own migration history. It lives in the
# log's schema under its own name, so it never meets an application's
# ``alembic_version`` table even when both share a schema.
VERSION_TABLE = "eventlog_alembic_version"


@lru_cache(maxsize=None)
def build_metadata(schema: str = "eventlog") -> MetaData:
    """Return the MetaData that contains the tables of the log in `schema`."""
    metadata = MetaData(schema=schema)
    Table(
        EVENTS_TABLE,
        metadata,
        Column("id", BigInteger, Identity(always=True), primary_key=True),
        Column("topics", ARRAY(Text), nullable=False),
        Column("type", Text, nullable=False),
        Column("data", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column(
            "occurred_at",
            TIMESTAMP(timezone=True),
            nullable=False,
            server_default=text("clock_timestamp()"),
        ),
        CheckConstraint("cardinality(topics) >= 1", name="events_topics_not_empty"),
        # "Events of these topics after id n": a bitmap scan of this index for
        # sparse topics; the primary key's range scan serves dense ones.
        Index("events_topics_idx", "topics", postgresql_using="gin"),
        # Time-range queries by auditors. Rows are appended in time order, so a
        # BRIN index stays tiny and costs publishing almost nothing.
        Index("events_occurred_at_idx", "occurred_at", postgresql_using="brin"),
        comment="eventlog: append-only event log",
    )
    return metadata


def events_table(schema: str = "eventlog") -> Table:
    """Return the event table of the log in `schema`."""
    return build_metadata(schema).tables[f"{schema}.{EVENTS_TABLE}"]
