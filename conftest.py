# Temporary home of the log fixtures while tests/conftest.py is being written;
# they move there once it settles.
from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

import eventlog
from eventlog import migrate

_counter = itertools.count()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A fresh, migrated log schema for one test, dropped afterwards."""
    name = f"t{os.getpid() % 10000}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    migrate.upgrade(database_url, schema=name)
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def log(database_url: str, schema: str) -> Iterator[eventlog.EventLog]:
    """An open EventLog on a fresh schema, with short intervals for tests."""
    with eventlog.EventLog(
        database_url, schema=schema, poll_interval=2.0, heartbeat_interval=2.0,
        heartbeat_timeout=2.0, connect_timeout=5.0,
    ) as opened:
        yield opened


@pytest.fixture
async def alog(database_url: str, schema: str):
    async with eventlog.AsyncEventLog(
        database_url, schema=schema, poll_interval=2.0, heartbeat_interval=2.0,
        heartbeat_timeout=2.0, connect_timeout=5.0,
    ) as opened:
        yield opened


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection]:
    """A superuser autocommit connection for terminating backends and inspecting state."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
