"""The listener under real faults: terminated backends, idle_session_timeout, a
server restart, and a half-open connection behind a proxy.

Where a test must show that LISTEN is in effect again after a reconnect, the
log's poll interval is 60 s. The test also checks that the listener did not
reconnect meanwhile, so nothing but a doorbell can deliver an event within the
test's wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import psycopg
import pytest
from helpers import (
    WAIT,
    SyncCollector,
    TcpProxy,
    collect_async,
    delivery_problems,
    expected_for,
    stays_true,
    url_host_port,
    url_with,
    wait_reconnected,
    wait_until,
)
from psycopg import sql

import eventlog
from eventlog import AsyncEventLog, EventLog
from eventlog._listener import Listener
from eventlog._settings import Settings
from eventlog.errors import ConnectionFailed

NO_POLL = 60.0  # seconds: only a doorbell delivers an event sooner
DOORBELL_WAIT = 20.0  # seconds: a doorbell takes milliseconds, the rest is slack for a loaded machine
ADMIN_COMMAND = "terminating connection due to administrator command"


def _lost_warnings(caplog: pytest.LogCaptureFixture, schema: str) -> list[str]:
    """Messages of the WARNING records that the listener of `schema` logged on losing its connection."""
    # The thread name carries the schema, which sets this test's listener apart from any other.
    thread = f"eventlog-listener-{schema}"
    return [
        r.getMessage() for r in caplog.records
        if r.threadName == thread and r.levelno == logging.WARNING and "connection lost" in r.getMessage()
    ]


class _Counter:
    """A counter that threads can wait on."""

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self.value += 1
            self._cond.notify_all()

    def wait_for(self, target: int, timeout: float = WAIT) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.value >= target, timeout):
                raise AssertionError(f"counter at {self.value}, waited for {target}")


# -- listener loss ------------------------------------------------------------------------

LOSS_EVENTS = 2_000
LOSS_KILLS = 20
LOSS_TOPICS = (["loss:a"], ["loss:b"], ["loss:a", "loss:b"])


async def test_listener_loss(log, alog, admin, caplog):
    caplog.set_level(logging.INFO, logger="eventlog")
    subscriptions = {
        "sync a": log.subscribe(["loss:a"], after=0).open(),
        "sync a+b": log.subscribe(["loss:a", "loss:b"], after=0).open(),
        "async b": await alog.subscribe(["loss:b"], after=0).open(),
        "async a+b": await alog.subscribe(["loss:a", "loss:b"], after=0).open(),
    }
    listener = log.listener
    assert listener is not None and listener is alog.listener  # one listener per process and log

    sync_collectors = {
        name: SyncCollector(sub).start()
        for name, sub in subscriptions.items() if isinstance(sub, eventlog.Subscription)
    }
    async_tasks = {
        name: asyncio.create_task(collect_async(sub))
        for name, sub in subscriptions.items() if isinstance(sub, eventlog.AsyncSubscription)
    }

    published: list[eventlog.Event] = []
    publish_count, kill_count = _Counter(), _Counter()
    block = LOSS_EVENTS // LOSS_KILLS

    def publish() -> None:
        for n in range(LOSS_EVENTS):
            published.append(log.publish(LOSS_TOPICS[n % 3], "loss", {"n": n}))
            publish_count.add()
            if (n + 1) % block == 0:
                # Keep the stream going until this block's kill was issued, so
                # that every kill lands mid-stream.
                kill_count.wait_for((n + 1) // block)
        published.append(log.publish(["loss:a", "loss:b"], "end"))

    def kill() -> None:
        for k in range(LOSS_KILLS):
            publish_count.wait_for(k * block + block // 2)
            wait_until(lambda: listener.connected, what="listener connected")
            old_pid = listener.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s)", [old_pid])
            kill_count.add()
            wait_reconnected(listener, old_pid)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    await asyncio.to_thread(kill)
    await asyncio.to_thread(publisher.join, WAIT)
    assert not publisher.is_alive()
    assert len(published) == LOSS_EVENTS + 1

    delivered = {name: await asyncio.wait_for(task, 120) for name, task in async_tasks.items()}
    for name, collector in sync_collectors.items():
        delivered[name] = await asyncio.to_thread(collector.join)
    connections = listener.connections
    for sub in subscriptions.values():
        if isinstance(sub, eventlog.AsyncSubscription):
            await sub.close()
        else:
            sub.close()

    for name, sub in subscriptions.items():
        problems = delivery_problems([e.id for e in delivered[name]], expected_for(published, sub.topics))
        assert problems == [], f"subscription {name}: {problems}"
    # Every reconnect is logged at WARNING with the server's reason.
    lost = _lost_warnings(caplog, log.schema)
    assert len(lost) == connections - 1
    assert sum(ADMIN_COMMAND in message for message in lost) == LOSS_KILLS


def test_listener_survives_unexpected_error(database_url, schema, monkeypatch, caplog):
    """An exception in the listener thread costs a reconnect, not the thread."""
    with EventLog(
        database_url, schema=schema, poll_interval=NO_POLL, heartbeat_interval=2.0, heartbeat_timeout=2.0,
        reconnect_initial_delay=0.05, connect_timeout=5.0,
    ) as log, log.subscribe("odd") as sub:
        assert sub.next_event(timeout=0) is None
        listener = log.listener
        real_dispatch = listener._dispatch
        raised: list[RuntimeError] = []

        def dispatch_failing_once(channels):
            if not raised:
                raised.append(RuntimeError("a doorbell raised"))
                raise raised[0]
            real_dispatch(channels)

        monkeypatch.setattr(listener, "_dispatch", dispatch_failing_once)
        first = log.publish("odd", "first")
        delivered = sub.next_event(timeout=DOORBELL_WAIT)  # by the ring after the reconnect
        assert delivered is not None
        assert delivered.id == first.id

        wait_until(lambda: listener.connected, what="listener connected")
        connections = listener.connections
        second = log.publish("odd", "second")
        delivered = sub.next_event(timeout=DOORBELL_WAIT)
        assert delivered is not None
        assert delivered.id == second.id
        assert listener.connections == connections == 2

    assert any("listener failed unexpectedly" in r.getMessage() for r in caplog.records)


def _head_fails(*args):
    raise ConnectionFailed("database connection failed: simulated outage")


def test_failed_open_releases_listener(log, monkeypatch):
    monkeypatch.setattr(log, "head", _head_fails)
    with pytest.raises(ConnectionFailed):
        log.subscribe("outage").open()
    assert log.listener is None


async def test_failed_open_releases_listener_async(alog, monkeypatch):
    async def head_fails():
        _head_fails()

    monkeypatch.setattr(alog, "head", head_fails)
    with pytest.raises(ConnectionFailed):
        await alog.subscribe("outage").open()
    assert alog.listener is None


# -- idle_session_timeout ---------------------------------------------------------------------


@pytest.fixture
def timeout_role(admin, schema, database_url):
    """Make a login role that may read the log, with its own idle_session_timeout."""
    if admin.info.server_version < 140000:
        pytest.skip("idle_session_timeout needs PostgreSQL 14 or later")
    created: list[str] = []

    def make(idle_session_timeout: str) -> tuple[str, str]:
        name = f"evl_idle_{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        role = sql.Identifier(name)
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
        created.append(name)
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), role))
        admin.execute(sql.SQL("GRANT SELECT ON {}.events TO {}").format(sql.Identifier(schema), role))
        admin.execute(
            sql.SQL("ALTER ROLE {} SET idle_session_timeout = {}").format(role, sql.Literal(idle_session_timeout))
        )
        return name, url_with(database_url, user=name, password=password)

    yield make
    for name in created:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [name])
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_idle_session_timeout_ends_listener(log, schema, admin, timeout_role, caplog):
    """The server ends the listener's idle session; the reconnect listens on every topic again."""
    role, role_url = timeout_role("1s")
    topics = ["idle:a", "idle:b", "idle:c"]
    with EventLog(
        role_url, schema=schema, poll_interval=NO_POLL, heartbeat_interval=30.0, heartbeat_timeout=5.0,
        reconnect_initial_delay=0.05, reconnect_max_delay=0.5, connect_timeout=5.0,
    ) as role_log, role_log.subscribe(topics) as sub:
        assert sub.next_event(timeout=0) is None
        listener = role_log.listener
        wait_until(lambda: listener.connections >= 2, what="the server ending the idle listener session")
        assert any("idle-session timeout" in message for message in _lost_warnings(caplog, schema))

        # Let the next session live: sessions that start after the RESET have no
        # timeout, and the one we end below was seen alive after it.
        admin.execute(sql.SQL("ALTER ROLE {} RESET idle_session_timeout").format(sql.Identifier(role)))
        wait_until(lambda: listener.connected, what="listener connected")
        old_pid = listener.backend_pid
        admin.execute("SELECT pg_terminate_backend(%s)", [old_pid])
        wait_reconnected(listener, old_pid)
        connections = listener.connections

        for topic in topics:
            published = log.publish(topic, "after-reconnect")
            delivered = sub.next_event(timeout=DOORBELL_WAIT)
            assert delivered is not None, f"no doorbell for {topic}"
            assert delivered.id == published.id
        # No reconnect meanwhile, whose ring would have delivered without LISTEN.
        assert listener.connections == connections


@pytest.mark.slow
def test_heartbeat_keeps_idle_session_alive(log, schema, timeout_role, caplog):
    """A steady stream of notifications must not starve the heartbeat.

    Notifications that arrive do not count as activity for the server's
    idle_session_timeout. Only a query from the listener does.
    """
    _, role_url = timeout_role("3s")
    stop = threading.Event()
    published: list[eventlog.Event] = []

    def publish() -> None:
        # One event every 50 ms for 9 s, three times the session timeout.
        for n in range(180):
            if stop.wait(0.05):
                return
            published.append(log.publish("steady", "tick", {"n": n}))
        published.append(log.publish("steady", "end"))

    with EventLog(
        role_url, schema=schema, poll_interval=NO_POLL, heartbeat_interval=0.5, heartbeat_timeout=5.0,
        reconnect_initial_delay=0.05, reconnect_max_delay=0.5, connect_timeout=5.0,
    ) as role_log, role_log.subscribe("steady") as sub:
        assert sub.next_event(timeout=0) is None
        listener = role_log.listener
        collector = SyncCollector(sub).start()
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        try:
            delivered = collector.join(timeout=120)
        finally:
            stop.set()
            publisher.join(WAIT)
        connections = listener.connections

    assert delivery_problems([e.id for e in delivered], [e.id for e in published]) == []
    assert not [m for m in _lost_warnings(caplog, schema) if "idle-session" in m]
    assert connections == 1, f"the listener reconnected: {_lost_warnings(caplog, schema)}"


# -- server restart --------------------------------------------------------------------------

RESTART_EVENTS = 300
RESTART_AT = 100
RESTART_TOPICS = ["restart:a", "restart:b", "restart:c"]


async def test_server_restart(local_server, database_url, schema, caplog):
    options = dict(
        poll_interval=NO_POLL, heartbeat_interval=2.0, heartbeat_timeout=2.0, connect_timeout=5.0,
        reconnect_initial_delay=0.05, reconnect_max_delay=0.5,
    )
    with EventLog(database_url, schema=schema, **options) as log:
        async with AsyncEventLog(database_url, schema=schema, **options) as alog:
            sync_all = log.subscribe(RESTART_TOPICS, after=0).open()
            sync_b = log.subscribe(["restart:b"], after=0).open()
            async_all = await alog.subscribe(RESTART_TOPICS, after=0).open()
            listener = log.listener
            collectors = [SyncCollector(sync_all).start(), SyncCollector(sync_b).start()]
            async_task = asyncio.create_task(collect_async(async_all))

            count = _Counter()
            retries = _Counter()

            def publish_retrying(topics, type, data=None):
                while True:
                    try:
                        return log.publish(topics, type, data)
                    except ConnectionFailed:
                        retries.add()  # the server is restarting: try again
                        if retries.value > 10_000:
                            raise

            def publish() -> None:
                for n in range(RESTART_EVENTS):
                    publish_retrying(RESTART_TOPICS[n % 3], "restart", {"n": n})
                    count.add()
                    time.sleep(0.005)  # pacing, so that the stream spans the restart

            publisher = threading.Thread(target=publish, daemon=True)
            publisher.start()
            await asyncio.to_thread(count.wait_for, RESTART_AT)
            old_pid = listener.backend_pid
            await asyncio.to_thread(local_server.restart)
            published_by_restart = count.value
            await asyncio.to_thread(wait_reconnected, listener, old_pid)
            await asyncio.to_thread(publisher.join, WAIT)
            assert not publisher.is_alive()
            await asyncio.to_thread(publish_retrying, RESTART_TOPICS, "end")

            delivered = [await asyncio.to_thread(c.join, 120) for c in collectors]
            delivered.append(await asyncio.wait_for(async_task, 120))
            with log.connection() as conn:
                stored = conn.execute(
                    sql.SQL("SELECT id, topics FROM {}.events ORDER BY id").format(sql.Identifier(schema))
                ).fetchall()

            for sub, events in zip([sync_all, sync_b, async_all], delivered):
                expected = [i for i, topics in stored if set(topics) & sub.topics]
                problems = delivery_problems([e.id for e in events], expected)
                assert problems == [], f"{sub!r}: {problems}"

            # LISTEN is in effect for every topic again: each event comes by doorbell.
            connections = listener.connections
            for topic in RESTART_TOPICS:
                published = log.publish(topic, "after-restart")
                for sub in (sync_all, async_all):
                    if isinstance(sub, eventlog.AsyncSubscription):
                        event = await sub.next_event(timeout=DOORBELL_WAIT)
                    else:
                        event = await asyncio.to_thread(sub.next_event, DOORBELL_WAIT)
                    assert event is not None, f"no doorbell for {topic} in {sub!r}"
                    assert event.id == published.id
            assert listener.connections == connections

            sync_all.close()
            sync_b.close()
            await async_all.close()

    # The restart fell inside the stream. The publisher need not have seen an error,
    # because the pool waits for the server to come back and replaces dead connections.
    assert published_by_restart < RESTART_EVENTS, "the stream ended before the restart"
    assert any(ADMIN_COMMAND in message for message in _lost_warnings(caplog, schema))


# -- half-open connection and heartbeat ------------------------------------------------------

CHANNEL = "eventlog_test:half-open"
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 1.0


class _CountingBell:
    def __init__(self) -> None:
        self.rings = 0

    def ring(self) -> None:
        self.rings += 1


def _notify_reaches(admin: psycopg.Connection, bell: _CountingBell) -> None:
    before = bell.rings
    admin.execute(sql.SQL("NOTIFY {}").format(sql.Identifier(CHANNEL)))
    wait_until(lambda: bell.rings > before, what="doorbell for NOTIFY")


@pytest.mark.parametrize("heartbeat", [True, False], ids=["heartbeat", "switched-off"])
def test_heartbeat_half_open_connection(database_url, admin, caplog, heartbeat):
    host, port = url_host_port(database_url)
    with TcpProxy(host, port) as proxy:
        settings = Settings(
            database_url=proxy.url_for(database_url),
            heartbeat_interval=HEARTBEAT_INTERVAL if heartbeat else 3600.0,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            connect_timeout=2.0,
            reconnect_initial_delay=0.05,
            reconnect_max_delay=0.5,
        )
        listener = Listener(settings.conninfo(), settings)
        bell = _CountingBell()
        ready = threading.Event()
        listener.start()
        try:
            listener.add(bell, [CHANNEL], ready.set)
            assert ready.wait(WAIT), "LISTEN not in effect"
            _notify_reaches(admin, bell)

            # Frozen: both sockets stay open and silent, as behind a dead router.
            proxy.freeze()
            if not heartbeat:
                # Without the heartbeat nothing notices, because the kernel's
                # keepalives and tcp_user_timeout end at the proxy, which is alive.
                assert stays_true(lambda: listener.connected, 4.0)
                return
            took = wait_until(
                lambda: not listener.connected,
                timeout=HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT + 15.0,
                what="the heartbeat declaring the frozen connection dead",
            )
            assert any("heartbeat got no answer" in m for m in _lost_warnings(caplog, settings.schema_name)), took
            rings = bell.rings
            proxy.unfreeze()
            wait_reconnected(listener, None)  # the dead connection's pid is already cleared
            wait_until(lambda: bell.rings > rings, what="ring after reconnect")
            _notify_reaches(admin, bell)

            # Cut: both sides closed.
            old_pid = listener.backend_pid
            rings = bell.rings
            proxy.cut()
            wait_reconnected(listener, old_pid)
            wait_until(lambda: bell.rings > rings, what="ring after reconnect")
            _notify_reaches(admin, bell)
            assert listener.connections == 3
        finally:
            listener.stop()
