"""SQL statements of a log and the decoding of event rows, shared by sync and async code."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from psycopg import sql

from ._channels import channel_for
from ._encoding import encode_data, encode_metadata, validate_topics
from ._models import Event, NewEvent
from .errors import DataTooLarge, InvalidQuery

EVENT_COLUMNS = "id, topics, type, data, metadata, occurred_at"


@dataclass(frozen=True)
class Statements:
    """The fixed statements of the log in one schema, rendered once.

    Plain strings rather than `sql.Composed`: psycopg caches the conversion of a
    string query, but renders a Composed one again on every execute, which cost
    about 10 us per publish (5%) in a loop on a 2-core machine.
    """

    publish_batch: str
    head: str


@lru_cache(maxsize=None)
def statements(schema: str) -> Statements:
    ident = sql.Identifier(schema)
    return Statements(
        # What publish_batch_v1 does, as one plain statement. The server runs it in
        # about 25% less time (1,000 events, our measurement), all of it under the
        # ordering lock. The CTEs work as in `publish_statement`.
        # The arrays go in binary format, which needs no escaping. In text format
        # psycopg escapes each element in Python: 14 ms for 1,000 events of 100
        # bytes on a 2-core EPYC, a third of publish_many's time.
        # Each event's topics arrive as one array literal (`_array_literal`),
        # because a two-dimensional array must be rectangular.
        publish_batch=sql.SQL(
            "WITH ordered AS MATERIALIZED (SELECT {}.ordering_lock_v1()),"
            " inserted AS (INSERT INTO {}.events (topics, type, data, metadata)"
            " SELECT u.topics::text[], u.type, u.data, u.metadata"
            " FROM ordered, ROWS FROM (unnest(%b::text[]), unnest(%b::text[]), unnest(%b::jsonb[]),"
            " unnest(%b::jsonb[])) WITH ORDINALITY AS u(topics, type, data, metadata, ord)"
            " ORDER BY u.ord RETURNING id, occurred_at),"
            " notified AS MATERIALIZED (SELECT count(pg_notify(channel, (SELECT max(id) FROM inserted)::text))"
            " FROM unnest(%b::text[]) AS channel)"
            " SELECT id, occurred_at FROM inserted, notified ORDER BY id"
        ).format(ident, ident).as_string(None),
        head=sql.SQL("SELECT coalesce(max(id), 0) FROM {}.events").format(ident).as_string(None),
    )


@lru_cache(maxsize=None)
def publish_statement(schema: str, channels: int) -> str:
    """Return the statement that appends one event and notifies `channels` channels.

    It does what the SQL function publish_v1 does, in one plain statement: take
    the ordering lock, insert, notify. The materialized CTE takes the lock before
    the INSERT draws its id, as the comment on ordering_lock_v1 in the first
    migration requires. The server spends about 25 us less per event on it than
    on the PL/pgSQL call, and all of that time falls while the lock is held. With
    16 publishers this reached 0.87 of the unlocked raw insert, against 0.79
    through publish_v1 (2-core EPYC, PostgreSQL 18, our measurement). One
    pg_notify per channel saves another 10 us over one call per element of an
    unnested array, so each count of channels gets its own prepared statement.
    """
    if channels < 1:
        raise ValueError(f"an event notifies at least one channel, not {channels}")
    ident = sql.Identifier(schema)
    notify = sql.SQL(", ").join([sql.SQL("pg_notify(%s, id::text)")] * channels)
    return sql.SQL(
        "WITH ordered AS MATERIALIZED (SELECT {}.ordering_lock_v1()),"
        " inserted AS (INSERT INTO {}.events (topics, type, data, metadata)"
        " SELECT %s::text[], %s, %s::jsonb, %s::jsonb FROM ordered RETURNING id, occurred_at)"
        " SELECT id, occurred_at, {} FROM inserted"
    ).format(ident, ident, notify).as_string(None)


@dataclass(frozen=True)
class EventFilter:
    """Conditions of an event query; None means no condition."""

    topics: Sequence[str] | None = None
    types: Sequence[str] | None = None
    after_id: int = 0
    until_id: int | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        # A single string is one topic or type, not a sequence of characters.
        if self.topics is not None:
            object.__setattr__(self, "topics", validate_topics(self.topics))
        if isinstance(self.types, str):
            object.__setattr__(self, "types", (self.types,))
        _check_id("after_id", self.after_id)
        if self.until_id is not None:
            _check_id("until_id", self.until_id)
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dt.datetime) or value.utcoffset() is None):
                raise InvalidQuery(
                    f"invalid {name} {value!r}: expected an aware datetime, such as "
                    "datetime(2026, 1, 1, tzinfo=timezone.utc)"
                )


def _check_id(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidQuery(f"invalid {name} {value!r}: expected an event id, an int from 0 to 2**63 - 1")


def check_limit(name: str, value: object) -> None:
    """Raise `InvalidQuery` unless `value` is None or a positive int."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidQuery(f"invalid {name} {value!r}: expected a whole number of 1 or more")


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


_EVENT_FIELDS = frozenset(Event.model_fields)
if _EVENT_FIELDS != {"id", "topics", "type", "data", "metadata", "occurred_at"}:
    # _trusted_event fills the fields by hand and would leave a new one unset.
    raise RuntimeError(f"Event has fields {sorted(_EVENT_FIELDS)}: update _trusted_event in {__name__}")


def _trusted_event(
    id: int, topics: tuple[str, ...], type: str, data: Any, metadata: Any, occurred_at: dt.datetime
) -> Event:
    """Build an Event from values that are valid already, without pydantic validation.

    This sets the four slots that pydantic's model_construct() sets, without its
    loop over the fields: 1 microsecond per event instead of 5 (pydantic 2.14).
    Replay and batch publishing build one per row.
    """
    event = object.__new__(Event)
    object.__setattr__(
        event,
        "__dict__",
        {"id": id, "topics": topics, "type": type, "data": data, "metadata": metadata, "occurred_at": occurred_at},
    )
    object.__setattr__(event, "__pydantic_fields_set__", set(_EVENT_FIELDS))
    object.__setattr__(event, "__pydantic_extra__", None)
    object.__setattr__(event, "__pydantic_private__", None)
    return event


_decode_json = json.JSONDecoder().decode


def load_jsonb(data: bytes) -> Any:
    """Decode a jsonb value as psycopg's jsonb loader passes it: bytes of JSON text.

    json.loads(bytes) works out the encoding in Python code first, about a
    microsecond per value, two values per event on replay. Like json.loads, this
    takes the bytes as UTF-8.
    """
    return _decode_json(data.decode("utf-8", "surrogatepass"))


def event_from_row(row: Sequence[Any]) -> Event:
    # Rows come from our own table, already valid: skip pydantic validation, which
    # would cost more than decoding the row itself.
    return _trusted_event(row[0], tuple(row[1]), row[2], row[3], row[4], row[5])


@dataclass
class EncodedEvent:
    topics: tuple[str, ...]
    type: str
    data: str
    metadata: str

    def stored(self, event_id: int, occurred_at: dt.datetime) -> Event:
        """Return the event as readers will see it once it is committed."""
        data, metadata = _decode_json(f"[{self.data},{self.metadata}]")
        return _trusted_event(event_id, self.topics, self.type, data, metadata, occurred_at)


# The maximum size of one write (publish_many, or a transaction's events). PostgreSQL
# rejects a protocol message over 1 GB and closes the connection, which looks like
# a lost connection. The server also keeps each array parameter in memory whole.
MAX_BATCH_BYTES = 256 * 1024 * 1024


def encoded_chars(events: Sequence[EncodedEvent]) -> int:
    """Return the number of characters of the events' data, metadata and topics."""
    return sum(len(e.data) + len(e.metadata) + sum(map(len, e.topics)) for e in events)


def check_batch_size(chars: int, collect: Callable[[], Sequence[EncodedEvent]]) -> None:
    """Raise `DataTooLarge` if events are too large to send in one statement.

    `chars` is their `encoded_chars`. `collect` returns the events, and is called
    only if the character count alone cannot rule out a batch that is too large.
    """
    if chars * 4 <= MAX_BATCH_BYTES:  # UTF-8 takes at most 4 bytes per character
        return
    events = collect()
    size = sum(
        len(e.data.encode()) + len(e.metadata.encode()) + sum(len(t.encode()) for t in e.topics) for e in events
    )
    if size > MAX_BATCH_BYTES:
        advice = (
            "publish them in smaller batches or transactions"
            if len(events) > 1
            else "store large payloads elsewhere and publish a reference"
        )
        raise DataTooLarge(
            f"{len(events)} event(s) take {size} bytes of JSON and topics, over the limit "
            f"of {MAX_BATCH_BYTES} bytes for one write; {advice}",
            size,
            MAX_BATCH_BYTES,
        )


def encode_event(event: NewEvent, max_data_bytes: int) -> EncodedEvent:
    return EncodedEvent(
        topics=event.topics,
        type=event.type,
        data=encode_data(event.data, max_data_bytes),
        metadata=encode_metadata(event.metadata, max_data_bytes),
    )


def publish_call(schema: str, event: EncodedEvent) -> tuple[str, list[Any]]:
    """Return the statement and parameters that publish `event` in the log of `schema`."""
    return (
        publish_statement(schema, len(event.topics)),
        [list(event.topics), event.type, event.data, event.metadata, *(channel_for(t, schema) for t in event.topics)],
    )


def publish_batch_params(schema: str, events: Sequence[EncodedEvent]) -> list[Any]:
    """Return the parameters of `Statements.publish_batch` for `events` in the log of `schema`."""
    topics = dict.fromkeys(t for e in events for t in e.topics)
    return [
        [_array_literal(e.topics) for e in events],
        [e.type for e in events],
        [e.data for e in events],
        [e.metadata for e in events],
        [channel_for(t, schema) for t in topics],
    ]


def _array_literal(items: Sequence[str]) -> str:
    """Return `items` as a PostgreSQL text array literal, each element quoted.

    Quoted, an element needs a backslash only before a backslash or a double
    quote, and "NULL" stays a string. Topics contain no NUL (validate_topic).
    """
    return "{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "}"


def batch_function_params(events: Sequence[EncodedEvent]) -> list[Any]:
    """Return the arguments of the SQL function publish_batch_v1 for `events`."""
    return [
        json.dumps([list(e.topics) for e in events], ensure_ascii=False),
        [e.type for e in events],
        [e.data for e in events],
        [e.metadata for e in events],
    ]


def stored_events(encoded: Sequence[EncodedEvent], rows: Sequence[Sequence[Any]]) -> list[Event]:
    # The batch statement assigns ids in input order and returns them ascending.
    # Each value is JSON text already, so joined they make one JSON array, which
    # decodes in a fifth of the time of one json.loads call per value.
    data = _decode_json("[" + ",".join(e.data for e in encoded) + "]")
    metadata = _decode_json("[" + ",".join(e.metadata for e in encoded) + "]")
    return [
        _trusted_event(row[0], e.topics, e.type, d, m, row[1])
        for e, d, m, row in zip(encoded, data, metadata, rows)
    ]
