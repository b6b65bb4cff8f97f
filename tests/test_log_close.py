"""Closing a log closes its open subscriptions and stops the shared listener."""

from __future__ import annotations

import threading

import eventlog
from helpers import wait_until


def _listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("eventlog-listener")]


def test_close_log_closes_subscriptions(log):
    subscription = log.subscribe("a", after=0).open()
    assert log.listener is not None

    log.close()

    assert subscription.state is eventlog.SubscriptionState.CLOSED
    assert log.listener is None
    wait_until(lambda: not _listener_threads(), timeout=10, what="listener thread to stop")


async def test_close_async_log_closes_subscriptions(alog):
    subscription = await alog.subscribe("a", after=0).open()
    assert alog.listener is not None

    await alog.close()

    assert subscription.state is eventlog.SubscriptionState.CLOSED
    assert alog.listener is None
