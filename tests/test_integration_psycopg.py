"""Publishing in a transaction on a psycopg connection the application owns (eventlog.pg)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator

import psycopg
import psycopg.errors
import pytest

import eventlog
from eventlog import pg
from eventlog.errors import InvalidData, SchemaNotFound, TransactionStateError


@pytest.fixture
def app_tables(admin: psycopg.Connection, schema: str) -> None:
    admin.execute(f'SET search_path = "{schema}"')
    admin.execute("CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL CHECK (stock >= 0))")
    admin.execute("INSERT INTO products VALUES (7, 10)")
    # Checked at COMMIT, so a transaction can fail after its events were written.
    admin.execute("CREATE TABLE orders (id int, CONSTRAINT orders_id_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)")
    admin.execute("RESET search_path")


@pytest.fixture
def conn(database_url: str, schema: str, app_tables: None) -> Iterator[psycopg.Connection]:
    """The application's own connection: not autocommit, as psycopg opens it by default."""
    with psycopg.connect(database_url, options=f"-csearch_path={schema}") as conn:
        yield conn


@pytest.fixture
async def aconn(database_url: str, schema: str, app_tables: None) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(database_url, options=f"-csearch_path={schema}") as aconn:
        yield aconn


def stock(admin: psycopg.Connection, schema: str) -> int:
    return admin.execute(f'SELECT stock FROM "{schema}".products WHERE id = 7').fetchone()[0]


def holds_ordering_lock(admin: psycopg.Connection, conn: psycopg.Connection) -> bool:
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s AND granted",
        (conn.info.backend_pid,),
    ).fetchone()
    return row[0] > 0


def test_commit_together(conn, log, admin, schema):
    with pg.transaction(conn, schema=schema) as tx:
        conn.execute("UPDATE products SET stock = stock - 2 WHERE id = 7")
        pending = tx.publish(["shop:inventory", "shop:products:7"], "stock_changed", {"delta": -2})
        many = tx.publish_many([("shop:inventory", "restock_planned", {"at": "monday"})])
        # Buffered: no lock is held while the business transaction goes on.
        assert not holds_ordering_lock(admin, conn)
        assert log.head() == 0

    assert [e.type for e in tx.events] == ["stock_changed", "restock_planned"]
    assert log.read() == tx.events == [pending.event, many[0].event]
    assert stock(admin, schema) == 8
    xmins = admin.execute(
        f'SELECT xmin::text FROM "{schema}".products UNION SELECT xmin::text FROM "{schema}".events'
    ).fetchall()
    assert len(xmins) == 1
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


class Abandoned(Exception):
    pass


def test_exception_in_block(conn, log, admin, schema):
    with pytest.raises(Abandoned), pg.transaction(conn, schema=schema) as tx:
        conn.execute("UPDATE products SET stock = stock - 2 WHERE id = 7")
        pending = tx.publish("shop:inventory", "stock_changed")
        raise Abandoned

    assert pending.discarded
    assert tx.events == []
    assert stock(admin, schema) == 10
    assert log.head() == 0


def test_rollback_exception(conn, log, admin, schema):
    # psycopg.Rollback ends the block quietly, as in conn.transaction().
    with pg.transaction(conn, schema=schema) as tx:
        conn.execute("UPDATE products SET stock = stock - 2 WHERE id = 7")
        pending = tx.publish("shop:inventory", "stock_changed")
        raise psycopg.Rollback

    assert pending.discarded
    assert tx.events == []
    assert stock(admin, schema) == 10
    assert log.head() == 0


def test_violation_in_block(conn, log, admin, schema):
    with pytest.raises(psycopg.errors.CheckViolation), pg.transaction(conn, schema=schema) as tx:
        pending = tx.publish("shop:inventory", "stock_changed")
        conn.execute("UPDATE products SET stock = stock - 20 WHERE id = 7")

    assert pending.discarded
    assert log.head() == 0


def test_failed_commit(conn, log, admin, schema):
    with pytest.raises(psycopg.errors.UniqueViolation), pg.transaction(conn, schema=schema) as tx:
        conn.execute("INSERT INTO orders VALUES (1), (1)")
        pending = tx.publish("shop:orders", "order_placed")

    assert pending.event is not None, "the event was written before the failed COMMIT"
    assert pending.discarded
    assert log.head() == 0
    # The connection is usable again.
    with pg.transaction(conn, schema=schema) as tx:
        after = tx.publish("shop:orders", "order_placed")
    assert log.read() == [after.event]


def test_missing_log(conn, admin, schema):
    with pytest.raises(SchemaNotFound, match="no_such_log"), pg.transaction(conn, schema="no_such_log") as tx:
        conn.execute("UPDATE products SET stock = stock - 2 WHERE id = 7")
        pending = tx.publish("shop:inventory", "stock_changed")

    assert pending.discarded
    assert stock(admin, schema) == 10


def test_invalid_event(conn, log, schema):
    with pg.transaction(conn, schema=schema) as tx:
        valid = tx.publish("t", "valid")
        with pytest.raises(InvalidData, match="time zone"):
            tx.publish("t", "naive", {"at": dt.datetime(2026, 1, 2)})
        with pytest.raises(InvalidData):
            tx.publish_many([("t", "ok"), ("t", "bad", {"x": float("inf")})])

    assert log.read() == [valid.event]


def test_savepoints(conn, log, admin, schema):
    with pg.transaction(conn, schema=schema) as tx:
        first = tx.publish("t", "first")
        with pytest.raises(psycopg.errors.CheckViolation), tx.savepoint():
            dropped = tx.publish("t", "dropped")
            conn.execute("UPDATE products SET stock = stock - 20 WHERE id = 7")
        with tx.savepoint():
            conn.execute("UPDATE products SET stock = stock - 1 WHERE id = 7")
            kept = tx.publish("t", "kept")
            with tx.savepoint():
                quiet = tx.publish("t", "rolled-back-quietly")
                raise psycopg.Rollback
        last = tx.publish("t", "last")

    assert dropped.discarded
    assert quiet.discarded
    assert log.read() == tx.events == [first.event, kept.event, last.event]
    assert stock(admin, schema) == 9


def test_connection_in_transaction(conn, schema):
    conn.execute("SELECT 1")  # psycopg began a transaction implicitly
    with pytest.raises(TransactionStateError, match="INTRANS"):
        with pg.transaction(conn, schema=schema):
            pass
    conn.rollback()

    with pg.transaction(conn, schema=schema):
        with pytest.raises(TransactionStateError, match="savepoint"):
            with pg.transaction(conn, schema=schema):
                pass


def test_wrong_connection(schema):
    with pytest.raises(TypeError, match="eventlog.sqlalchemy"):
        pg.transaction(object(), schema=schema)  # type: ignore[call-overload]


def test_log_transaction_on_own_connection(conn, log, admin, schema):
    with log.transaction(connection=conn) as tx:
        conn.execute("UPDATE products SET stock = stock - 2 WHERE id = 7")
        tx.publish("shop:inventory", "stock_changed")

    assert len(tx.events) == 1
    assert log.read() == tx.events
    assert stock(admin, schema) == 8


def test_default_schema(conn, log, schema, monkeypatch):
    monkeypatch.setenv("EVENTLOG_SCHEMA", schema)
    with pg.transaction(conn) as tx:
        tx.publish("t", "from-environment")
    assert log.read() == tx.events


async def test_async(aconn, alog, admin, schema):
    async with pg.transaction(aconn, schema=schema) as tx:
        await aconn.execute("UPDATE products SET stock = stock - 2 WHERE id = 7")
        pending = tx.publish("shop:inventory", "stock_changed")
        with pytest.raises(Abandoned):
            async with tx.savepoint():
                dropped = tx.publish("shop:inventory", "dropped")
                raise Abandoned

    assert dropped.discarded
    assert await alog.read() == tx.events == [pending.event]
    assert stock(admin, schema) == 8

    with pytest.raises(Abandoned):
        async with pg.transaction(aconn, schema=schema) as failed:
            await aconn.execute("UPDATE products SET stock = 0 WHERE id = 7")
            abandoned = failed.publish("shop:inventory", "abandoned")
            raise Abandoned
    assert abandoned.discarded
    assert stock(admin, schema) == 8

    async with alog.transaction(connection=aconn) as own:
        own.publish("shop:inventory", "via-log")
    assert [e.type for e in await alog.read()] == ["stock_changed", "via-log"]


def test_exported(schema):
    # The pooled transaction of EventLog and pg.transaction are one class.
    assert eventlog.Transaction is pg.Transaction
