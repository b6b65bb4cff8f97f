"""Publishing in a transaction on a psycopg connection that the application owns.

For code that works with psycopg directly, without SQLAlchemy::

    import psycopg
    from eventlog import pg

    with psycopg.connect(url) as conn:
        with pg.transaction(conn) as tx:
            conn.execute("UPDATE carts SET updated_at = now() WHERE id = %s", (7,))
            tx.publish("shop:cart:user:7", "item_added", {"product_id": 3})
        print(tx.events)

`transaction` opens the transaction itself: the events are buffered and written
in one statement right before its COMMIT, so the log's ordering lock is held
only for the commit (see `eventlog._outbox`). So the connection must not be in
a transaction already. For a nested block, use `tx.savepoint()`: if the block
raises, its events are dropped with its rows. Publishing inside the connection's
own ``conn.transaction()`` block raises `TransactionStateError`, because eventlog
cannot see that savepoint roll back. ``SAVEPOINT`` and ``ROLLBACK TO`` sent as SQL
are not seen at all: do not publish between them.

Errors of the final write come out as eventlog exceptions (`eventlog.errors`),
and so does a connection lost during COMMIT (`ConnectionFailed`: the events may
or may not have been committed). Other errors, from the application's own
statements or from its deferred constraints at COMMIT, pass through unchanged.

With an `AsyncConnection`, use ``async with pg.transaction(aconn) as tx`` and
``async with tx.savepoint()``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, overload

import psycopg
from psycopg import pq

from ._models import Event
from ._outbox import Buffer, Entry, PendingEvent, by_schema, encode_many, encode_one, resolve
from ._sql import publish_batch_params, statements
from .errors import ConnectionFailed, TransactionStateError, connection_lost, translate

__all__ = ["AsyncTransaction", "PendingEvent", "Transaction", "transaction"]

logger = logging.getLogger(__name__)


class _TransactionBase:
    def __init__(self, connection: Any, schema: str, max_data_bytes: int) -> None:
        self.connection = connection
        self.schema = schema
        self.events: list[Event] = []
        self._max_data_bytes = max_data_bytes
        self._buffer = Buffer()
        self._in_flight: list[Entry] = []
        self._ended = False
        self._depth: int | None = None  # psycopg's count of open transaction blocks
        self._savepoints = 0

    def _opened(self) -> None:
        # psycopg counts its open transaction() blocks in a private attribute. If a
        # psycopg release drops it, the check of nested blocks is skipped.
        self._depth = getattr(self.connection, "_num_transactions", None)

    def _check_open(self) -> None:
        if self._ended:
            raise TransactionStateError(
                "this transaction has ended, so an event published now would never be "
                "written: publish inside the with block, or open a new transaction"
            )
        depth = getattr(self.connection, "_num_transactions", None)
        if self._depth is not None and depth is not None and depth > self._depth + self._savepoints:
            raise TransactionStateError(
                "cannot publish inside the connection's own transaction() block: eventlog "
                "cannot see when psycopg rolls that savepoint back, and would write the "
                "event anyway. Use tx.savepoint() for a nested block that publishes"
            )

    def publish(
        self,
        topics: str | Iterable[str],
        type: str,
        data: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> PendingEvent:
        """Buffer an event; it is validated now and written at commit."""
        self._check_open()
        encoded = encode_one(topics, type, data, metadata, self._max_data_bytes)
        return self._buffer.add(self.schema, encoded)[0]

    def publish_many(self, events: Iterable[Any]) -> list[PendingEvent]:
        """Buffer several events, in order; if one is invalid, none is buffered."""
        self._check_open()
        return self._buffer.add(self.schema, encode_many(events, self._max_data_bytes))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} schema={self.schema!r} pending={len(self._buffer)}>"

    def _take(self) -> list[tuple[str, list[Entry]]]:
        self._in_flight = self._buffer.take()
        return by_schema(self._in_flight)

    def _settle(self, batch: list[Entry], rows: list[Any]) -> None:
        # The batch statement assigns ids in input order and returns them ascending.
        self.events.extend(entry.written(row[0], row[1]) for entry, row in zip(batch, rows))
        logger.debug("wrote %d events to log %r before COMMIT", len(batch), batch[0].schema)

    def _rolled_back(self) -> None:
        # The block, the write or the COMMIT itself failed: nothing was committed.
        self._buffer.discard()
        for entry in self._in_flight:
            entry.pending._discarded = True


class Transaction(_TransactionBase):
    """A transaction on a psycopg connection; its published events are written at commit.

    `connection` runs the application's own statements. After the block, `events`
    contains the stored events, and each `PendingEvent` that `publish` returned
    has its `event`. If the block raised, none of them was committed.
    """

    connection: psycopg.Connection[Any]

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Open a savepoint; if the block raises, its events are dropped with its rows."""
        key = object()
        self._buffer.open_savepoint(key)
        self._savepoints += 1
        try:
            with self.connection.transaction():
                try:
                    yield
                except BaseException:
                    # Also psycopg.Rollback, which the transaction block swallows.
                    self._buffer.rollback_savepoint(key)
                    raise
        finally:
            self._savepoints -= 1
            self._buffer.release_savepoint(key)


class AsyncTransaction(_TransactionBase):
    """The async twin of `Transaction`; `connection` is a psycopg `AsyncConnection`."""

    connection: psycopg.AsyncConnection[Any]

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Open a savepoint; if the block raises, its events are dropped with its rows."""
        key = object()
        self._buffer.open_savepoint(key)
        self._savepoints += 1
        try:
            async with self.connection.transaction():
                try:
                    yield
                except BaseException:
                    self._buffer.rollback_savepoint(key)
                    raise
        finally:
            self._savepoints -= 1
            self._buffer.release_savepoint(key)


@overload
def transaction(
    connection: psycopg.AsyncConnection[Any],
    *,
    schema: str | None = None,
    max_data_bytes: int | None = None,
) -> contextlib.AbstractAsyncContextManager[AsyncTransaction]: ...


@overload
def transaction(
    connection: psycopg.Connection[Any],
    *,
    schema: str | None = None,
    max_data_bytes: int | None = None,
) -> contextlib.AbstractContextManager[Transaction]: ...


def transaction(
    connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    *,
    schema: str | None = None,
    max_data_bytes: int | None = None,
) -> contextlib.AbstractContextManager[Transaction] | contextlib.AbstractAsyncContextManager[AsyncTransaction]:
    """Open a transaction on `connection`; events published in it are written at commit.

    `schema` is the log's schema (default: ``EVENTLOG_SCHEMA`` or ``eventlog``);
    `max_data_bytes` the size limit of event data (default: ``EVENTLOG_MAX_DATA_BYTES``
    or 1 MiB). Use ``with`` for a `psycopg.Connection` and ``async with`` for a
    `psycopg.AsyncConnection`.
    """
    schema, max_data_bytes = resolve(schema, max_data_bytes)
    if isinstance(connection, psycopg.AsyncConnection):
        return _async_transaction(AsyncTransaction(connection, schema, max_data_bytes))
    if isinstance(connection, psycopg.Connection):
        return _sync_transaction(Transaction(connection, schema, max_data_bytes))
    raise TypeError(
        f"invalid connection {connection!r}: expected a psycopg Connection or AsyncConnection; "
        "for SQLAlchemy sessions and connections use eventlog.sqlalchemy.publish()"
    )


# Both functions below raise eventlog exceptions for errors of their own write,
# and ConnectionFailed if the connection is lost during COMMIT, when the events
# may or may not have been committed. Other errors, such as the application's
# own statements or deferred constraints failing at COMMIT, pass unchanged.


@contextlib.contextmanager
def _sync_transaction(tx: Transaction) -> Iterator[Transaction]:
    conn = tx.connection
    _require_idle(conn)
    committing = False
    try:
        with conn.transaction():
            tx._opened()
            yield tx
            tx._ended = True
            for schema, batch in tx._take():
                with _translated(schema):
                    rows = conn.execute(statements(schema).publish_batch, _params(schema, batch)).fetchall()
                tx._settle(batch, rows)
            committing = True
    except BaseException as exc:
        lost = _after_failure(tx, exc, committing)
        if lost is not None:
            raise lost from exc
        raise
    finally:
        tx._ended = True
    if tx._buffer:
        tx._rolled_back()  # psycopg.Rollback ended the block: psycopg swallows it


@contextlib.asynccontextmanager
async def _async_transaction(tx: AsyncTransaction) -> AsyncIterator[AsyncTransaction]:
    conn = tx.connection
    _require_idle(conn)
    committing = False
    try:
        async with conn.transaction():
            tx._opened()
            yield tx
            tx._ended = True
            for schema, batch in tx._take():
                with _translated(schema):
                    cur = await conn.execute(statements(schema).publish_batch, _params(schema, batch))
                    rows = await cur.fetchall()
                tx._settle(batch, rows)
            committing = True
    except BaseException as exc:
        lost = _after_failure(tx, exc, committing)
        if lost is not None:
            raise lost from exc
        raise
    finally:
        tx._ended = True
    if tx._buffer:
        tx._rolled_back()  # psycopg.Rollback ended the block: psycopg swallows it


def _after_failure(tx: _TransactionBase, exc: BaseException, committing: bool) -> ConnectionFailed | None:
    """Mark the events discarded, or return ConnectionFailed if `exc` lost the connection at COMMIT.

    In that case the COMMIT may have gone through, so the written events keep
    their `event` and are not marked discarded: only a read can tell.
    """
    if committing and isinstance(exc, psycopg.Error) and connection_lost(exc):
        lost = translate(exc, tx.schema)
        assert isinstance(lost, ConnectionFailed)
        return lost
    tx._rolled_back()
    return None


def _require_idle(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    status = conn.info.transaction_status
    if status == pq.TransactionStatus.IDLE:
        return
    raise TransactionStateError(
        f"the connection is already in a transaction (status {status.name}): eventlog writes "
        "the events right before COMMIT, so it must open the transaction itself. Commit or "
        "roll back first (or use an autocommit connection); inside an eventlog transaction, "
        "use tx.savepoint() for a nested block"
    )


def _params(schema: str, batch: list[Entry]) -> list[Any]:
    return publish_batch_params(schema, [entry.encoded for entry in batch])


@contextlib.contextmanager
def _translated(schema: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, schema) from exc
