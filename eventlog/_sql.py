"""SQL statements of a log and the decoding of event rows, shared by sync and async code."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from psycopg import sql

from ._encoding import encode_data, encode_metadata
from ._models import Event, NewEvent

EVENT_COLUMNS = "id, topics, type, data, metadata, occurred_at"


@dataclass(frozen=True)
class Statements:
    """The fixed statements of the log in one schema."""

    publish: sql.Composed
    publish_batch: sql.Composed
    head: sql.Composed


@lru_cache(maxsize=None)
def statements(schema: str) -> Statements:
    ident = sql.Identifier(schema)
    return Statements(
        publish=sql.SQL(
            "SELECT id, occurred_at FROM {}.publish_v1(%s::text[], %s, %s::jsonb, %s::jsonb)"
        ).format(ident),
        publish_batch=sql.SQL(
            "SELECT id, occurred_at FROM {}.publish_batch_v1(%s::jsonb, %s::text[], %s::jsonb[], %s::jsonb[])"
        ).format(ident),
        head=sql.SQL("SELECT coalesce(max(id), 0) FROM {}.events").format(ident),
    )


@dataclass(frozen=True)
class EventFilter:
    """Conditions of an event query; None means no condition."""

    topics: Sequence[str] | None = None
    types: Sequence[str] | None = None
    after_id: int = 0
    until_id: int | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


def select_events(
    schema: str, where: EventFilter, limit: int | None, descending: bool = False
) -> tuple[sql.Composed, list[Any]]:
    """Return a query for events that match `where`, ordered by id."""
    conditions = [sql.SQL("id > %s")]
    params: list[Any] = [where.after_id]
    if where.topics is not None:
        conditions.append(sql.SQL("topics && %s::text[]"))
        params.append(list(where.topics))
    if where.types is not None:
        conditions.append(sql.SQL("type = ANY(%s::text[])"))
        params.append(list(where.types))
    if where.until_id is not None:
        conditions.append(sql.SQL("id <= %s"))
        params.append(where.until_id)
    if where.since is not None:
        conditions.append(sql.SQL("occurred_at >= %s"))
        params.append(where.since)
    if where.until is not None:
        conditions.append(sql.SQL("occurred_at < %s"))
        params.append(where.until)

    query = sql.SQL("SELECT {} FROM {}.events WHERE {} ORDER BY id {}").format(
        sql.SQL(EVENT_COLUMNS),
        sql.Identifier(schema),
        sql.SQL(" AND ").join(conditions),
        sql.SQL("DESC" if descending else "ASC"),
    )
    if limit is not None:
        query = query + sql.SQL(" LIMIT %s")
        params.append(limit)
    return query, params


def event_from_row(row: Sequence[Any]) -> Event:
    # Rows come from our own table, already valid: skip pydantic validation, which
    # would cost more than decoding the row itself.
    return Event.model_construct(
        id=row[0],
        topics=tuple(row[1]),
        type=row[2],
        data=row[3],
        metadata=row[4],
        occurred_at=row[5],
    )


@dataclass
class EncodedEvent:
    topics: tuple[str, ...]
    type: str
    data: str
    metadata: str

    def stored(self, event_id: int, occurred_at: dt.datetime) -> Event:
        """Return the event as readers will see it once it is committed."""
        return Event.model_construct(
            id=event_id,
            topics=self.topics,
            type=self.type,
            data=json.loads(self.data),
            metadata=json.loads(self.metadata),
            occurred_at=occurred_at,
        )


def encode_event(event: NewEvent, max_data_bytes: int) -> EncodedEvent:
    return EncodedEvent(
        topics=event.topics,
        type=event.type,
        data=encode_data(event.data, max_data_bytes),
        metadata=encode_metadata(event.metadata, max_data_bytes),
    )


def publish_params(event: EncodedEvent) -> list[Any]:
    return [list(event.topics), event.type, event.data, event.metadata]


def publish_batch_params(events: Sequence[EncodedEvent]) -> list[Any]:
    return [
        json.dumps([list(e.topics) for e in events], ensure_ascii=False),
        [e.type for e in events],
        [e.data for e in events],
        [e.metadata for e in events],
    ]


def stored_events(encoded: Sequence[EncodedEvent], rows: Sequence[Sequence[Any]]) -> list[Event]:
    # publish_batch_v1 assigns ids in input order and returns them ascending.
    return [e.stored(row[0], row[1]) for e, row in zip(encoded, rows)]
