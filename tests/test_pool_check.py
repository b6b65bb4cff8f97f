"""Pooled connections that the server ended are replaced before they are used."""

from __future__ import annotations

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
