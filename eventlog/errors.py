"""Exceptions raised by eventlog.

Every exception the library raises on purpose derives from `EventLogError`::

    EventLogError
    ├── ConfigurationError        bad settings: URL, schema name, intervals
    ├── InvalidEvent (ValueError) rejected before anything is written
    │   ├── InvalidTopic
    │   ├── InvalidEventType
    │   ├── InvalidData           not JSON-serializable, or not storable as jsonb
    │   └── DataTooLarge
    ├── InvalidQuery (ValueError) a bad cursor, limit, page size or time bound
    ├── SubscriptionStateError    a call that the subscription's state does not allow
    ├── TransactionStateError     publishing where no transaction of ours can write the events
    └── DatabaseError             a database operation failed (`sqlstate` attached)
        ├── SchemaNotFound        migrations were not applied to this database
        ├── AppendOnlyViolation   UPDATE, DELETE or TRUNCATE on the event table
        └── ConnectionFailed      the server could not be reached or went away

Driver errors are translated at one boundary (`translate_errors`), so callers can
catch these classes without importing psycopg; the original exception stays
available as ``__cause__``. `ConnectionFailed` means the connection was lost, so a
write may or may not have committed; any other `DatabaseError` means it did not.
`is_transient` tells which errors are worth a retry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import psycopg.errors
import psycopg.pq

__all__ = [
    "AppendOnlyViolation",
    "ConfigurationError",
    "ConnectionFailed",
    "DataTooLarge",
    "DatabaseError",
    "EventLogError",
    "InvalidData",
    "InvalidEvent",
    "InvalidEventType",
    "InvalidTopic",
    "SchemaNotFound",
    "InvalidQuery",
    "SubscriptionStateError",
    "TransactionStateError",
    "is_transient",
]

# SQLSTATE raised by the append-only triggers (class 55, "object not in
# prerequisite state"; custom code so it cannot be confused with a server error).
APPEND_ONLY_SQLSTATE = "55EL1"


class EventLogError(Exception):
    """Base class of every error raised by eventlog."""


class ConfigurationError(EventLogError):
    """A setting is missing or invalid."""


class InvalidEvent(EventLogError, ValueError):
    """An event was rejected before anything was written to the database."""


class InvalidTopic(InvalidEvent):
    """A topic is empty, too long, not a string or contains a NUL character."""

    def __init__(self, message: str, topic: object) -> None:
        super().__init__(message)
        self.topic = topic


class InvalidEventType(InvalidEvent):
    """An event type is empty, too long, not a string or contains a NUL character."""

    def __init__(self, message: str, event_type: object) -> None:
        super().__init__(message)
        self.event_type = event_type


class InvalidData(InvalidEvent):
    """Event data or metadata cannot be encoded as a PostgreSQL jsonb value."""


class DataTooLarge(InvalidEvent):
    """Encoded event data is larger than the configured maximum."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class InvalidQuery(EventLogError, ValueError):
    """An argument of a read, replay, query or subscription is invalid."""


class SubscriptionStateError(EventLogError):
    """A subscription method was called in a state that does not allow it."""


class TransactionStateError(EventLogError):
    """Events were published on a connection whose transaction cannot take them.

    For example a connection with no transaction in progress, or one already in a
    transaction that eventlog did not open, so eventlog cannot write the events
    right before its COMMIT.
    """


class DatabaseError(EventLogError):
    """A database operation failed; `sqlstate` is the server's error code, if any."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SchemaNotFound(DatabaseError):
    """The log's schema, table or functions do not exist: run the migrations."""


class AppendOnlyViolation(DatabaseError):
    """An UPDATE, DELETE or TRUNCATE on the event table was rejected."""


class ConnectionFailed(DatabaseError):
    """The database server could not be reached, or the connection was lost."""


def is_transient(exc: BaseException) -> bool:
    """Tell whether the same operation may succeed if it is tried again later.

    True for a lost connection and for errors that leave the connection working:
    a cancelled statement or timeout (57014, 55P03), a serialization failure or
    deadlock (class 40) and a lack of resources (class 53).

    NOTE: libpq gives no SQLSTATE for a failed connection attempt, so a wrong
    password or database name cannot be distinguished from a server that is down: both
    count as transient.
    """
    if isinstance(exc, ConnectionFailed):
        return True
    if not isinstance(exc, DatabaseError) or exc.sqlstate is None:
        return False
    return exc.sqlstate.startswith(("40", "53")) or exc.sqlstate in ("57014", "55P03")


_MISSING_OBJECT_CLASSES = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.InvalidSchemaName,
)


def translate(exc: psycopg.Error, schema: str) -> EventLogError:
    """Return the eventlog exception that stands for a psycopg exception."""
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    if sqlstate == APPEND_ONLY_SQLSTATE:
        hint = getattr(getattr(exc, "diag", None), "message_hint", None)
        return AppendOnlyViolation(f"{text}. {hint}" if hint else text, sqlstate)
    if isinstance(exc, _MISSING_OBJECT_CLASSES):
        command = "eventlog migrate" if schema == "eventlog" else f"eventlog migrate --schema {schema}"
        return SchemaNotFound(
            f"event log schema {schema!r} is missing or incomplete ({text}); "
            f"run `{command}` against this database",
            sqlstate,
        )
    if connection_lost(exc):
        return ConnectionFailed(f"database connection failed: {text}", sqlstate)
    return DatabaseError(text, sqlstate)


def connection_lost(exc: psycopg.Error) -> bool:
    """Tell whether `exc` means the connection failed or went away.

    Only then may a statement have committed without the caller hearing of it.
    psycopg's OperationalError also covers errors after which the connection
    works and nothing was committed: a cancelled statement (57014), a lock or
    statement timeout (55P03, 57014), a deadlock (40P01), and class 53 (out of
    disk, memory or connections).
    """
    if isinstance(exc, psycopg.InterfaceError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        # Raised by the client: the socket closed, a timeout, a failed connect.
        return isinstance(exc, psycopg.OperationalError)
    if sqlstate.startswith(("08", "57P")) or sqlstate in ("25P03", "53300"):
        # Connection exceptions, shutdowns, terminated backends, the idle in
        # transaction timeout (which ends the session) and too_many_connections.
        return True
    pgconn = getattr(exc, "pgconn", None)
    return pgconn is not None and pgconn.status == psycopg.pq.ConnStatus.BAD


@contextlib.contextmanager
def translate_errors(schema: str) -> Iterator[None]:
    """Re-raise psycopg errors raised in the block as eventlog errors."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, schema) from exc
