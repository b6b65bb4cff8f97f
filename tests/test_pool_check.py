"""Pooled connections that the server ended are replaced before they are used."""

from __future__ import annotations

import urllib.parse

import pytest

import eventlog
import eventlog.log
from helpers import wait_until


def _terminate_and_wait(admin, pid: int) -> None:
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_until(
        lambda: admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None,
        what=f"backend {pid} to exit",
    )


@pytest.mark.parametrize("check", ["on", "switched-off"])
def test_publish_after_backend_terminated(database_url, schema, admin, monkeypatch, check):
    if check == "switched-off":
        monkeypatch.setattr(eventlog.log, "_has_pending_input", lambda conn: False)

    with eventlog.EventLog(database_url, schema=schema, pool_min_size=1, pool_max_size=1) as log:
        log.publish("a", "first")
        with log.connection() as conn:
            pid = conn.info.backend_pid
        _terminate_and_wait(admin, pid)

        if check == "switched-off":
            # Without the check the pool hands out the dead connection.
            with pytest.raises(eventlog.ConnectionFailed):
                log.publish("a", "second")
        else:
            assert log.publish("a", "second").type == "second"


async def test_async_publish_after_backend_terminated(database_url, schema, admin):
    async with eventlog.AsyncEventLog(database_url, schema=schema, pool_min_size=1, pool_max_size=1) as log:
        await log.publish("a", "first")
        async with log.connection() as conn:
            pid = conn.info.backend_pid
        _terminate_and_wait(admin, pid)

        assert (await log.publish("a", "second")).type == "second"


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def test_connect_failure_gives_reason(database_url, schema):
    # The pool only reports a timeout; the error must still carry the server's message.
    url = _with_database(database_url, "no_such_database")
    with eventlog.EventLog(url, schema=schema, connect_timeout=1.0) as log:
        with pytest.raises(eventlog.ConnectionFailed) as raised:
            log.publish("a", "e")
    message = str(raised.value)
    assert 'database "no_such_database" does not exist' in message
    assert message.startswith("could not connect to postgresql://")
    assert "\n" not in message


async def test_async_connect_failure_gives_reason(database_url, schema):
    url = _with_database(database_url, "no_such_database")
    async with eventlog.AsyncEventLog(url, schema=schema, connect_timeout=1.0) as log:
        with pytest.raises(eventlog.ConnectionFailed) as raised:
            await log.head()
    assert 'database "no_such_database" does not exist' in str(raised.value)


def test_busy_pool_named_as_cause(database_url, schema):
    with eventlog.EventLog(database_url, schema=schema, pool_min_size=1, pool_max_size=1, connect_timeout=1.0) as log:
        with log.connection():
            with pytest.raises(eventlog.ConnectionFailed) as raised:
                log.publish("a", "e")
        assert log.publish("a", "after").type == "after"
    message = str(raised.value)
    assert "no pooled connection" in message
    assert "all 1 (pool_max_size) may be in use" in message


def _prepared_count(log) -> int:
    with log.connection() as conn:
        return conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]


@pytest.mark.parametrize("prepared", [True, False])
def test_prepared_statements_setting(database_url, schema, monkeypatch, prepared):
    # Off, for a pooler in transaction mode that does not carry prepared statements
    # from one transaction to the next: nothing may be prepared on the server.
    monkeypatch.setenv("EVENTLOG_PREPARED_STATEMENTS", str(prepared).lower())
    with eventlog.EventLog(database_url, schema=schema, pool_min_size=1, pool_max_size=1) as log:
        assert log.settings.prepared_statements is prepared
        for number in range(8):  # more than psycopg's default threshold of 5
            log.publish(["a", "b"][: 1 + number % 2], "single")
            log.publish_many([("a", "batch"), ("b", "batch")])
            with log.transaction() as tx:
                tx.publish("a", "in a transaction")
        count = _prepared_count(log)
        assert len(log.read(limit=100)) == 32

    if prepared:
        assert count >= 3
    else:
        assert count == 0


def test_subscribe_reports_connect_failure(database_url, schema, caplog):
    # Subscribing borrows a pooled connection before it starts the listener and
    # waits for LISTEN, so a bad URL fails after one connect_timeout, with the reason.
    url = _with_database(database_url, "no_such_database")
    with eventlog.EventLog(url, schema=schema, connect_timeout=1.0) as log:
        with pytest.raises(eventlog.ConnectionFailed, match='database "no_such_database" does not exist'):
            log.subscribe("a").open()

    assert not [r for r in caplog.records if r.name.startswith("eventlog._")], "the listener was started"


async def test_async_subscribe_reports_connect_failure(database_url, schema, caplog):
    url = _with_database(database_url, "no_such_database")
    async with eventlog.AsyncEventLog(url, schema=schema, connect_timeout=1.0) as log:
        with pytest.raises(eventlog.ConnectionFailed, match='database "no_such_database" does not exist'):
            await log.subscribe("a").open()

    assert not [r for r in caplog.records if r.name.startswith("eventlog._")], "the listener was started"
