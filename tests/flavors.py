"""One contract suite for `EventLog` and `AsyncEventLog`.

The `elog` fixture runs a test twice, once per flavor. Both adapters expose the
log's methods as coroutines, so each test is written once, as an ``async def``:
the sync adapter calls the blocking method directly (nothing else runs on the
test's event loop), the async adapter awaits it. Iterators come back as lists.

Test modules import the fixture: ``from flavors import elog  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import eventlog
from eventlog import Event, EventFilter

# Short intervals keep tests quick. Correct delivery does not depend on them:
# they only bound how long a missed doorbell can delay an event.
TEST_OPTIONS: dict[str, Any] = dict(
    poll_interval=2.0, heartbeat_interval=2.0, heartbeat_timeout=2.0, connect_timeout=5.0
)

# Seconds an expected event may take to arrive; generous, for a loaded machine.
ARRIVAL_TIMEOUT = 15.0
# How long to wait before concluding that nothing more arrives. A short wait
# can only make such a check weaker, never fail a correct implementation.
QUIET_TIMEOUT = 0.3


class SyncSub:
    """A `Subscription` behind the coroutine interface."""

    def __init__(self, sub: eventlog.Subscription) -> None:
        self.sub = sub

    @property
    def state(self) -> eventlog.SubscriptionState:
        return self.sub.state

    @property
    def cursor(self) -> int | None:
        return self.sub.cursor

    async def open(self) -> SyncSub:
        self.sub.open()
        return self

    async def next_event(self, timeout: float | None = None) -> Event | None:
        return self.sub.next_event(timeout=timeout)

    async def add_topics(self, topics: str | Iterable[str]) -> None:
        self.sub.add_topics(topics)

    async def remove_topics(self, topics: str | Iterable[str]) -> None:
        self.sub.remove_topics(topics)

    async def close(self) -> None:
        self.sub.close()

    async def __aenter__(self) -> SyncSub:
        self.sub.__enter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.sub.__exit__(*exc_info)

    async def take(self, count: int, timeout: float = ARRIVAL_TIMEOUT) -> list[Event]:
        return await _take(self, count, timeout)

    async def rest(self) -> list[Event]:
        return await _rest(self)


class AsyncSub(SyncSub):
    """An `AsyncSubscription` behind the same interface."""

    sub: eventlog.AsyncSubscription  # type: ignore[assignment]

    async def open(self) -> AsyncSub:
        await self.sub.open()
        return self

    async def next_event(self, timeout: float | None = None) -> Event | None:
        return await self.sub.next_event(timeout=timeout)

    async def add_topics(self, topics: str | Iterable[str]) -> None:
        await self.sub.add_topics(topics)

    async def remove_topics(self, topics: str | Iterable[str]) -> None:
        await self.sub.remove_topics(topics)

    async def close(self) -> None:
        await self.sub.close()

    async def __aenter__(self) -> AsyncSub:
        await self.sub.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.sub.__aexit__(*exc_info)


async def _take(sub: SyncSub, count: int, timeout: float) -> list[Event]:
    """Return the next `count` events; fail if one does not come within `timeout`."""
    events = []
    for _ in range(count):
        event = await sub.next_event(timeout=timeout)
        assert event is not None, f"event {len(events) + 1} of {count} did not arrive in {timeout} s; got {events}"
        events.append(event)
    return events


async def _rest(sub: SyncSub) -> list[Event]:
    """Return the events that come until the subscription is quiet."""
    events = []
    while (event := await sub.next_event(timeout=QUIET_TIMEOUT)) is not None:
        events.append(event)
    return events


class SyncFlavor:
    """An `EventLog` behind the coroutine interface."""

    is_async = False

    def __init__(self, log: eventlog.EventLog, database_url: str) -> None:
        self.log = log
        self.database_url = database_url
        self._others: list[SyncFlavor] = []

    @property
    def schema(self) -> str:
        return self.log.schema

    async def other(self, **options: Any) -> SyncFlavor:
        """Open another log of the same flavor on the same schema, closed at teardown."""
        log = eventlog.EventLog(self.database_url, schema=self.schema, **{**TEST_OPTIONS, **options})
        other = SyncFlavor(log.open(), self.database_url)
        self._others.append(other)
        return other

    async def close(self) -> None:
        for other in self._others:
            await other.close()
        self.log.close()

    async def publish(self, *args: Any, **kwargs: Any) -> Event:
        return self.log.publish(*args, **kwargs)

    async def publish_many(self, events: Iterable[Any]) -> list[Event]:
        return self.log.publish_many(events)

    async def head(self) -> int:
        return self.log.head()

    async def read(self, *args: Any, **kwargs: Any) -> list[Event]:
        return self.log.read(*args, **kwargs)

    async def replay(self, *args: Any, **kwargs: Any) -> list[Event]:
        return list(self.log.replay(*args, **kwargs))

    async def query(self, where: EventFilter, **kwargs: Any) -> list[Event]:
        return list(self.log.query(where, **kwargs))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[eventlog.Transaction]:
        with self.log.transaction() as tx:
            yield tx

    async def execute(self, conn: Any, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        """Run a statement on a connection handed out by the log (e.g. `tx.connection`)."""
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def subscribe(self, topics: str | Iterable[str], *, after: int | None = None) -> SyncSub:
        return SyncSub(self.log.subscribe(topics, after=after))


class AsyncFlavor(SyncFlavor):
    """An `AsyncEventLog` behind the same interface."""

    is_async = True
    log: eventlog.AsyncEventLog  # type: ignore[assignment]

    async def other(self, **options: Any) -> AsyncFlavor:
        log = eventlog.AsyncEventLog(self.database_url, schema=self.schema, **{**TEST_OPTIONS, **options})
        other = AsyncFlavor(await log.open(), self.database_url)  # type: ignore[arg-type]
        self._others.append(other)
        return other

    async def close(self) -> None:
        for other in self._others:
            await other.close()
        await self.log.close()

    async def publish(self, *args: Any, **kwargs: Any) -> Event:
        return await self.log.publish(*args, **kwargs)

    async def publish_many(self, events: Iterable[Any]) -> list[Event]:
        return await self.log.publish_many(events)

    async def head(self) -> int:
        return await self.log.head()

    async def read(self, *args: Any, **kwargs: Any) -> list[Event]:
        return await self.log.read(*args, **kwargs)

    async def replay(self, *args: Any, **kwargs: Any) -> list[Event]:
        return [event async for event in self.log.replay(*args, **kwargs)]

    async def query(self, where: EventFilter, **kwargs: Any) -> list[Event]:
        return [event async for event in self.log.query(where, **kwargs)]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[eventlog.Transaction]:
        async with self.log.transaction() as tx:
            yield tx

    async def execute(self, conn: Any, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []

    def subscribe(self, topics: str | Iterable[str], *, after: int | None = None) -> AsyncSub:
        return AsyncSub(self.log.subscribe(topics, after=after))  # type: ignore[arg-type]


@pytest.fixture(params=["sync", "async"])
async def elog(request: pytest.FixtureRequest, database_url: str, schema: str) -> AsyncIterator[SyncFlavor]:
    """The log on a fresh schema, once as `EventLog` and once as `AsyncEventLog`."""
    flavor: SyncFlavor
    if request.param == "sync":
        flavor = SyncFlavor(eventlog.EventLog(database_url, schema=schema, **TEST_OPTIONS).open(), database_url)
    else:
        log = eventlog.AsyncEventLog(database_url, schema=schema, **TEST_OPTIONS)
        flavor = AsyncFlavor(await log.open(), database_url)  # type: ignore[arg-type]
    try:
        yield flavor
    finally:
        await flavor.close()


def table_rows(admin: psycopg.Connection, schema: str) -> list[tuple[Any, ...]]:
    """Return every stored event row, in id order, as the database stores it."""
    return admin.execute(
        f'SELECT id, topics, type, data, metadata, occurred_at FROM "{schema}".events ORDER BY id'
    ).fetchall()


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` until it is true, and fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def scratch_database(database_url: str, prefix: str) -> Iterator[str]:
    """Create an empty database on the suite's server, yield its URL, and drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urllib.parse.urlsplit(database_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
