"""Delivery guarantees of subscriptions: start-up race, rollback, slow subscriber, resume.

Each guarantee that depends on a mechanism (listening before the first read,
ringing every subscription after a listener reconnect) is also run with that
mechanism switched off, to show that the check fails without it. Those checks
set a poll interval of 60 s, so only a doorbell can deliver an event within the
few seconds the test waits.
"""

from __future__ import annotations

import asyncio
import threading
import tracemalloc

import psycopg
import pytest
from helpers import WAIT, SyncCollector, collect_async, delivery_problems, publish_generated, wait_reconnected

import eventlog
from eventlog import AsyncEventLog, EventLog
from eventlog._listener import Listener
from eventlog.errors import DatabaseError

# With the poll interval this high, only a doorbell delivers an event quickly.
NO_POLL = dict(poll_interval=60.0, heartbeat_interval=2.0, heartbeat_timeout=2.0, connect_timeout=5.0)
DOORBELL_WAIT = 20.0  # seconds: a doorbell takes milliseconds, the rest is slack for a loaded machine
# With the doorbell switched off, nothing delivers before the 60 s poll. So any
# shorter wait shows the loss, and a short one keeps the suite quick.
SWITCHED_OFF_WAIT = 4.0


# -- start-up race ---------------------------------------------------------------------


class _LateListen:
    """Switch-off for "listen before the first read": LISTEN starts only after that read.

    Patches `Listener.add` to report LISTEN as ready at once without listening,
    and `listen_now()` then does the real registration, as a subscription that
    listened after its catch-up read would.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.deferred: list[tuple[Listener, object, frozenset[str]]] = []
        real_add = Listener.add

        def add(listener, doorbell, channels, on_ready):
            self.deferred.append((listener, doorbell, frozenset(channels)))
            on_ready()

        self._real_add = real_add
        monkeypatch.setattr(Listener, "add", add)

    def listen_now(self) -> None:
        for listener, doorbell, channels in self.deferred:
            self._real_add(listener, doorbell, channels, lambda: None)
        self.deferred.clear()


def _publish_in_thread(log: EventLog, topic: str, type: str) -> eventlog.Event:
    """Publish from another thread and wait until it committed."""
    published: list[eventlog.Event] = []
    thread = threading.Thread(target=lambda: published.append(log.publish(topic, type)))
    thread.start()
    thread.join(30)
    assert published, "publishing from the helper thread failed"
    return published[0]


@pytest.mark.parametrize("listen_first", [True, False], ids=["listen-first", "switched-off"])
def test_startup_race_sync(database_url, schema, monkeypatch, listen_first):
    late = None if listen_first else _LateListen(monkeypatch)
    window: list[eventlog.Event] = []

    with EventLog(database_url, schema=schema, **NO_POLL) as log:
        real_read = log._read_batch

        def read_then_publish(read):
            events = real_read(read)
            if not window:
                # Commit an event after the first read returned and before the
                # subscription takes that result and goes live.
                window.append(_publish_in_thread(log, "startup", "in-window"))
                if late is not None:
                    late.listen_now()
            return events

        monkeypatch.setattr(log, "_read_batch", read_then_publish)
        with log.subscribe("startup") as sub:
            first = sub.next_event(timeout=DOORBELL_WAIT if listen_first else SWITCHED_OFF_WAIT)
            if not listen_first:
                assert window, "the hook did not publish"
                assert first is None, "without listening first, the in-window event must wait for the poll"
                return
            after = log.publish("startup", "after")
            second = sub.next_event(timeout=DOORBELL_WAIT)

    assert first is not None, "the event committed between the catch-up read and going live was not delivered"
    assert second is not None
    assert delivery_problems([first.id, second.id], [window[0].id, after.id]) == []


@pytest.mark.parametrize("listen_first", [True, False], ids=["listen-first", "switched-off"])
async def test_startup_race_async(database_url, schema, log, monkeypatch, listen_first):
    late = None if listen_first else _LateListen(monkeypatch)
    window: list[eventlog.Event] = []

    async with AsyncEventLog(database_url, schema=schema, **NO_POLL) as alog:
        real_read = alog._read_batch

        async def read_then_publish(read):
            events = await real_read(read)
            if not window:
                window.append(await asyncio.to_thread(log.publish, "startup", "in-window"))
                if late is not None:
                    late.listen_now()
            return events

        monkeypatch.setattr(alog, "_read_batch", read_then_publish)
        async with alog.subscribe("startup") as sub:
            first = await sub.next_event(timeout=DOORBELL_WAIT if listen_first else SWITCHED_OFF_WAIT)
            if not listen_first:
                assert window, "the hook did not publish"
                assert first is None, "without listening first, the in-window event must wait for the poll"
                return
            after = await alog.publish("startup", "after")
            second = await sub.next_event(timeout=DOORBELL_WAIT)

    assert first is not None, "the event committed between the catch-up read and going live was not delivered"
    assert second is not None
    assert delivery_problems([first.id, second.id], [window[0].id, after.id]) == []


def test_startup_race_during_catch_up(database_url, schema, monkeypatch):
    """An event committed between two catch-up batches comes once, after the backlog."""
    with EventLog(database_url, schema=schema, batch_size=10, **NO_POLL) as log:
        backlog = log.publish_many([("catchup", "old", {"n": n}) for n in range(25)])
        real_read = log._read_batch
        window: list[eventlog.Event] = []

        def read_then_publish(read):
            events = real_read(read)
            if not window:
                window.append(_publish_in_thread(log, "catchup", "in-window"))
            return events

        monkeypatch.setattr(log, "_read_batch", read_then_publish)
        with log.subscribe("catchup", after=0) as sub:
            got = [sub.next_event(timeout=DOORBELL_WAIT) for _ in range(26)]
            end = log.publish("catchup", "end")
            got.append(sub.next_event(timeout=DOORBELL_WAIT))

    assert None not in got
    assert delivery_problems([e.id for e in got], [e.id for e in [*backlog, window[0], end]]) == []


# -- reconnect ring ---------------------------------------------------------------------


@pytest.mark.parametrize("ring_all", [True, False], ids=["ring-all", "switched-off"])
def test_reconnect_rings_every_subscription(database_url, schema, admin, monkeypatch, ring_all):
    """An event committed while the listener is away is delivered by the ring after reconnect."""
    with EventLog(database_url, schema=schema, **NO_POLL) as log, log.subscribe("gap") as sub:
        assert sub.next_event(timeout=0) is None  # caught up and live
        listener = log.listener
        assert listener is not None
        if not ring_all:
            monkeypatch.setattr(listener, "ring_all", lambda: None)

        # Publish in the gap for certain: from the listener thread itself, after
        # it lost its connection and before it connects again.
        in_gap: list[eventlog.Event] = []
        real_connect = listener._connect

        def publish_then_connect():
            if not in_gap:
                in_gap.append(log.publish("gap", "in-gap"))
            return real_connect()

        monkeypatch.setattr(listener, "_connect", publish_then_connect)
        old_pid = listener.backend_pid
        admin.execute("SELECT pg_terminate_backend(%s)", [old_pid])
        wait_reconnected(listener, old_pid)

        event = sub.next_event(timeout=DOORBELL_WAIT if ring_all else SWITCHED_OFF_WAIT)
        if not ring_all:
            assert in_gap, "nothing was published in the gap"
            assert event is None, "without the ring after reconnect, the gap event must wait for the poll"
            return

    assert event is not None, "the event published while the listener was away was not delivered"
    assert event.id == in_gap[0].id


# -- rollback ------------------------------------------------------------------------------


class _Boom(Exception):
    pass


def test_rollback_never_delivered(log, schema):
    with log.connection() as conn:
        # A deferred constraint is checked at COMMIT, after the events were
        # written, so it makes a transaction fail once its events have ids.
        conn.execute(
            f'CREATE TABLE "{schema}".app_orders (id int, '
            "CONSTRAINT app_orders_id_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
        )

    with log.subscribe("orders") as sub:
        assert sub.next_event(timeout=0) is None
        committed = [log.publish("orders", "committed", {"n": 1})]

        # 1. an exception inside the block: nothing is written
        with pytest.raises(_Boom), log.transaction() as tx:
            tx.publish("orders", "doomed", {"case": "exception"})
            raise _Boom

        # 2. the commit fails after the event was inserted (id taken, NOTIFY queued)
        with pytest.raises(DatabaseError), log.transaction() as failing:
            failing.connection.execute(f'INSERT INTO "{schema}".app_orders VALUES (1), (1)')
            failing.publish("orders", "doomed", {"case": "commit failed"})

        # 3. the SQL function inside a transaction that the caller rolls back
        with log.connection() as conn, conn.transaction():
            conn.execute(f"""SELECT * FROM "{schema}".publish_v1(ARRAY['orders'], 'doomed', '{{}}', '{{}}')""")
            raise psycopg.Rollback

        committed.append(log.publish("orders", "committed", {"n": 2}))
        committed.append(log.publish("orders", "end"))
        delivered = []
        while (event := sub.next_event(timeout=30)) is not None:
            delivered.append(event)
            if event.type == "end":
                break

    assert [e.type for e in delivered] == ["committed", "committed", "end"]
    assert delivery_problems([e.id for e in delivered], [e.id for e in committed]) == []
    assert [e.id for e in log.replay()] == [e.id for e in committed]
    # Cases 2 and 3 inserted one event each before rolling back: their ids are
    # holes between the committed events, and no reader waited for them.
    assert committed[1].id == committed[0].id + 3


# -- slow subscriber -------------------------------------------------------------------------

SLOW_TOTAL = 50_000
SLOW_PUBLISH_BATCH = 1_000
SLOW_BATCH_SIZE = 500
# Bound on the traced heap growth (tracemalloc peak minus the level before the
# flow) while 50,000 events pass a stalled subscription. In flight: one batch of
# 500 events in each of the two reading subscriptions and in their driver
# buffers, and the ids they collect (8 bytes each). The publisher builds its
# events on the server, so it adds nothing. Measured at 2.3 MiB. A decoded
# event of this test takes about 1.35 KB, so a subscription (or listener) that
# queued the flow for the stalled one would add about 65 MiB.
SLOW_MEMORY_BOUND = 16 * 1024 * 1024


@pytest.mark.slow
def test_slow_subscriber(database_url, schema):
    with EventLog(
        database_url, schema=schema, batch_size=SLOW_BATCH_SIZE, poll_interval=2.0,
        heartbeat_interval=2.0, heartbeat_timeout=2.0, connect_timeout=10.0,
    ) as log:
        backlog = log.publish_many([("flow", "old", {"n": n}) for n in range(SLOW_BATCH_SIZE * 2)])

        slow = log.subscribe("flow", after=0).open()
        largest_batch = 0
        real_accept = slow._core.accept

        def accept(read, events):
            nonlocal largest_batch
            real_accept(read, events)
            largest_batch = max(largest_batch, len(slow._core._batch))

        slow._core.accept = accept
        first = slow.next_event(timeout=30)
        assert first is not None
        assert first.id == backlog[0].id
        stalled_at = slow.cursor  # the rest of its first batch is in hand, and it stops reading

        # The publisher builds the events on the server and the collectors keep
        # bare ids, so that the traced heap shows the library's own memory.
        fast = [
            SyncCollector(log.subscribe("flow", after=0).open(), keep_events=False).start()
            for _ in range(2)
        ]
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            with log.connection() as conn:
                for _ in range(SLOW_TOTAL // SLOW_PUBLISH_BATCH):
                    publish_generated(conn, schema, "flow", "new", SLOW_PUBLISH_BATCH)
            log.publish("flow", "end")
            for collector in fast:
                collector.join(timeout=240)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()

        with log.connection() as conn:
            expected = conn.execute(f'SELECT array_agg(id ORDER BY id) FROM "{schema}".events').fetchone()[0]
        assert len(expected) == len(backlog) + SLOW_TOTAL + 1
        for collector in fast:
            assert delivery_problems(collector.ids, expected) == []
            collector.subscription.close()
        # The others finished while the slow one held still, with one batch in hand.
        assert slow.cursor == stalled_at
        assert len(slow._core._batch) <= SLOW_BATCH_SIZE
        assert peak < SLOW_MEMORY_BOUND, f"traced heap grew by {peak / 2**20:.1f} MiB"

        rest = SyncCollector(slow, timeout=240, keep_events=False).start()
        rest.join(timeout=300)
        slow.close()

    assert delivery_problems([first.id, *rest.ids], expected) == []
    assert largest_batch <= SLOW_BATCH_SIZE


class _CountingLoop:
    """Forwards `call_soon_threadsafe` to a loop and counts the calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls = 0

    def call_soon_threadsafe(self, callback, *args):
        self.calls += 1
        return self.loop.call_soon_threadsafe(callback, *args)


async def test_async_doorbell_queues_one_wakeup(alog):
    """Doorbells rung while the event loop is blocked queue one callback, not one each."""
    async with alog.subscribe("blocked") as sub:
        bell = sub._bell
        counting = _CountingLoop(bell.loop)
        bell.loop = counting

        # join() blocks the event loop while the other thread rings.
        ringer = threading.Thread(target=lambda: [bell.ring() for _ in range(1_000)])
        ringer.start()
        ringer.join(WAIT)
        assert counting.calls == 1

        await asyncio.wait_for(bell.event.wait(), WAIT)
        bell.event.clear()
        ringer = threading.Thread(target=bell.ring)
        ringer.start()
        ringer.join(WAIT)
        assert counting.calls == 2
        await asyncio.wait_for(bell.event.wait(), WAIT)


# -- resume -------------------------------------------------------------------------------


def test_resume_sync(log):
    events = log.publish_many([(["resume", f"resume:{n % 2}"], "before", {"n": n}) for n in range(30)])
    log.publish("other", "noise")
    with log.subscribe("resume:0", after=0) as sub:
        seen = [sub.next_event(timeout=30) for _ in range(5)]
    assert None not in seen
    stopped_at = seen[-1].id

    while_away = log.publish_many([(["resume", f"resume:{n % 2}"], "away", {"n": n}) for n in range(10)])
    end = log.publish(["resume:0"], "end")
    with log.subscribe("resume:0", after=stopped_at) as sub:
        rest = SyncCollector(sub).start().join()

    expected = [e.id for e in [*events, *while_away, end] if "resume:0" in e.topics and e.id > stopped_at]
    assert delivery_problems([e.id for e in rest], expected) == []
    assert any(e.type == "away" for e in rest)


async def test_resume_async(alog):
    events = await alog.publish_many([("resume", "before", {"n": n}) for n in range(12)])
    async with alog.subscribe("resume", after=0) as sub:
        seen = [await sub.next_event(timeout=30) for _ in range(4)]
    assert None not in seen
    stopped_at = sub.cursor
    assert stopped_at == seen[-1].id

    while_away = await alog.publish_many([("resume", "away", {"n": n}) for n in range(5)])
    end = await alog.publish("resume", "end")
    async with alog.subscribe("resume", after=stopped_at) as sub:
        rest = await collect_async(sub)

    expected = [e.id for e in [*events, *while_away, end] if e.id > stopped_at]
    assert delivery_problems([e.id for e in rest], expected) == []
