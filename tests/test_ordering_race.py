"""Ordering race: concurrent publishers must never make a reader skip an event.

Sixteen publishers write in concurrent transactions while three live
subscriptions and one `replay` reader follow the log. Each reader must see
exactly the committed ids, ascending, each once (design.md, invariant 1).
Transactions alternate between several events through `log.transaction()`
(publish_batch_v1 at COMMIT) and one event through `log.publish` (the library's
own publish statement), so both ways of writing take part.

Commit latency is what opens the race: an id is taken at INSERT, but becomes
visible only at COMMIT. `log.transaction()` writes its events right before
COMMIT, so a sleep inside the block falls before the INSERT. The test therefore
adds the latency on the server: a deferred trigger sleeps 0-20 ms at COMMIT,
after the INSERT and while the ordering lock is held. The block also sleeps
0-20 ms, for the application's own work in its transaction.

The same race with the ordering lock made a no-op (ordering_lock_v1, which every
publisher calls) must make some reader skip an event, which shows that the check
can fail.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest
from helpers import WAIT, SyncCollector, delivery_problems
from psycopg import sql

from eventlog import EventLog
from eventlog._sql import publish_statement

PUBLISHERS = 16
TOPICS = ("race:0", "race:1", "race:2")
PUBLISH_FUNCTIONS = (
    "publish_v1(text[], text, jsonb, jsonb)",
    "publish_batch_v1(jsonb, text[], jsonb[], jsonb[])",
)
LOCK_FUNCTION = "ordering_lock_v1()"


def _definitions(conn: psycopg.Connection, schema: str, signatures: tuple[str, ...]) -> dict[str, str]:
    return {
        signature: conn.execute(
            "SELECT pg_get_functiondef(%s::regprocedure)", [f'"{schema}".{signature}']
        ).fetchone()[0]
        for signature in signatures
    }


def _assert_publishers_take_lock(conn: psycopg.Connection, schema: str) -> None:
    """Every way of publishing goes through ordering_lock_v1, which takes the advisory lock."""
    for signature, definition in _definitions(conn, schema, PUBLISH_FUNCTIONS).items():
        assert f"{schema}.ordering_lock_v1()" in definition, signature
    assert "ordering_lock_v1()" in publish_statement(schema, 1)
    assert "pg_advisory_xact_lock" in _definitions(conn, schema, (LOCK_FUNCTION,))[LOCK_FUNCTION]


def _strip_ordering_lock(conn: psycopg.Connection, schema: str) -> None:
    """Test-only switch: make the ordering lock of `schema` a no-op, for every publisher."""
    _assert_publishers_take_lock(conn, schema)
    conn.execute(
        sql.SQL("CREATE OR REPLACE FUNCTION {}.ordering_lock_v1() RETURNS void LANGUAGE sql AS 'SELECT NULL::void'")
        .format(sql.Identifier(schema))
    )
    assert "pg_advisory_xact_lock" not in _definitions(conn, schema, (LOCK_FUNCTION,))[LOCK_FUNCTION]


def _add_commit_latency(conn: psycopg.Connection, schema: str) -> None:
    """Make every transaction that writes events sleep 0-20 ms at COMMIT, after its INSERT."""
    ident = sql.Identifier(schema)
    conn.execute(sql.SQL("""
        CREATE FUNCTION {}.test_commit_latency() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            -- once per transaction, not once per row
            IF current_setting('eventlog_test.slept', true) IS DISTINCT FROM 'yes' THEN
                PERFORM set_config('eventlog_test.slept', 'yes', true);
                PERFORM pg_sleep(random() * 0.02);
            END IF;
            RETURN NULL;
        END
        $fn$""").format(ident))
    conn.execute(sql.SQL("""
        CREATE CONSTRAINT TRIGGER test_commit_latency AFTER INSERT ON {}.events
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}.test_commit_latency()
        """).format(ident, ident))


@dataclass
class RaceResult:
    committed: list[int]
    seen: dict[str, list[int]] = field(default_factory=dict)

    def problems(self) -> dict[str, list[str]]:
        found = {name: delivery_problems(ids, self.committed) for name, ids in self.seen.items()}
        return {name: problems for name, problems in found.items() if problems}


def _transaction_sizes(events: int, per_transaction: int) -> list[int]:
    """Split `events` into transactions that alternate between `per_transaction` events and one."""
    sizes: list[int] = []
    while (left := events - sum(sizes)) > 0:
        sizes.append(min(left, 1 if len(sizes) % 2 else per_transaction))
    return sizes


def _race(log: EventLog, events: int, per_transaction: int) -> RaceResult:
    """Publish `events` from PUBLISHERS threads while four readers follow; return what each saw."""
    start = log.head()
    subscriptions = {
        "subscription race": log.subscribe(["race"], after=start),
        "subscription race:0..2": log.subscribe(list(TOPICS), after=start),
        "subscription race+race:0": log.subscribe(["race", "race:0"], after=start),
    }
    collectors = {name: SyncCollector(sub.open(), timeout=180).start() for name, sub in subscriptions.items()}

    replayed: list[int] = []

    def replay() -> None:
        cursor = start
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for event in log.replay(after=cursor, page_size=100):
                replayed.append(event.id)
                cursor = event.id
                if event.type == "end":
                    return
            time.sleep(0.002)  # pacing between passes, to leave CPU to the publishers

    reader = threading.Thread(target=replay, daemon=True)
    reader.start()

    transactions = iter(enumerate(_transaction_sizes(events, per_transaction)))
    take = threading.Lock()
    published: list[int] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(PUBLISHERS)

    def publish(publisher: int) -> None:
        rng = random.Random(publisher)
        topics = ["race", TOPICS[publisher % len(TOPICS)]]
        try:
            barrier.wait(WAIT)  # all start together
            while True:
                with take:
                    number, size = next(transactions, (None, 0))
                if number is None:
                    return
                if size == 1:
                    # One event in its own transaction: EventLog.publish's statement.
                    ids = [log.publish(topics, "race", {"publisher": publisher, "transaction": number}).id]
                else:
                    # Several events in one transaction, through publish_batch_v1 at commit.
                    with log.transaction() as tx:
                        for k in range(size):
                            tx.publish(topics, "race", {"publisher": publisher, "transaction": number, "k": k})
                        time.sleep(rng.uniform(0, 0.02))  # the application's work in its transaction
                    ids = [event.id for event in tx.events]
                with take:
                    published.extend(ids)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=publish, args=(p,), daemon=True) for p in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not failures, failures
    assert len(published) == events, "a publisher lost events"
    end = log.publish(["race", *TOPICS], "end")

    result = RaceResult(committed=sorted([*published, end.id]))
    for name, collector in collectors.items():
        collector.join(timeout=WAIT)
        collector.subscription.close()
        result.seen[name] = collector.ids
    reader.join(WAIT)
    assert not reader.is_alive(), "the replay reader did not reach the end event"
    result.seen["replay"] = replayed
    return result


def _race_log(database_url: str, schema: str) -> EventLog:
    return EventLog(
        database_url, schema=schema, pool_min_size=4, pool_max_size=PUBLISHERS + 8,
        poll_interval=2.0, heartbeat_interval=5.0, heartbeat_timeout=5.0, connect_timeout=30.0,
    )


@pytest.mark.slow
def test_ordering_race(database_url, schema):
    with psycopg.connect(database_url, autocommit=True) as conn:
        _assert_publishers_take_lock(conn, schema)
        _add_commit_latency(conn, schema)
    with _race_log(database_url, schema) as log:
        result = _race(log, events=5_000, per_transaction=8)

    assert len(result.committed) == 5_001
    assert result.problems() == {}


NO_LOCK_ROUNDS = 5
NO_LOCK_EVENTS = 1_000


def test_ordering_race_without_lock(database_url, schema):
    """Without the advisory lock some reader skips an event, and the check reports it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        _strip_ordering_lock(conn, schema)
        _add_commit_latency(conn, schema)

    detected: dict[str, list[str]] = {}
    with _race_log(database_url, schema) as log:
        for round in range(1, NO_LOCK_ROUNDS + 1):
            detected = _race(log, events=NO_LOCK_EVENTS, per_transaction=4).problems()
            if detected:
                break

    assert detected, f"no reader skipped an event in {NO_LOCK_ROUNDS} rounds without the lock"
    assert all(any(p.startswith("missing") for p in problems) for problems in detected.values())
    print(f"without the lock, round {round}: {detected}")
