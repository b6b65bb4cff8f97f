"""Events published inside a caller's transaction, held until that transaction commits.

The integrations with psycopg connections (`eventlog.pg`) and with SQLAlchemy
sessions and connections (`eventlog.sqlalchemy`) share this buffer. They differ
only in how they learn that a savepoint opened, rolled back or was released, and
in how they send the final statement.

Why buffer at all: writing an event takes the log's ordering lock (see
``ordering_lock_v1`` in the first migration), and the lock is held until the
transaction ends. Taken in the middle of a business transaction, it would make
every other publisher wait for the rest of that transaction, and a row lock
taken after it could close a deadlock cycle with another publisher. So events
are validated and encoded when they are published (bad input raises at once,
with nothing buffered) and written in one statement right before COMMIT.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ._models import Event, NewEvent
from ._settings import Settings
from ._sql import EncodedEvent, check_batch_size, encode_event, encoded_chars

__all__ = ["Buffer", "Entry", "PendingEvent", "by_schema", "encode_many", "encode_one", "resolve"]


class PendingEvent:
    """An event published in a transaction, to be written when the transaction commits.

    `event` is None until the commit writes the event, then the stored `Event`
    with its id. `discarded` turns true if the transaction (or the savepoint the
    event was published in) rolls back instead. That includes a COMMIT that
    fails after the write: `event` then keeps the id the event would have had,
    which no reader will ever see. A COMMIT that loses its connection
    (`ConnectionFailed`) may have gone through: `discarded` stays false and
    `event` has the id to look for with a read.
    """

    __slots__ = ("_discarded", "_event", "schema", "topics", "type")

    def __init__(self, schema: str, topics: tuple[str, ...], type: str) -> None:
        self.schema = schema
        self.topics = topics
        self.type = type
        self._event: Event | None = None
        self._discarded = False

    @property
    def event(self) -> Event | None:
        """The stored event once the commit has written it, else None."""
        return self._event

    @property
    def discarded(self) -> bool:
        """True if the transaction or savepoint of the event rolled back."""
        return self._discarded

    def __repr__(self) -> str:
        if self._discarded:
            state = "discarded"
        elif self._event is not None:
            state = f"id={self._event.id}"
        else:
            state = "pending"
        return f"<PendingEvent {self.type!r} topics={list(self.topics)!r} {state}>"


@dataclass(slots=True)
class Entry:
    schema: str
    encoded: EncodedEvent
    pending: PendingEvent

    def written(self, event_id: int, occurred_at: Any) -> Event:
        event = self.encoded.stored(event_id, occurred_at)
        self.pending._event = event
        return event


class Buffer:
    """The events of one transaction, with a mark for each open savepoint.

    A mark is the number of entries when the savepoint opened. Rolling back to
    a savepoint drops the entries published since, as PostgreSQL drops the rows;
    releasing it keeps them. Savepoints nest, so marks form a stack. A savepoint
    that opened before the buffer existed has no mark; every entry was published
    inside it, so rolling back to it drops them all.
    """

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._marks: list[list[Any]] = []  # [key, position], key None until claimed
        self._chars = 0  # encoded_chars of the entries, kept as they change

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, schema: str, encoded: Sequence[EncodedEvent]) -> list[PendingEvent]:
        """Buffer events, or raise `DataTooLarge` if the buffer would be too large to write."""
        chars = self._chars + encoded_chars(encoded)
        check_batch_size(chars, lambda: [*(entry.encoded for entry in self.entries), *encoded])
        added = [Entry(schema, e, PendingEvent(schema, e.topics, e.type)) for e in encoded]
        self.entries.extend(added)
        self._chars = chars
        return [entry.pending for entry in added]

    def extend(self, entries: list[Entry]) -> None:
        """Take over entries published elsewhere, as if they were published now."""
        self.entries.extend(entries)
        self._chars += encoded_chars([entry.encoded for entry in entries])

    def open_savepoint(self, key: Hashable | None) -> None:
        self._marks.append([key, len(self.entries)])

    def rollback_savepoint(self, key: Hashable, *, claim: bool = False) -> None:
        index = self._find(key, claim)
        position = 0 if index is None else self._marks[index][1]
        for entry in self.entries[position:]:
            entry.pending._discarded = True
        self._chars -= encoded_chars([entry.encoded for entry in self.entries[position:]])
        del self.entries[position:]
        # The savepoint itself survives ROLLBACK TO, but the ones opened after it do not.
        del self._marks[0 if index is None else index + 1 :]

    def release_savepoint(self, key: Hashable, *, claim: bool = False) -> None:
        index = self._find(key, claim)
        del self._marks[0 if index is None else index :]

    def take(self) -> list[Entry]:
        """Remove and return every entry, to be written now."""
        entries, self.entries = self.entries, []
        self._marks.clear()
        self._chars = 0
        return entries

    def discard(self) -> None:
        """Drop every entry: the transaction rolled back."""
        for entry in self.take():
            entry.pending._discarded = True

    def _find(self, key: Hashable, claim: bool) -> int | None:
        for index in range(len(self._marks) - 1, -1, -1):
            if self._marks[index][0] == key:
                return index
        if claim:
            # SQLAlchemy names a savepoint only after its "savepoint" event has
            # fired, so the name arrives with the rollback or release. Savepoints
            # close innermost first, so it belongs to the innermost unnamed mark.
            for index in range(len(self._marks) - 1, -1, -1):
                if self._marks[index][0] is None:
                    self._marks[index][0] = key
                    return index
        return None


def by_schema(entries: Iterable[Entry]) -> list[tuple[str, list[Entry]]]:
    """Group entries by log, in schema-name order.

    Each log has its own ordering lock. Two transactions that publish to the
    same two logs must take their locks in the same order, or they deadlock.
    """
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.schema, []).append(entry)
    return sorted(groups.items())


def resolve(schema: str | None, max_data_bytes: int | None) -> tuple[str, int]:
    """Return the schema and data limit to use, defaulting to ``EVENTLOG_*`` variables."""
    return _resolve(
        schema,
        max_data_bytes,
        os.environ.get("EVENTLOG_SCHEMA"),
        os.environ.get("EVENTLOG_MAX_DATA_BYTES"),
    )


@lru_cache(maxsize=64)
def _resolve(
    schema: str | None, max_data_bytes: int | None, _env_schema: str | None, _env_limit: str | None
) -> tuple[str, int]:
    # The variables are part of the cache key, so a changed environment is seen.
    settings = Settings.load(schema_name=schema, max_data_bytes=max_data_bytes)
    return settings.schema_name, settings.max_data_bytes


def encode_one(
    topics: str | Iterable[str], type: str, data: Any, metadata: dict[str, Any] | None, max_data_bytes: int
) -> list[EncodedEvent]:
    return [encode_event(NewEvent(topics, type, data, metadata), max_data_bytes)]


def encode_many(events: Iterable[Any], max_data_bytes: int) -> list[EncodedEvent]:
    # Encode the whole batch before buffering any of it: one bad event, nothing buffered.
    from .log import _as_new_event  # here, because eventlog.log imports this module


    return [encode_event(_as_new_event(e), max_data_bytes) for e in events]
