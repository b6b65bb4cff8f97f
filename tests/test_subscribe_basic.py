"""Subscriptions, sync and async: where they start, what they get, their states, and closing."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

import eventlog
from eventlog import SubscriptionState, SubscriptionStateError, migrate
from flavors import (  # noqa: F401  (elog is a fixture)
    ARRIVAL_TIMEOUT,
    TEST_OPTIONS,
    AsyncFlavor,
    SyncFlavor,
    elog,
    scratch_database,
    wait_until,
)


def publish_from_thread(database_url: str, schema: str, topics: list[str], type: str) -> threading.Thread:
    """Publish from another thread and connection while the test waits for the event."""

    def run() -> None:
        with eventlog.EventLog(database_url, schema=schema, **TEST_OPTIONS) as log:
            log.publish(topics, type)

    thread = threading.Thread(target=run, name="test-publisher")
    thread.start()
    return thread


async def test_catch_up_then_live(elog: SyncFlavor) -> None:
    backlog = [await elog.publish("a", "old", {"n": n}) for n in range(3)]
    await elog.publish("b", "other")
    # No poll for an hour: a live event can only come through its doorbell.
    doorbell_only = await elog.other(poll_interval=3600)

    async with doorbell_only.subscribe("a", after=0) as sub:
        assert await sub.take(3) == backlog
        assert await sub.next_event(timeout=0.2) is None
        assert sub.state is SubscriptionState.LIVE

        publisher = publish_from_thread(elog.database_url, elog.schema, ["a"], "live")
        live = await sub.next_event(timeout=ARRIVAL_TIMEOUT)
        publisher.join()

    assert live is not None
    assert live.type == "live"
    assert live.id > backlog[-1].id
    assert sub.cursor == live.id


async def test_from_now_on(elog: SyncFlavor) -> None:
    await elog.publish("a", "old")
    await elog.publish("a", "old")

    async with elog.subscribe("a") as sub:
        assert sub.cursor == await elog.head()
        new = await elog.publish("a", "new")
        assert await sub.take(1) == [new]
        assert await sub.rest() == []


async def test_after_id(elog: SyncFlavor) -> None:
    events = [await elog.publish("a", "e", {"n": n}) for n in range(5)]

    async with elog.subscribe("a", after=events[2].id) as sub:
        assert await sub.take(2) == events[3:]
        assert await sub.rest() == []


async def test_other_topics_never_arrive(elog: SyncFlavor) -> None:
    await elog.publish("b", "other")
    first = await elog.publish("a", "mine")
    await elog.publish(["b", "c"], "other")

    async with elog.subscribe("a", after=0) as sub:
        assert await sub.take(1) == [first]
        await elog.publish("b", "other")
        await elog.publish("c", "other")
        second = await elog.publish("a", "mine")
        # The next event is ours: nothing of b or c came in between.
        assert await sub.take(1) == [second]


async def test_two_topics_once(elog: SyncFlavor) -> None:
    async with elog.subscribe(["a", "b"], after=0) as sub:
        both = await elog.publish(["a", "b"], "both")
        marker = await elog.publish("a", "marker")

        assert await sub.take(2) == [both, marker]
        assert await sub.rest() == []


async def test_timeout_returns_none(elog: SyncFlavor) -> None:
    async with elog.subscribe("a", after=0) as sub:
        assert await sub.next_event(timeout=0.1) is None
        assert await sub.next_event(timeout=0) is None
        assert sub.state is SubscriptionState.LIVE


async def test_states(elog: SyncFlavor) -> None:
    small = await elog.other(batch_size=2)
    events = [await small.publish("a", "e", {"n": n}) for n in range(5)]
    sub = small.subscribe("a", after=0)
    assert sub.state is SubscriptionState.INITIAL

    await sub.open()
    assert sub.state is SubscriptionState.CATCHING_UP
    assert await sub.take(1) == events[:1]
    assert sub.state is SubscriptionState.CATCHING_UP  # a full batch: more is waiting
    assert await sub.take(4) == events[1:]
    assert sub.state is SubscriptionState.LIVE
    await sub.close()
    assert sub.state is SubscriptionState.CLOSED
    await sub.close()  # closing twice is harmless

    with pytest.raises(SubscriptionStateError, match="closed"):
        await sub.next_event(timeout=0.1)
    with pytest.raises(SubscriptionStateError, match="closed"):
        await sub.add_topics("b")
    with pytest.raises(SubscriptionStateError, match="closed"):
        await sub.open()


async def test_open_twice(elog: SyncFlavor) -> None:
    async with elog.subscribe("a", after=0) as sub:
        with pytest.raises(SubscriptionStateError, match="live|catching up"):
            await sub.open()


async def test_iteration_after_close_ends(elog: SyncFlavor) -> None:
    await elog.publish("a", "e")
    sub = elog.subscribe("a", after=0)
    await sub.open()
    await sub.close()

    if elog.is_async:
        assert [e async for e in sub.sub] == []  # type: ignore[attr-defined]
    else:
        assert list(sub.sub) == []


def test_close_from_another_thread(log: eventlog.EventLog) -> None:
    first = log.publish("a", "e")
    received = []
    sub = log.subscribe("a", after=0)

    def consume() -> None:
        for event in sub:
            received.append(event)

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_until(lambda: received == [first] and sub.state is SubscriptionState.LIVE, what="consumer live")
    sub.close()
    consumer.join(ARRIVAL_TIMEOUT)

    assert not consumer.is_alive()
    assert sub.state is SubscriptionState.CLOSED


async def test_close_from_another_task(alog: eventlog.AsyncEventLog) -> None:
    first = await alog.publish("a", "e")
    received = []
    sub = alog.subscribe("a", after=0)

    async def consume() -> None:
        async for event in sub:
            received.append(event)

    consumer = asyncio.create_task(consume())
    deadline = asyncio.get_running_loop().time() + ARRIVAL_TIMEOUT
    while not (received == [first] and sub.state is SubscriptionState.LIVE):
        assert asyncio.get_running_loop().time() < deadline, "consumer not live in time"
        assert not consumer.done(), consumer
        await asyncio.sleep(0.01)  # let the consumer run; the loop above is the wait
    await sub.close()
    await asyncio.wait_for(consumer, ARRIVAL_TIMEOUT)

    assert sub.state is SubscriptionState.CLOSED


async def test_add_and_remove_topics(elog: SyncFlavor) -> None:
    before_cursor = await elog.publish("b", "b0")
    a1 = await elog.publish("a", "a1")

    async with elog.subscribe("a", after=0) as sub:
        assert await sub.take(1) == [a1]
        assert await sub.next_event(timeout=0.2) is None  # live
        b1 = await elog.publish("b", "b1")

        await sub.add_topics("b")
        # b1 is after the cursor, b0 before it.
        assert await sub.take(1) == [b1]
        assert sub.sub.topics == {"a", "b"}

        await sub.remove_topics("a")
        await elog.publish("a", "a2")
        b2 = await elog.publish("b", "b2")
        assert await sub.take(1) == [b2]
        assert await sub.rest() == []

        with pytest.raises(SubscriptionStateError, match="close it instead"):
            await sub.remove_topics("b")

    assert before_cursor.id < a1.id


async def test_add_topics_during_catch_up(elog: SyncFlavor) -> None:
    small = await elog.other(batch_size=2)
    events = [await small.publish("a" if n % 2 else "b", "e", {"n": n}) for n in range(8)]

    async with small.subscribe("a", after=0) as sub:
        first = await sub.take(1)
        await sub.add_topics("b")
        rest = await sub.rest()

    expected = [e for e in events if e.id > first[0].id]
    assert first == [events[1]]
    assert rest == expected


# -- nothing left behind ---------------------------------------------------------------


@pytest.fixture(scope="module")
def isolated_url(database_url: str) -> Iterator[str]:
    """A database of its own, so that counting connections counts only ours."""
    with scratch_database(database_url, "leaks") as url:
        yield url


def eventlog_connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True, application_name="eventlog-test-counter") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name IN ('eventlog', 'eventlog-listener')"
        ).fetchone()
    return row[0] if row else -1


def our_threads(schema: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("eventlog") and schema in t.name]


@pytest.mark.parametrize("flavor", ["sync", "async"])
async def test_nothing_left_after_close(isolated_url: str, flavor: str) -> None:
    schema = f"leaks_{flavor}_{uuid.uuid4().hex[:6]}"
    migrate.upgrade(isolated_url, schema=schema)
    if flavor == "sync":
        log: SyncFlavor = SyncFlavor(eventlog.EventLog(isolated_url, schema=schema, **TEST_OPTIONS).open(), isolated_url)
    else:
        opened = await eventlog.AsyncEventLog(isolated_url, schema=schema, **TEST_OPTIONS).open()
        log = AsyncFlavor(opened, isolated_url)  # type: ignore[arg-type]

    first = log.subscribe("a", after=0)
    second = log.subscribe(["a", "b"], after=0)
    await first.open()
    await second.open()
    event = await log.publish(["a", "b"], "e")
    assert await first.take(1) == [event]
    assert await second.take(1) == [event]
    assert log.log.listener is not None and log.log.listener.connected
    assert our_threads(schema) != []
    assert eventlog_connections(isolated_url) >= 2

    await first.close()
    await second.close()
    await log.close()

    wait_until(lambda: our_threads(schema) == [], what="eventlog threads gone")
    wait_until(lambda: eventlog_connections(isolated_url) == 0, what="eventlog connections gone")
    assert log.log.listener is None
