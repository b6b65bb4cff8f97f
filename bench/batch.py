"""Benchmark 2: one batch of events via publish_many beside COPY."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from eventlog import EventLog, channel_for

from .common import (
    PRODUCT_TOPIC,
    Comparison,
    Section,
    Table,
    drop_schema,
    encode_json,
    interleave,
    median,
    new_schema,
    paired,
    plural,
    product_data,
    product_metadata,
)

EVENT_TYPE = "product_imported"
TARGET = 0.5

Row = tuple[list[str], str, dict[str, Any], dict[str, Any]]


def run(database_url: str, batch_size: int, rounds: int) -> Section:
    section = Section(
        title=f"2. Batch of {batch_size:,} events",
        method=(
            f"One transaction appends {batch_size:,} events of one topic, about 100 bytes of "
            "data each. The library calls `EventLog.publish_many` with a list of "
            "`(topics, type, data, metadata)` tuples and gets back the stored events. "
            "The raw baseline encodes the same rows with `json.dumps`, writes them with "
            "`COPY events (topics, type, data, metadata) FROM STDIN` (text format) and "
            "sends one `pg_notify` in the same transaction. It takes no lock and returns "
            f"nothing. Each figure is the median of {plural(rounds, 'batch', 'batches')}, library "
            "and raw alternating, and the ratio is the median of the ratios of the pairs. The "
            "rate is events per second within the batch, from the call to the commit."
        ),
    )
    rows: list[Row] = [
        ([PRODUCT_TOPIC], EVENT_TYPE, product_data(i), product_metadata(i)) for i in range(batch_size)
    ]
    library_schema = new_schema(database_url, "bench_batch_lib")
    raw_schema = new_schema(database_url, "bench_batch_raw")
    try:
        with EventLog(database_url, schema=library_schema) as log, psycopg.connect(database_url) as conn:

            def library_run() -> float:
                started = time.perf_counter()
                stored = log.publish_many(rows)
                elapsed = time.perf_counter() - started
                assert len(stored) == batch_size
                return elapsed

            copy_statement = sql.SQL("COPY {}.events (topics, type, data, metadata) FROM STDIN").format(
                sql.Identifier(raw_schema)
            )
            channel = channel_for(PRODUCT_TOPIC, raw_schema)

            def raw_run() -> float:
                started = time.perf_counter()
                with conn.transaction():
                    with conn.cursor() as cur, cur.copy(copy_statement) as copy:
                        for topics, type_, data, metadata in rows:
                            copy.write_row((topics, type_, encode_json(data), encode_json(metadata)))
                    conn.execute("SELECT pg_notify(%s, %s)", [channel, "batch"])
                return time.perf_counter() - started

            library_run(), raw_run()  # warm up: connections, catalog caches
            seconds = interleave(rounds, {"library": library_run, "raw": raw_run})
            breakdown = _breakdown(log, rows, rounds)
    finally:
        drop_schema(database_url, library_schema)
        drop_schema(database_url, raw_schema)

    library_s, raw_s = median(seconds["library"]), median(seconds["raw"])
    section.comparisons.append(
        Comparison(
            f"{batch_size:,} events in one transaction",
            batch_size / library_s,
            batch_size / raw_s,
            "events/s",
            TARGET,
            paired_ratios=paired(seconds["raw"], seconds["library"]),  # rates: the inverse of times
        )
    )
    section.tables.append(
        Table(
            "Time per batch (ms)",
            ["", "median", "min", "max"],
            [
                [name, f"{median(values) * 1000:.1f}", f"{min(values) * 1000:.1f}", f"{max(values) * 1000:.1f}"]
                for name, values in seconds.items()
            ],
        )
    )
    section.tables.append(breakdown)
    return section


def _breakdown(log: EventLog, rows: list[Row], rounds: int) -> Table:
    """Time the steps of publish_many one by one, with the library's private helpers."""
    from psycopg.adapt import PyFormat, Transformer

    from eventlog._sql import publish_batch_params, statements, stored_events

    def median_ms(step: Callable[[], object]) -> str:
        timings = []
        for _ in range(rounds):
            started = time.perf_counter()
            step()
            timings.append(time.perf_counter() - started)
        return f"{median(timings) * 1000:.1f}"

    encoded = log._encode(rows)
    params = publish_batch_params(log.schema, encoded)
    arrays = params
    transformer = Transformer()
    with log.connection() as conn:
        returned = conn.execute(statements(log.schema).publish_batch, params).fetchall()
        steps = [
            ("validate and encode the events (NewEvent, JSON)", median_ms(lambda: log._encode(rows))),
            ("build the parameters", median_ms(lambda: publish_batch_params(log.schema, encoded))),
            (
                "run the batch statement and commit (one round trip)",
                median_ms(lambda: conn.execute(statements(log.schema).publish_batch, params).fetchall()),
            ),
            ("build the returned Event objects", median_ms(lambda: stored_events(encoded, returned))),
            (
                "psycopg: dump the arrays in text format",
                median_ms(lambda: transformer.dump_sequence(arrays, [PyFormat.TEXT] * len(arrays))),
            ),
            (
                "psycopg: dump the arrays in binary format",
                median_ms(lambda: transformer.dump_sequence(arrays, [PyFormat.BINARY] * len(arrays))),
            ),
        ]
    return Table(
        f"Where the library's time goes (ms per batch of {len(rows):,}, median of "
        f"{plural(rounds, 'run')}). publish_many sends the arrays in binary format, and the "
        "last two rows show what psycopg spends on them in each format",
        ["step", "ms"],
        [list(step) for step in steps],
    )
