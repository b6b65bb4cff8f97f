"""Which exception a failure raises: a lost connection, or an error on a working one.

`ConnectionFailed` means the connection went away, so a write may or may not have
committed. A statement that was cancelled or timed out on a working connection
committed nothing and must not look like that.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable

import psycopg
import psycopg.errors
import pytest
from helpers import wait_until
from psycopg import sql

import eventlog
import eventlog.migrate
from eventlog import pg
from eventlog.errors import ConnectionFailed, DatabaseError, TransactionStateError, is_transient


def _with_options(url: str, options: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={urllib.parse.quote(options)}"


def _hold_ordering_lock(database_url: str, schema: str) -> psycopg.Connection:
    """Open a transaction that holds the log's ordering lock until it ends."""
    holder = psycopg.connect(database_url)
    holder.execute(sql.SQL("SELECT {}.ordering_lock_v1()").format(sql.Identifier(schema)))
    return holder


def test_statement_timeout_is_not_connection_loss(database_url, schema, log):
    holder = _hold_ordering_lock(database_url, schema)
    try:
        url = _with_options(database_url, "-c statement_timeout=300")
        with eventlog.EventLog(url, schema=schema, pool_min_size=1, pool_max_size=1) as timed:
            with pytest.raises(DatabaseError) as raised:
                timed.publish("t", "waits for the lock")
            holder.rollback()
            after = timed.publish("t", "after")
    finally:
        holder.close()

    assert not isinstance(raised.value, ConnectionFailed)
    assert raised.value.sqlstate == "57014"
    assert "statement timeout" in str(raised.value)
    assert is_transient(raised.value)
    assert log.read() == [after], "the timed-out event was stored"


def _interrupt_waiting_publish(log, admin, database_url: str, schema: str, interrupt: str) -> list[BaseException]:
    """Publish while the ordering lock is held, run `interrupt` on the waiting backend; return the errors."""
    holder = _hold_ordering_lock(database_url, schema)
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            log.publish("t", "interrupted")
        except BaseException as exc:
            errors.append(exc)

    publisher = threading.Thread(target=publish)
    waiting = "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%ordering_lock_v1%'"
    try:
        publisher.start()
        wait_until(lambda: admin.execute(waiting).fetchone(), what="publish waiting for the lock")
        admin.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(interrupt)), [admin.execute(waiting).fetchone()[0]])
        publisher.join(30)
    finally:
        holder.close()
    return errors


def test_cancelled_publish_is_not_connection_loss(database_url, schema, log, admin):
    errors = _interrupt_waiting_publish(log, admin, database_url, schema, "pg_cancel_backend")

    assert len(errors) == 1
    assert type(errors[0]) is DatabaseError
    assert errors[0].sqlstate == "57014"
    assert log.read() == []


def test_terminated_publish_is_connection_loss(database_url, schema, log, admin):
    errors = _interrupt_waiting_publish(log, admin, database_url, schema, "pg_terminate_backend")

    assert len(errors) == 1
    assert isinstance(errors[0], ConnectionFailed)
    assert is_transient(errors[0])
    assert log.read() == []


@pytest.fixture
def slow_commit(admin, schema) -> None:
    """Make every transaction that writes events sleep 30 s at COMMIT, after its INSERT."""
    ident = sql.Identifier(schema)
    admin.execute(sql.SQL("""
        CREATE FUNCTION {}.test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM pg_sleep(30);
            RETURN NULL;
        END
        $fn$""").format(ident))
    admin.execute(sql.SQL("""
        CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON {}.events
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}.test_slow_commit()
        """).format(ident, ident))


def _terminate_during_commit(admin: psycopg.Connection, work: Callable[[], None]) -> None:
    """Run `work` in a thread and terminate its backend while its COMMIT sleeps (slow_commit)."""
    worker = threading.Thread(target=work)
    worker.start()
    sleeping = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query = 'COMMIT'"
    wait_until(lambda: admin.execute(sleeping).fetchone(), what="COMMIT sleeping")
    admin.execute("SELECT pg_terminate_backend(%s)", [admin.execute(sleeping).fetchone()[0]])
    worker.join(30)


def test_connection_lost_at_commit(database_url, schema, admin, slow_commit):
    # On the application's own connection, a COMMIT that loses its connection may
    # or may not have committed the events: that is ConnectionFailed, as elsewhere.
    errors: list[BaseException] = []
    pending: list[pg.PendingEvent] = []

    def publish() -> None:
        with psycopg.connect(database_url) as conn:
            try:
                with pg.transaction(conn, schema=schema) as tx:
                    pending.append(tx.publish("t", "lost at commit"))
            except BaseException as exc:
                errors.append(exc)

    _terminate_during_commit(admin, publish)

    assert len(errors) == 1
    assert isinstance(errors[0], ConnectionFailed)
    # The outcome is unknown to the client, so the event is not called discarded.
    assert not pending[0].discarded
    assert pending[0].event is not None


def test_deferred_constraint_error_passes_through(database_url, schema, admin):
    # The application's own error at COMMIT stays psycopg's, as its statements' do.
    admin.execute(sql.SQL("CREATE TABLE {}.orders (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)").format(
        sql.Identifier(schema)
    ))
    with psycopg.connect(database_url) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            with pg.transaction(conn, schema=schema) as tx:
                conn.execute(sql.SQL("INSERT INTO {}.orders VALUES (1), (1)").format(sql.Identifier(schema)))
                tx.publish("t", "e")


def test_publish_in_psycopg_nested_block_rejected(database_url, schema, log):
    with psycopg.connect(database_url) as conn:
        with pg.transaction(conn, schema=schema) as tx:
            kept = tx.publish("t", "outer")
            with conn.transaction():
                with pytest.raises(TransactionStateError, match=r"tx\.savepoint\(\)"):
                    tx.publish("t", "inside conn.transaction()")
                with pytest.raises(TransactionStateError):
                    tx.publish_many([("t", "inside conn.transaction()")])
            with tx.savepoint():
                inner = tx.publish("t", "inside tx.savepoint()")

    assert [event.type for event in log.read()] == ["outer", "inside tx.savepoint()"]
    assert kept.event is not None
    assert inner.event is not None


async def test_async_publish_in_psycopg_nested_block_rejected(database_url, schema, alog):
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with pg.transaction(conn, schema=schema) as tx:
            async with conn.transaction():
                with pytest.raises(TransactionStateError):
                    tx.publish("t", "inside conn.transaction()")
            async with tx.savepoint():
                tx.publish("t", "inside tx.savepoint()")

    assert [event.type for event in await alog.read()] == ["inside tx.savepoint()"]


def test_publish_after_block_rejected(log):
    with log.transaction() as tx:
        tx.publish("t", "inside")

    with pytest.raises(TransactionStateError, match="has ended"):
        tx.publish("t", "too late")
    with pytest.raises(TransactionStateError, match="has ended"):
        tx.publish_many([("t", "too late")])
    assert [event.type for event in log.read()] == ["inside"]


def test_is_transient() -> None:
    assert is_transient(ConnectionFailed("lost", None))
    assert is_transient(DatabaseError("deadlock detected", "40P01"))
    assert is_transient(DatabaseError("could not serialize access", "40001"))
    assert is_transient(DatabaseError("lock timeout", "55P03"))
    assert not is_transient(DatabaseError("duplicate key", "23505"))
    assert not is_transient(DatabaseError("no code", None))
    assert not is_transient(ValueError("not a database error"))


@pytest.fixture
def small_batch_limit(monkeypatch) -> int:
    """Lower the limit of one write to 2,000 bytes, so a test need not send 256 MiB."""
    monkeypatch.setattr(eventlog._sql, "MAX_BATCH_BYTES", 2_000)
    return 2_000


def test_batch_over_limit_rejected(log, small_batch_limit):
    events = [("t", "e", {"text": "é" * 60}) for _ in range(20)]  # 20 x 134 bytes, in 20 x 74 characters

    with pytest.raises(eventlog.DataTooLarge, match="smaller batches") as raised:
        log.publish_many(events)

    assert raised.value.size > small_batch_limit
    assert raised.value.limit == small_batch_limit
    assert log.read() == []
    assert len(log.publish_many(events[:10])) == 10  # a batch under the limit still goes


def test_transaction_over_limit_keeps_earlier_events(log, small_batch_limit):
    with log.transaction() as tx:
        accepted = []
        with pytest.raises(eventlog.DataTooLarge):
            for number in range(100):
                accepted.append(tx.publish("t", "e", {"number": number, "text": "x" * 100}))

    assert 5 < len(accepted) < 100
    assert [event.data["number"] for event in log.read()] == list(range(len(accepted)))


def test_single_event_over_limit_rejected(log, small_batch_limit):
    with pytest.raises(eventlog.DataTooLarge, match=r"^1 event\(s\) take .* publish a reference"):
        log.publish_many([("t", "e", {"text": "x" * 3_000})])
    assert log.read() == []


def test_data_limit_setting_capped() -> None:
    with pytest.raises(eventlog.ConfigurationError, match="max_data_bytes"):
        eventlog.EventLog("postgresql://localhost/x", max_data_bytes=2**31)


def test_missing_schema_names_migrate_command(database_url) -> None:
    with eventlog.EventLog(database_url, schema="not_migrated") as log:
        with pytest.raises(eventlog.SchemaNotFound, match=r"run `eventlog migrate --schema not_migrated`"):
            log.publish("t", "e")


def test_migrate_connect_failure_translated(database_url) -> None:
    parts = urllib.parse.urlsplit(database_url)
    url = urllib.parse.urlunsplit(parts._replace(path="/no_such_database"))
    with pytest.raises(ConnectionFailed, match='database "no_such_database" does not exist'):
        eventlog.migrate.upgrade(url, schema="unreachable")


def test_sqlalchemy_connection_lost_at_commit(database_url, schema, admin, slow_commit):
    import sqlalchemy as sa

    from eventlog._settings import sqlalchemy_url
    from eventlog.sqlalchemy import publish

    engine = sa.create_engine(sqlalchemy_url(database_url), poolclass=sa.NullPool)
    errors: list[BaseException] = []
    pending: list[pg.PendingEvent] = []

    def commit() -> None:
        try:
            with engine.begin() as conn:
                pending.append(publish(conn, "t", "lost at commit", schema=schema))
        except BaseException as exc:
            errors.append(exc)

    _terminate_during_commit(admin, commit)
    engine.dispose()

    assert len(errors) == 1
    assert not pending[0].discarded, "a COMMIT of unknown outcome was reported as rolled back"
    assert pending[0].event is not None
