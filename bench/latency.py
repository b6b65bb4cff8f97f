"""Benchmark 3: latency from the publish call to the subscriber, at a steady rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from eventlog import EventLog, channel_for

from .common import (
    Comparison,
    Section,
    Table,
    drop_schema,
    encode_json,
    new_schema,
    percentile,
    plural,
    raw_publish_statement,
)

TOPIC = "shop:inventory"
EVENT_TYPE = "stock_changed"
TARGET_P99 = 3.0
RECEIVE_TIMEOUT = 30.0  # seconds to wait for the last event after the publisher is done


class Probe:
    """Publish times by event id, receive times by event id."""

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.all_received = threading.Event()
        self.expected = 0

    def receive(self, event_id: int) -> None:
        self.received[event_id] = time.perf_counter()
        if len(self.received) >= self.expected:
            self.all_received.set()

    def latencies_ms(self) -> list[float]:
        missing = set(self.sent) - set(self.received)
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(self.sent)} events never reached the subscriber "
                f"within {RECEIVE_TIMEOUT:g} s, for example id {min(missing)}"
            )
        return [(self.received[i] - self.sent[i]) * 1000 for i in self.sent]


def run(database_url: str, rate: float, count: int, rounds: int) -> Section:
    section = Section(
        title="3. Publish-to-subscriber latency",
        method=(
            f"A publisher thread publishes {count:,} events at {rate:g} events/s (paced by the "
            "clock, one event per transaction) while a subscriber thread in the same process "
            "receives them. The latency of an event runs from just before the publish call to "
            "the moment the subscriber holds it. The library publishes with "
            "`EventLog.publish` and receives by iterating a live `Subscription`: the listener "
            "thread gets the NOTIFY, rings the subscription, which reads the event from its "
            "cursor with one query. The raw baseline publishes with the raw insert-and-NOTIFY "
            "statement of benchmark 1 and receives the notification on its own LISTEN "
            "connection through `Connection.notifies()`, reading nothing. Library and raw "
            f"alternate for {plural(rounds, 'round')}, and the percentiles are over all events "
            "of all rounds."
        ),
    )
    schema = new_schema(database_url, "bench_latency")
    try:
        samples: dict[str, list[float]] = {"library": [], "raw": []}
        for _ in range(rounds):
            samples["library"] += _library_round(database_url, schema, rate, count)
            samples["raw"] += _raw_round(database_url, schema, rate, count)
    finally:
        drop_schema(database_url, schema)

    for label, fraction, target in (("p50", 0.50, None), ("p99", 0.99, TARGET_P99)):
        section.comparisons.append(
            Comparison(
                label,
                percentile(samples["library"], fraction),
                percentile(samples["raw"], fraction),
                "ms",
                target,
                higher_is_better=False,
            )
        )
    section.tables.append(
        Table(
            "Latency distribution (ms)",
            ["", "p50", "p90", "p99", "max", "events"],
            [
                [name]
                + [f"{percentile(values, q):.2f}" for q in (0.5, 0.9, 0.99)]
                + [f"{max(values):.2f}", f"{len(values):,}"]
                for name, values in samples.items()
            ],
        )
    )
    return section


def _library_round(database_url: str, schema: str, rate: float, count: int) -> list[float]:
    probe = Probe()
    probe.expected = count
    with EventLog(database_url, schema=schema) as log, log.subscribe([TOPIC]) as subscription:

        def consume() -> None:
            for event in subscription:
                probe.receive(event.id)

        consumer = threading.Thread(target=consume, name="bench-subscriber", daemon=True)
        consumer.start()

        def publish(seq: int) -> int:
            return log.publish(TOPIC, EVENT_TYPE, {"seq": seq}).id

        _paced_publish(publish, probe, rate, count)
        probe.all_received.wait(RECEIVE_TIMEOUT)
        subscription.close()
        consumer.join(RECEIVE_TIMEOUT)
    return probe.latencies_ms()


def _raw_round(database_url: str, schema: str, rate: float, count: int) -> list[float]:
    probe = Probe()
    probe.expected = count
    channel = channel_for(TOPIC, schema)
    statement = raw_publish_statement(schema)
    with psycopg.connect(database_url, autocommit=True) as listen, psycopg.connect(
        database_url, autocommit=True
    ) as conn:
        listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

        def consume() -> None:
            for notify in listen.notifies(timeout=RECEIVE_TIMEOUT, stop_after=count):
                probe.receive(int(notify.payload))

        consumer = threading.Thread(target=consume, name="bench-raw-listener", daemon=True)
        consumer.start()

        def publish(seq: int) -> int:
            row = conn.execute(statement, [[TOPIC], EVENT_TYPE, encode_json({"seq": seq}), "{}", channel]).fetchone()
            assert row is not None
            return row[0]

        _paced_publish(publish, probe, rate, count)
        consumer.join(RECEIVE_TIMEOUT)
    return probe.latencies_ms()


def _paced_publish(publish: Callable[[int], int], probe: Probe, rate: float, count: int) -> None:
    """Publish `count` events, the n-th at start + n / rate (at once when running late)."""
    started = time.perf_counter()
    for seq in range(count):
        delay = started + seq / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent_at = time.perf_counter()
        event_id = publish(seq)
        probe.sent[event_id] = sent_at
