"""The event table is append-only in the database itself."""

from __future__ import annotations

import psycopg
import pytest

import eventlog
from eventlog.errors import APPEND_ONLY_SQLSTATE, AppendOnlyViolation, translate
from flavors import table_rows

HINT = "Publish a new event that corrects or reverses the earlier one."

STATEMENTS = {
    "UPDATE": 'UPDATE "{s}".events SET type = \'changed\'',
    "DELETE": 'DELETE FROM "{s}".events WHERE id = 1',
    "TRUNCATE": 'TRUNCATE "{s}".events',
}


@pytest.fixture
def stored(log: eventlog.EventLog) -> list[eventlog.Event]:
    return log.publish_many([("shop:products", "created", {"id": 1}), ("shop:products", "deleted", {"id": 1})])


@pytest.mark.parametrize("operation", list(STATEMENTS))
def test_rejected(operation: str, log: eventlog.EventLog, admin: psycopg.Connection, stored: list) -> None:
    before = table_rows(admin, log.schema)

    with pytest.raises(psycopg.Error) as raised:
        admin.execute(STATEMENTS[operation].format(s=log.schema))

    diag = raised.value.diag
    assert raised.value.sqlstate == APPEND_ONLY_SQLSTATE == "55EL1"
    assert diag.message_primary == f"the event log {log.schema}.events is append-only: {operation} is not allowed"
    assert diag.message_hint == HINT
    assert isinstance(translate(raised.value, log.schema), AppendOnlyViolation)
    assert translate(raised.value, log.schema).sqlstate == "55EL1"
    assert table_rows(admin, log.schema) == before


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE"])
def test_rejected_when_nothing_matches(operation: str, log: eventlog.EventLog, admin: psycopg.Connection) -> None:
    # The triggers fire per statement: even a change that matches no row is refused.
    statement = STATEMENTS[operation].format(s=log.schema) + (" WHERE false" if operation == "UPDATE" else " AND false")

    with pytest.raises(psycopg.Error) as raised:
        admin.execute(statement)

    assert raised.value.sqlstate == "55EL1"


@pytest.mark.parametrize("operation", list(STATEMENTS))
def test_rejected_through_the_log(operation: str, log: eventlog.EventLog, admin: psycopg.Connection, stored: list) -> None:
    before = table_rows(admin, log.schema)

    with pytest.raises(AppendOnlyViolation) as raised:
        with log.connection() as conn:
            conn.execute(STATEMENTS[operation].format(s=log.schema))

    assert f"{operation} is not allowed" in str(raised.value)
    assert HINT in str(raised.value)
    assert raised.value.sqlstate == "55EL1"
    assert isinstance(raised.value.__cause__, psycopg.Error)
    assert table_rows(admin, log.schema) == before
    assert log.read() == stored


def test_rejected_inside_a_transaction(log: eventlog.EventLog, admin: psycopg.Connection, stored: list) -> None:
    before = table_rows(admin, log.schema)

    with pytest.raises(AppendOnlyViolation):
        with log.transaction() as tx:
            tx.publish("shop:products", "restored", {"id": 1})
            tx.connection.execute(f'DELETE FROM "{log.schema}".events')

    assert table_rows(admin, log.schema) == before
