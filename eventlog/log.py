"""`EventLog` and `AsyncEventLog`: publish, replay and subscribe.

The two classes have the same methods; the async ones are coroutines. Everything
that is not waiting on I/O (validation, encoding, SQL, row decoding) lives in
shared helpers, so both behave the same, and one contract test suite runs
against both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import reprlib
import select
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from . import _listener, pg
from ._encoding import validate_topics, validate_type
from ._models import Event, NewEvent
from ._settings import Settings
from ._sql import (
    EncodedEvent,
    EventFilter,
    check_batch_size,
    check_limit,
    encode_event,
    encoded_chars,
    event_from_row,
    load_jsonb,
    publish_batch_params,
    publish_call,
    select_events,
    statements,
    stored_events,
)
from ._subscription import AsyncSubscription, ReadBatch, Subscription
from .errors import ConnectionFailed, EventLogError, InvalidEvent, translate
from .pg import AsyncTransaction, Transaction

__all__ = ["AsyncEventLog", "AsyncTransaction", "EventLog", "Transaction"]

logger = logging.getLogger(__name__)

EventLike = NewEvent | tuple[Any, ...] | dict[str, Any]


def _as_new_event(item: EventLike) -> NewEvent:
    if isinstance(item, NewEvent):
        return item
    expected = "expected NewEvent, a (topics, type, data) tuple or a dict with those keys"
    try:
        if isinstance(item, dict):
            return NewEvent(**item)
        if isinstance(item, tuple):
            return NewEvent(*item)
    except TypeError as exc:  # unknown keys, or a tuple of the wrong length
        raise InvalidEvent(f"invalid event {reprlib.repr(item)}: {exc}; {expected}") from None
    raise InvalidEvent(f"invalid event {reprlib.repr(item)}: {expected}")


# Reads run with prepare=False: a prepared read may switch to a generic plan that
# does not know how rare a topic is and scans the primary key through the whole log
# (tests/test_replay.py::test_plan_after_many_reads). Publishing has no such choice
# to make, so its statements are prepared at once (unless the prepared_statements
# setting is off), which saves parsing and planning on every call.
_POOL_CONNECTION_OPTIONS = {
    "autocommit": True,
    "application_name": "eventlog",
    # TCP keepalives, so that a read on a pooled connection whose peer vanished
    # (a half-open connection) fails within about a minute instead of hanging.
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def _configure(conn: psycopg.Connection) -> None:
    # A faster jsonb loader than psycopg's default; replay decodes two per event.
    set_json_loads(load_jsonb, conn)


async def _configure_async(conn: psycopg.AsyncConnection) -> None:
    set_json_loads(load_jsonb, conn)


def _has_pending_input(conn: psycopg.Connection | psycopg.AsyncConnection) -> bool:
    # An idle pooled connection has nothing to read. A readable socket means the
    # server sent something unasked: almost always the FATAL message and EOF of a
    # terminated backend or a restarted server. poll(), unlike select(), works for
    # descriptors above 1023, which a busy web server reaches.
    if conn.closed or conn.broken:
        return True
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, psycopg.OperationalError):
        return True


def _check(conn: psycopg.Connection) -> None:
    """Reject a dead pooled connection before it is handed out.

    This costs one poll of the socket. Only a connection with unexpected input
    pays for a round trip, which raises if the connection is dead, so the pool
    discards it. Without this, the first publish after a server restart failed.
    """
    if _has_pending_input(conn):
        ConnectionPool.check_connection(conn)


async def _check_async(conn: psycopg.AsyncConnection) -> None:
    if _has_pending_input(conn):
        await AsyncConnectionPool.check_connection(conn)


def _one_line(exc: BaseException) -> str:
    # libpq messages span lines ("...failed: Connection refused\n\tIs the server
    # running..."). They name host, port, user and database but not the password,
    # which test_password_hidden_when_unreachable checks.
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    text = ""
    for line in lines:
        if text:
            text += " " if text.endswith((".", ":", ";", "?", "!")) else ". "
        text += line
    return text


def _topics_filter(topics: str | Iterable[str] | None) -> tuple[str, ...] | None:
    return None if topics is None else validate_topics(topics)


class _LogBase:
    """Settings, validation and the listener reference shared by both classes."""

    def __init__(
        self,
        database_url: str | None = None,
        *,
        schema: str | None = None,
        settings: Settings | None = None,
        **options: Any,
    ) -> None:
        if settings is None:
            settings = Settings.load(database_url, schema_name=schema, **options)
        elif database_url is not None or schema is not None or options:
            settings = settings.model_copy(
                update={
                    k: v
                    for k, v in dict(database_url=database_url, schema_name=schema, **options).items()
                    if v is not None
                }
            )
            settings = Settings.model_validate(settings.model_dump())
        self.settings = settings
        self._conninfo = settings.conninfo()
        self._listener_lock = threading.Lock()
        self._listener_ref: _listener.Listener | None = None
        self._listener_users = 0
        # Subscriptions holding the listener, so that closing the log closes them
        # and no LISTEN connection outlives it.
        self._open_subscriptions: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def schema(self) -> str:
        return self.settings.schema_name

    def _pool_options(self) -> dict[str, Any]:
        # prepared_statements off is for poolers that do not keep prepared
        # statements, such as PgBouncer in transaction mode before 1.21. The
        # threshold covers statements that do not choose, such as a transaction's write.
        if self.settings.prepared_statements:
            return _POOL_CONNECTION_OPTIONS
        return {**_POOL_CONNECTION_OPTIONS, "prepare_threshold": None}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.settings.redacted_url()} schema={self.schema!r}>"

    def _encode(self, events: Iterable[EventLike]) -> list[EncodedEvent]:
        limit = self.settings.max_data_bytes
        encoded = [encode_event(_as_new_event(e), limit) for e in events]
        check_batch_size(encoded_chars(encoded), lambda: encoded)
        return encoded

    def _encode_one(
        self, topics: str | Iterable[str], type: str, data: Any, metadata: dict[str, Any] | None
    ) -> EncodedEvent:
        return encode_event(NewEvent(topics, type, data, metadata), self.settings.max_data_bytes)

    def _translate(self, exc: psycopg.Error) -> EventLogError:
        return translate(exc, self.schema)

    def _pool_failure(self, error: psycopg.Error | None) -> ConnectionFailed:
        """Explain a pool timeout, given the error of a direct connection (None: it worked)."""
        url = self.settings.redacted_url()
        timeout = self.settings.connect_timeout
        if error is None:
            return ConnectionFailed(
                f"no pooled connection to {url} became free within {timeout:g} s, though the "
                f"server accepts connections: all {self.settings.pool_max_size} (pool_max_size) "
                "may be in use. Raise pool_max_size or connect_timeout, or hold connections "
                "for less time"
            )
        return self._connect_failure(error)

    def _connect_failure(self, error: psycopg.Error) -> ConnectionFailed:
        """Return ConnectionFailed for the error of a direct connection, with advice."""
        reason = _one_line(error)
        if "Is the server running" in reason:
            advice = "check the host and port in the URL"  # libpq asked the rest already
        else:
            advice = "check that the server is running and the URL is right"
        return ConnectionFailed(
            f"could not connect to {self.settings.redacted_url()} (waited "
            f"{self.settings.connect_timeout:g} s): {reason}; {advice}"
        )

    def _probe_options(self) -> dict[str, Any]:
        # One attempt, after the pool's wait, so it is kept short: at most 5 s.
        # libpq takes whole seconds.
        return {"connect_timeout": max(1, math.ceil(min(self.settings.connect_timeout, 5)))}

    def _listener(self, subscription: Any) -> _listener.Listener:
        with self._listener_lock:
            if self._listener_ref is None:
                self._listener_ref = _listener.acquire(self._conninfo, self.settings)
            self._listener_users += 1
            self._open_subscriptions.add(subscription)
            return self._listener_ref

    def _release_listener(self, subscription: Any) -> None:
        with self._listener_lock:
            self._open_subscriptions.discard(subscription)
            self._listener_users -= 1
            if self._listener_users > 0 or self._listener_ref is None:
                return
            listener, self._listener_ref = self._listener_ref, None
        _listener.release(listener)

    @property
    def listener(self) -> _listener.Listener | None:
        """The shared LISTEN connection, while any subscription is open."""
        return self._listener_ref


class EventLog(_LogBase):
    """A log, used from threads.

    >>> with EventLog("postgresql://localhost/app") as log:
    ...     event = log.publish("shop:products", "product_created", {"id": 1})
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        schema: str | None = None,
        settings: Settings | None = None,
        **options: Any,
    ) -> None:
        super().__init__(database_url, schema=schema, settings=settings, **options)
        self._pool = ConnectionPool(
            self._conninfo,
            min_size=self.settings.pool_min_size,
            max_size=self.settings.pool_max_size,
            kwargs=self._pool_options(),
            configure=_configure,
            check=_check,
            timeout=self.settings.connect_timeout,
            open=False,
            name=f"eventlog-{self.schema}",
        )
        self._opened = False

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> EventLog:
        if not self._opened:
            self._pool.open(wait=False)
            self._opened = True
        return self

    def close(self) -> None:
        """Close every open subscription of this log, then its connection pool."""
        for subscription in list(self._open_subscriptions):
            subscription.close()
        if self._opened:
            self._pool.close()
            self._opened = False

    def __enter__(self) -> EventLog:
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """Borrow a pooled autocommit connection, translating errors on the way out.

        A transaction left open on it is rolled back when it returns to the pool.
        """
        self.open()
        conn = self._getconn()
        # getconn and putconn, not the pool's connection() context manager, which
        # adds the connection's own context manager (a no-op in autocommit) and
        # costs about 3.5 us more per publish.
        try:
            yield conn
        except psycopg.Error as exc:
            raise self._translate(exc) from exc
        finally:
            self._pool.putconn(conn)

    def _getconn(self) -> psycopg.Connection:
        """Take a pooled connection, or raise ConnectionFailed with the reason."""
        try:
            return self._pool.getconn()
        except PoolTimeout as exc:
            raise self._pool_failure(self._connect_error()) from exc

    def _connect_error(self) -> psycopg.Error | None:
        """Return the error of a new direct connection, or None if one succeeds."""
        try:
            psycopg.Connection.connect(self._conninfo, **self._probe_options()).close()
        except psycopg.Error as exc:
            return exc
        return None

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        topics: str | Iterable[str],
        type: str,
        data: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Event:
        """Append one event and ring its topics' doorbells; return the stored event."""
        encoded = self._encode_one(topics, type, data, metadata)
        with self.connection() as conn:
            row = conn.execute(*publish_call(self.schema, encoded), prepare=self.settings.prepared_statements).fetchone()
        assert row is not None
        return encoded.stored(row[0], row[1])

    def publish_many(self, events: Iterable[EventLike]) -> list[Event]:
        """Append several events in one transaction, in order; return them stored."""
        encoded = self._encode(events)
        if not encoded:
            return []
        with self.connection() as conn:
            rows = conn.execute(
                statements(self.schema).publish_batch,
                publish_batch_params(self.schema, encoded),
                prepare=self.settings.prepared_statements,
            ).fetchall()
        return stored_events(encoded, rows)

    @contextlib.contextmanager
    def transaction(self, connection: psycopg.Connection | None = None) -> Iterator[Transaction]:
        """Open a transaction; events published in it are written right before COMMIT.

        It runs on `connection` if given (a connection the application owns, not
        in a transaction yet; see `eventlog.pg.transaction`), else on a
        connection from the log's pool. On a pooled connection every database
        error comes out as an eventlog exception, as with `connection()`; on the
        application's own connection see `eventlog.pg` for which do.
        """
        schema, limit = self.schema, self.settings.max_data_bytes
        if connection is not None:
            with pg.transaction(connection, schema=schema, max_data_bytes=limit) as tx:
                yield tx
            return
        with self.connection() as conn, pg.transaction(conn, schema=schema, max_data_bytes=limit) as tx:
            yield tx

    # -- reading -------------------------------------------------------------------------

    def head(self) -> int:
        """Return the id of the newest committed event, 0 for an empty log."""
        with self.connection() as conn:
            row = conn.execute(statements(self.schema).head).fetchone()
        assert row is not None
        return int(row[0])

    def read(
        self, topics: str | Iterable[str] | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[Event]:
        """Return one page: events of `topics` (None: all) with ids above `after`."""
        check_limit("limit", limit)
        page = limit or self.settings.batch_size
        query, params = select_events(self.schema, EventFilter(_topics_filter(topics), after_id=after), page)
        with self.connection() as conn:
            return [event_from_row(r) for r in conn.execute(query, params, prepare=False).fetchall()]

    def replay(
        self,
        topics: str | Iterable[str] | None = None,
        *,
        after: int = 0,
        until: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[Event]:
        """Yield events of `topics` with ids in (after, until], in id order, page by page.

        Each page is a separate query on the primary key, so no connection or
        snapshot is held while the caller handles events.
        """
        yield from self.query(
            EventFilter(_topics_filter(topics), after_id=after, until_id=until),
            page_size=page_size,
        )

    def query(self, where: EventFilter, *, page_size: int | None = None) -> Iterator[Event]:
        """Yield events that match `where`, in id order, page by page."""
        check_limit("page_size", page_size)
        page = page_size or self.settings.batch_size
        cursor = where.after_id
        while True:
            query, params = select_events(self.schema, _after(where, cursor), page)
            with self.connection() as conn:
                rows = conn.execute(query, params, prepare=False).fetchall()
            for row in rows:
                yield event_from_row(row)
            if len(rows) < page:
                return
            cursor = rows[-1][0]

    def subscribe(self, topics: str | Iterable[str], *, after: int | None = None) -> Subscription:
        """Return a subscription to `topics`, resuming after event id `after`.

        With ``after=None`` it delivers only events committed from now on. Open it
        with ``with`` (or iterate it directly) and close it when done.
        """
        return Subscription(self, topics, after)

    def _read_batch(self, read: ReadBatch) -> list[Event]:
        query, params = select_events(self.schema, EventFilter(read.topics, after_id=read.after), read.limit)
        with self.connection() as conn:
            return [event_from_row(r) for r in conn.execute(query, params, prepare=False).fetchall()]


class AsyncEventLog(_LogBase):
    """A log, used from asyncio code. Same methods as `EventLog`, as coroutines."""

    def __init__(
        self,
        database_url: str | None = None,
        *,
        schema: str | None = None,
        settings: Settings | None = None,
        **options: Any,
    ) -> None:
        super().__init__(database_url, schema=schema, settings=settings, **options)
        self._pool: AsyncConnectionPool | None = None

    async def open(self) -> AsyncEventLog:
        if self._pool is None:
            # AsyncConnectionPool must be created inside a running loop.
            self._pool = AsyncConnectionPool(
                self._conninfo,
                min_size=self.settings.pool_min_size,
                max_size=self.settings.pool_max_size,
                kwargs=self._pool_options(),
                configure=_configure_async,
                check=_check_async,
                timeout=self.settings.connect_timeout,
                open=False,
                name=f"eventlog-async-{self.schema}",
            )
            await self._pool.open(wait=False)
        return self

    async def close(self) -> None:
        """Close every open subscription of this log, then its connection pool."""
        for subscription in list(self._open_subscriptions):
            await subscription.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def __aenter__(self) -> AsyncEventLog:
        return await self.open()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """Borrow a pooled autocommit connection, translating errors on the way out.

        A transaction left open on it is rolled back when it returns to the pool.
        """
        await self.open()
        assert self._pool is not None
        pool = self._pool
        conn = await self._getconn(pool)
        # As in EventLog.connection: getconn and putconn, without the context managers.
        try:
            yield conn
        except psycopg.Error as exc:
            raise self._translate(exc) from exc
        finally:
            await pool.putconn(conn)

    async def _getconn(self, pool: AsyncConnectionPool) -> psycopg.AsyncConnection:
        """Take a pooled connection, or raise ConnectionFailed with the reason."""
        try:
            return await pool.getconn()
        except PoolTimeout as exc:
            raise self._pool_failure(await self._connect_error()) from exc

    async def _connect_error(self) -> psycopg.Error | None:
        """Return the error of a new direct connection, or None if one succeeds."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._probe_options())
        except psycopg.Error as exc:
            return exc
        await conn.close()
        return None

    async def publish(
        self,
        topics: str | Iterable[str],
        type: str,
        data: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Event:
        """Append one event and ring its topics' doorbells; return the stored event."""
        encoded = self._encode_one(topics, type, data, metadata)
        async with self.connection() as conn:
            cur = await conn.execute(*publish_call(self.schema, encoded), prepare=self.settings.prepared_statements)
            row = await cur.fetchone()
        assert row is not None
        return encoded.stored(row[0], row[1])

    async def publish_many(self, events: Iterable[EventLike]) -> list[Event]:
        """Append several events in one transaction, in order; return them stored."""
        encoded = self._encode(events)
        if not encoded:
            return []
        async with self.connection() as conn:
            cur = await conn.execute(
                statements(self.schema).publish_batch,
                publish_batch_params(self.schema, encoded),
                prepare=self.settings.prepared_statements,
            )
            rows = await cur.fetchall()
        return stored_events(encoded, rows)

    @contextlib.asynccontextmanager
    async def transaction(
        self, connection: psycopg.AsyncConnection | None = None
    ) -> AsyncIterator[AsyncTransaction]:
        """Open a transaction; events published in it are written right before COMMIT.

        It runs on `connection` if given (see `EventLog.transaction`), else on a
        connection from the log's pool.
        """
        schema, limit = self.schema, self.settings.max_data_bytes
        if connection is not None:
            async with pg.transaction(connection, schema=schema, max_data_bytes=limit) as tx:
                yield tx
            return
        async with self.connection() as conn, pg.transaction(conn, schema=schema, max_data_bytes=limit) as tx:
            yield tx

    async def head(self) -> int:
        """Return the id of the newest committed event, 0 for an empty log."""
        async with self.connection() as conn:
            cur = await conn.execute(statements(self.schema).head)
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def read(
        self, topics: str | Iterable[str] | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[Event]:
        """Return one page: events of `topics` (None: all) with ids above `after`."""
        check_limit("limit", limit)
        page = limit or self.settings.batch_size
        query, params = select_events(self.schema, EventFilter(_topics_filter(topics), after_id=after), page)
        async with self.connection() as conn:
            cur = await conn.execute(query, params, prepare=False)
            return [event_from_row(r) for r in await cur.fetchall()]

    async def replay(
        self,
        topics: str | Iterable[str] | None = None,
        *,
        after: int = 0,
        until: int | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Event]:
        """Yield events of `topics` with ids in (after, until], in id order, page by page."""
        where = EventFilter(_topics_filter(topics), after_id=after, until_id=until)
        async for event in self.query(where, page_size=page_size):
            yield event

    async def query(self, where: EventFilter, *, page_size: int | None = None) -> AsyncIterator[Event]:
        """Yield events that match `where`, in id order, page by page."""
        check_limit("page_size", page_size)
        page = page_size or self.settings.batch_size
        cursor = where.after_id
        while True:
            query, params = select_events(self.schema, _after(where, cursor), page)
            async with self.connection() as conn:
                cur = await conn.execute(query, params, prepare=False)
                rows = await cur.fetchall()
            for row in rows:
                yield event_from_row(row)
            if len(rows) < page:
                return
            cursor = rows[-1][0]

    def subscribe(self, topics: str | Iterable[str], *, after: int | None = None) -> AsyncSubscription:
        """Return a subscription to `topics`, resuming after event id `after`.

        With ``after=None`` it delivers only events committed from now on. Open it
        with ``async with`` (or iterate it directly) and close it when done.
        """
        return AsyncSubscription(self, topics, after)

    async def _read_batch(self, read: ReadBatch) -> list[Event]:
        query, params = select_events(self.schema, EventFilter(read.topics, after_id=read.after), read.limit)
        async with self.connection() as conn:
            cur = await conn.execute(query, params, prepare=False)
            return [event_from_row(r) for r in await cur.fetchall()]


def _after(where: EventFilter, cursor: int) -> EventFilter:
    return EventFilter(
        topics=where.topics,
        types=where.types,
        after_id=cursor,
        until_id=where.until_id,
        since=where.since,
        until=where.until,
    )
