"""Publishing in the transaction of a SQLAlchemy session or connection.

An application that keeps its own tables in the log's database publishes in
the same transaction as its business writes, so both commit or neither does::

    from eventlog.sqlalchemy import publish

    with Session(engine) as session, session.begin():
        session.add(CartItem(cart_id=7, product_id=3, quantity=2))
        pending = publish(session, "shop:cart:user:7", "item_added", {"product_id": 3})
    print(pending.event.id)

`publish` accepts a `Session`, an `AsyncSession`, a `Connection` or an
`AsyncConnection` (and scoped sessions), and is a plain function in every case.
It validates and encodes the event at once, so bad input raises before
anything is buffered. It does no I/O of its own.

When the events are written: by a ``commit`` listener on the transaction's
`Connection`. SQLAlchemy calls it right before it sends COMMIT, which is after
the session's ``before_commit`` hooks and after its final flush (a session
flushes *after* ``before_commit``, so a write from that hook could still be
followed by business rows). The call to ``<schema>.publish_batch_v1`` takes
the log's ordering lock, so it must be the last statement of the transaction;
see `eventlog._outbox` for why.

Rollbacks: events published in a ``begin_nested()`` block that rolls back are
dropped with it, and a transaction that rolls back writes nothing. A
`PendingEvent` reports which happened.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import psycopg
from sqlalchemy import event, exc, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, SessionTransaction, scoped_session
from sqlalchemy.sql.elements import TextClause

from ._outbox import Buffer, Entry, PendingEvent, by_schema, encode_many, encode_one, resolve
from ._sql import batch_function_params
from .errors import TransactionStateError, connection_lost, translate

__all__ = ["PendingEvent", "publish", "publish_many"]

logger = logging.getLogger(__name__)

SessionLike = Session | AsyncSession | scoped_session[Any] | async_scoped_session[Any]
Target = SessionLike | Connection | AsyncConnection


def publish(
    target: Target,
    topics: str | Iterable[str],
    type: str,
    data: Any = None,
    *,
    metadata: dict[str, Any] | None = None,
    schema: str | None = None,
    max_data_bytes: int | None = None,
) -> PendingEvent:
    """Publish an event in the transaction of `target`; it is written when that transaction commits.

    `schema` is the log's schema (default: ``EVENTLOG_SCHEMA`` or ``eventlog``);
    `max_data_bytes` the size limit of event data (default:
    ``EVENTLOG_MAX_DATA_BYTES`` or 1 MiB). Returns a `PendingEvent`, whose
    `event` is the stored event once the transaction has committed.
    """
    schema, limit = resolve(schema, max_data_bytes)
    encoded = encode_one(topics, type, data, metadata, limit)
    return _buffer_for(target).add(schema, encoded)[0]


def publish_many(
    target: Target,
    events: Iterable[Any],
    *,
    schema: str | None = None,
    max_data_bytes: int | None = None,
) -> list[PendingEvent]:
    """Publish several events, in order, in the transaction of `target`.

    Items are `NewEvent` objects, ``(topics, type, data)`` tuples or dicts with
    those keys. If one is invalid, none is buffered.
    """
    schema, limit = resolve(schema, max_data_bytes)
    encoded = encode_many(events, limit)
    return _buffer_for(target).add(schema, encoded)


def _buffer_for(target: Any) -> Buffer:
    if isinstance(target, (scoped_session, async_scoped_session)):
        target = target()
    if isinstance(target, AsyncSession):
        # No I/O here: an AsyncSession may not have its connection yet, and
        # getting one would need an await. It is linked at before_commit.
        return _SessionOutbox.of(target.sync_session).buffer
    if isinstance(target, Session):
        outbox = _SessionOutbox.of(target)
        outbox.link(target)
        return outbox.buffer
    if isinstance(target, AsyncConnection):
        if target.sync_connection is None:
            raise TransactionStateError(
                "the AsyncConnection is not started: publish inside "
                "`async with engine.begin() as conn:` or after `await conn.begin()`"
            )
        target = target.sync_connection
    if isinstance(target, Connection):
        if not target.in_transaction():
            raise TransactionStateError(
                "the connection has no transaction in progress, so no commit would write "
                "the event: publish inside `with engine.begin() as conn:` or `with conn.begin():`"
            )
        return _ConnectionOutbox.of(target).buffer
    raise TypeError(
        f"cannot publish in {target!r}: expected a SQLAlchemy Session, AsyncSession, "
        "Connection or AsyncConnection; for a psycopg connection use eventlog.pg.transaction()"
    )


# ---------------------------------------------------------------------------------------
# Connections: the buffer follows the connection's own transaction and savepoint events,
# and is written by its "commit" listener.


class _ConnectionOutbox:
    _registry: weakref.WeakKeyDictionary[Connection, _ConnectionOutbox] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.buffer = Buffer()
        # Sessions whose current transaction runs on this connection.
        self.sessions: list[_SessionOutbox] = []
        # Entries written by the last commit listener call: if that COMMIT then
        # fails, the rollback that SQLAlchemy requires next discards them.
        self.in_doubt: list[Entry] = []

    @classmethod
    def of(cls, conn: Connection) -> _ConnectionOutbox:
        with cls._lock:
            outbox = cls._registry.get(conn)
            if outbox is None:
                outbox = cls._registry[conn] = cls()
                outbox._listen(conn)
                if conn.engine not in _watched_engines:
                    _watched_engines.add(conn.engine)
                    event.listen(conn.engine, "handle_error", _on_engine_error)
            return outbox

    def _listen(self, conn: Connection) -> None:
        event.listen(conn, "begin", self._on_begin)
        event.listen(conn, "commit", self._on_commit)
        event.listen(conn, "rollback", self._on_rollback)
        event.listen(conn, "savepoint", self._on_savepoint)
        event.listen(conn, "rollback_savepoint", self._on_rollback_savepoint)
        event.listen(conn, "release_savepoint", self._on_release_savepoint)

    def _on_begin(self, conn: Connection) -> None:
        # A new transaction began, so the previous COMMIT went through.
        self.in_doubt = []

    def _on_failed_commit(self) -> None:
        for entry in self.in_doubt:
            entry.pending._discarded = True
        self.in_doubt = []

    def _on_savepoint(self, conn: Connection, name: str | None) -> None:
        self.buffer.open_savepoint(name)

    def _on_rollback_savepoint(self, conn: Connection, name: str, context: Any) -> None:
        self.buffer.rollback_savepoint(name, claim=True)

    def _on_release_savepoint(self, conn: Connection, name: str, context: Any) -> None:
        self.buffer.release_savepoint(name, claim=True)

    def _on_rollback(self, conn: Connection) -> None:
        self._on_failed_commit()
        self.buffer.discard()
        for session in self.sessions:
            session.buffer.discard()
        self.sessions = []

    def _on_commit(self, conn: Connection) -> None:
        entries = self.buffer.take()
        for session in self.sessions:
            session.written = session.buffer.take()
            entries.extend(session.written)
        self.sessions = []
        self.in_doubt = entries
        try:
            for schema, batch in by_schema(entries):
                _write(conn, schema, batch)
        except BaseException:
            # SQLAlchemy will not send COMMIT after an error here.
            self._on_failed_commit()
            raise


_watched_engines: weakref.WeakSet[Any] = weakref.WeakSet()


def _on_engine_error(context: Any) -> None:
    # A COMMIT that fails (a deferred constraint, a lost connection) fires no
    # rollback event: SQLAlchemy only marks the transaction inactive. Its error
    # passes through here, with no statement.
    if context.statement is not None or context.connection is None:
        return
    cause = getattr(context, "original_exception", None)
    if isinstance(cause, psycopg.Error) and connection_lost(cause):
        return  # the COMMIT may have gone through: the events stay in doubt, not discarded
    outbox = _ConnectionOutbox._registry.get(context.connection)
    if outbox is not None:
        outbox._on_failed_commit()


def _write(conn: Connection, schema: str, batch: list[Entry]) -> None:
    try:
        rows = conn.execute(_batch_statement(schema), _params(batch)).all()
    except exc.DBAPIError as error:
        if isinstance(error.orig, psycopg.Error):
            raise translate(error.orig, schema) from error
        raise
    # publish_batch_v1 assigns ids in input order and returns them ascending.
    for entry, row in zip(batch, rows):
        entry.written(row[0], row[1])
    logger.debug("wrote %d events to log %r before COMMIT", len(batch), schema)


@lru_cache(maxsize=None)
def _batch_statement(schema: str) -> TextClause:
    # CAST(:name AS type), because text() does not read :name::type as a bind parameter.
    return text(
        f'SELECT id, occurred_at FROM "{schema}".publish_batch_v1('
        "CAST(:topics AS jsonb), CAST(:types AS text[]), "
        "CAST(:data AS jsonb[]), CAST(:metadata AS jsonb[]))"
    )


def _params(batch: list[Entry]) -> dict[str, Any]:
    topics, types, data, metadata = batch_function_params([entry.encoded for entry in batch])
    return {"topics": topics, "types": types, "data": data, "metadata": metadata}


# ---------------------------------------------------------------------------------------
# Sessions: a session may publish before it has a connection (and an AsyncSession cannot
# get one without an await), and its savepoints are only emitted once a connection is
# needed. So its buffer follows the session's own transaction events, and is linked to
# the connection of its transaction, whose commit listener writes it.


class _SessionOutbox:
    _registry: weakref.WeakKeyDictionary[Session, _SessionOutbox] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.buffer = Buffer()
        self.connection: Connection | None = None  # of the current root transaction
        self.committed = False  # the current root transaction committed
        # What the commit listener took in the current root transaction. None until
        # it runs, and it never runs for a session joined to an outer transaction.
        self.written: list[Entry] | None = None

    @classmethod
    def of(cls, session: Session) -> _SessionOutbox:
        with cls._lock:
            outbox = cls._registry.get(session)
            if outbox is None:
                outbox = cls._registry[session] = cls()
                outbox._listen(session)
            return outbox

    def _listen(self, session: Session) -> None:
        event.listen(session, "after_transaction_create", self._on_create)
        event.listen(session, "before_commit", self._on_before_commit)
        event.listen(session, "after_commit", self._on_after_commit)
        event.listen(session, "after_rollback", self._on_rollback)
        event.listen(session, "after_transaction_end", self._on_end)

    def link(self, session: Session) -> None:
        """Attach the buffer to the connection of the session's transaction."""
        if self.connection is not None:
            return
        conn = session.connection()
        outbox = _ConnectionOutbox.of(conn)
        if self not in outbox.sessions:
            outbox.sessions.append(self)
        self.connection = conn

    def _on_create(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            self.buffer.open_savepoint(transaction)
        elif transaction.parent is None:
            self.connection = None
            self.committed = False
            self.written = None

    def _on_before_commit(self, session: Session) -> None:
        # Runs inside SQLAlchemy's greenlet for an AsyncSession, so getting the
        # connection may do I/O here.
        if self.buffer:
            self.link(session)

    def _on_after_commit(self, session: Session) -> None:
        # Also fired when a savepoint is released, and then that savepoint is still current.
        if session.get_nested_transaction() is None:
            self.committed = True

    def _on_rollback(self, session: Session) -> None:
        # A flush that fails rolls back to its boundary: the innermost savepoint
        # if there is one, else the whole transaction.
        nested = session.get_nested_transaction()
        if nested is not None:
            self.buffer.rollback_savepoint(nested)
        else:
            self.buffer.discard()

    def _on_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            self.buffer.release_savepoint(transaction)
            return
        if transaction.parent is not None:
            return  # an internal subtransaction of a flush
        if not self.committed:
            for entry in self.written or ():  # the COMMIT after the write failed
                entry.pending._discarded = True
        if self.buffer and self.committed and self.written is None and self.connection is not None:
            # The session joined a transaction that its connection's owner
            # commits later (Session(bind=connection) in a test, for example):
            # the connection's own commit listener writes these events.
            _ConnectionOutbox.of(self.connection).buffer.extend(self.buffer.take())
        elif self.buffer:
            if self.committed:
                logger.warning(
                    "%d events published after their transaction was written were dropped; "
                    "publish before commit() (after_commit hooks are too late)",
                    len(self.buffer),
                )
            self.buffer.discard()
        outbox = _ConnectionOutbox._registry.get(self.connection) if self.connection is not None else None
        if outbox is not None and self in outbox.sessions:
            outbox.sessions.remove(self)
        self.connection = None
