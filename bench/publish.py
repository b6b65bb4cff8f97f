"""Benchmark 1: publish throughput, one event per transaction, and the cost of the lock."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from contextlib import ExitStack

import psycopg
from psycopg import sql

from eventlog import EventLog, channel_for
from eventlog._sql import publish_statement

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
    raw_publish_statement,
    run_threads,
    spread,
)

EVENT_TYPE = "product_updated"
TARGET_AT_16 = 0.85
WARM_UP_SECONDS = 0.2



def run(
    database_url: str, concurrency: list[int], duration: float, rounds: int, lock_duration: float
) -> Section:
    section = Section(
        title="1. Publish throughput",
        method=(
            "Each publisher is a thread that publishes one event per transaction in a loop "
            f"for {duration:g} s. The table gives events per second over all threads, the "
            f"median of {plural(rounds, 'round')} in which the library and the raw baseline "
            "alternate, and the ratio is the median of the rounds' ratios. The library runs `EventLog.publish` "
            "with a pool of exactly as many connections as threads. The raw baseline gives each "
            "thread its own autocommit psycopg connection and runs `WITH ins AS (INSERT ... "
            "RETURNING id, occurred_at) SELECT id, occurred_at, pg_notify(channel, id::text) FROM "
            "ins`. That is one statement, one round trip and one transaction without a lock, like "
            "the library's statement, which adds the lock to it, and the same data encoded by "
            "`json.dumps`. So the ratio measures everything the library adds: validation and "
            "encoding, the pool, the advisory lock and the returned `Event`. The library prepares "
            "its publish statement on first use; the raw connections keep psycopg's default of "
            "preparing from the 5th execution. Each event "
            f"has one topic ({PRODUCT_TOPIC!r}) and about 100 bytes of data. No one listens."
        ),
    )
    library_schema = new_schema(database_url, "bench_publish_lib")
    raw_schema = new_schema(database_url, "bench_publish_raw")
    try:
        table = Table("Runs (events/s, min-max over rounds)", ["publishers", "library", "raw"], [])
        for threads in concurrency:
            library, raw = _compare(database_url, library_schema, raw_schema, threads, duration, rounds)
            section.comparisons.append(
                Comparison(
                    f"{threads} publisher{'s' if threads > 1 else ''}",
                    median(library),
                    median(raw),
                    "events/s",
                    TARGET_AT_16 if threads == 16 else None,
                    paired_ratios=paired(library, raw),
                )
            )
            table.rows.append([str(threads), spread(library), spread(raw)])
        section.tables.append(table)
    finally:
        drop_schema(database_url, library_schema)
        drop_schema(database_url, raw_schema)

    section.tables.append(overhead_table(database_url, rounds))
    section.tables.append(lock_comparison(database_url, concurrency, lock_duration, rounds))
    section.notes.append(
        "Why the lock should cost little: a transaction that sends NOTIFY takes a cluster-wide "
        "heavyweight lock just before its commit and holds it until the commit is flushed "
        "(`PreCommit_Notify` in PostgreSQL's src/backend/commands/async.c). "
        "So publishing commits already run one at a time. The advisory lock queues them a "
        "little earlier, before the insert. In the table above, \"lock / no lock\" is the "
        "median of the rounds' ratios: below 1 means the lock costs throughput. With one "
        "publisher the lock is never contended, so the spread of that row shows the noise of "
        "the machine. The variant without NOTIFY shows what the commits reach when nothing "
        "serializes them and the server can flush many in one group commit."
    )
    return section


# -- what the library adds per call ------------------------------------------------------

OVERHEAD_EVENTS = 500


def overhead_table(database_url: str, rounds: int) -> Table:
    """Time one publisher's calls with commits that do not wait for the WAL flush.

    With synchronous_commit off, a call costs only the client, the round trip and
    the server's work, so what the library adds shows without the disk's noise.
    """
    url = _with_option(database_url, "-c synchronous_commit=off")
    schema = new_schema(database_url, "bench_overhead")
    try:
        with ExitStack() as stack:
            log = stack.enter_context(EventLog(url, schema=schema, pool_min_size=1, pool_max_size=1))
            prepared = stack.enter_context(psycopg.connect(url, autocommit=True, prepare_threshold=0))
            unprepared = stack.enter_context(psycopg.connect(url, autocommit=True, prepare_threshold=None))
            channel = channel_for(PRODUCT_TOPIC, schema)
            function = sql.SQL("SELECT id, occurred_at FROM {}.publish_v1(%s::text[], %s, %s::jsonb, %s::jsonb)").format(
                sql.Identifier(schema)
            )

            def raw_calls(
                conn: psycopg.Connection, query: str | sql.Composable, channel: str | None
            ) -> Callable[[], float]:
                def calls() -> float:
                    started = time.perf_counter()
                    for number in range(OVERHEAD_EVENTS):
                        conn.execute(query, _raw_params(number, channel)).fetchone()
                    return (time.perf_counter() - started) / OVERHEAD_EVENTS * 1e6

                return calls

            def library_calls() -> float:
                started = time.perf_counter()
                for number in range(OVERHEAD_EVENTS):
                    log.publish(PRODUCT_TOPIC, EVENT_TYPE, product_data(number), metadata=product_metadata(number))
                return (time.perf_counter() - started) / OVERHEAD_EVENTS * 1e6

            runs = {
                "raw insert-and-NOTIFY statement, prepared (the raw baseline)": raw_calls(
                    prepared, raw_publish_statement(schema), channel
                ),
                "raw insert-and-NOTIFY statement, not prepared": raw_calls(
                    unprepared, raw_publish_statement(schema), channel
                ),
                "the library's publish statement (with the lock), prepared, from a plain psycopg client": raw_calls(
                    prepared, publish_statement(schema, 1), channel
                ),
                "call of the SQL function publish_v1, prepared, from a plain psycopg client": raw_calls(
                    prepared, function, None
                ),
                "`EventLog.publish`": library_calls,
            }
            for run in runs.values():
                run()  # warm up: prepared statements, caches
            micros = interleave(rounds, runs)
    finally:
        drop_schema(database_url, schema)
    return Table(
        "Time per publish with one publisher when commits do not wait for the WAL flush "
        f"(synchronous_commit = off for this table only; µs, median of {plural(rounds, 'run')} "
        f"of {OVERHEAD_EVENTS} events). It shows what each layer adds without the disk's noise",
        ["call", "µs per publish"],
        [[name, f"{median(values):.0f}"] for name, values in micros.items()],
    )


def _with_option(database_url: str, option: str) -> str:
    """Return `database_url` with a server option added to its query string."""
    separator = "&" if "?" in database_url else "?"
    return f"{database_url}{separator}options={urllib.parse.quote(option)}"


def _compare(
    database_url: str, library_schema: str, raw_schema: str, threads: int, duration: float, rounds: int
) -> tuple[list[float], list[float]]:
    with ExitStack() as stack:
        log = stack.enter_context(
            EventLog(database_url, schema=library_schema, pool_min_size=threads, pool_max_size=threads)
        )
        connections = [
            stack.enter_context(psycopg.connect(database_url, autocommit=True)) for _ in range(threads)
        ]
        def library_work(index: int, deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                number = index * 1_000_000 + done
                log.publish(PRODUCT_TOPIC, EVENT_TYPE, product_data(number), metadata=product_metadata(number))
                done += 1
            return done

        raw_work = _statement_work(connections, raw_publish_statement(raw_schema), channel_for(PRODUCT_TOPIC, raw_schema))
        runs = _timed_runs(threads, duration, {"library": library_work, "raw": raw_work})
        results = interleave(rounds, runs)
    return results["library"], results["raw"]


def _timed_runs(
    threads: int, duration: float, works: dict[str, Callable[[int, float], int]]
) -> dict[str, Callable[[], float]]:
    """Warm up each variant once (connections, prepared statements), then time it on each call."""
    for work in works.values():
        run_threads(threads, work, WARM_UP_SECONDS)
    return {name: (lambda work=work: run_threads(threads, work, duration)) for name, work in works.items()}


# -- what the advisory lock adds ---------------------------------------------------------


def lock_comparison(database_url: str, concurrency: list[int], duration: float, rounds: int) -> Table:
    """Time the library's publish statement beside copies without the lock, and without NOTIFY.

    A plain psycopg client runs each statement, so the table shows the server's side
    alone. Each publisher thread runs one statement in a loop for `duration` seconds.
    """
    schema = new_schema(database_url, "bench_lock")
    ident = sql.Identifier(schema)
    channel = channel_for(PRODUCT_TOPIC, schema)
    variants: dict[str, tuple[str | sql.Composable, bool]] = {
        "with lock (the library's statement)": (publish_statement(schema, 1), True),
        "without lock (the raw baseline)": (raw_publish_statement(schema), True),
        "without lock and NOTIFY": (
            sql.SQL(
                "INSERT INTO {}.events (topics, type, data, metadata)"
                " VALUES (%s, %s, %s::jsonb, %s::jsonb) RETURNING id, occurred_at"
            ).format(ident),
            False,
        ),
    }
    try:
        table = Table(
            f"What the advisory lock adds (events/s, median of {plural(rounds, 'run')} of {duration:g} s). "
            "A plain psycopg client runs, in the same schema, the statement that `EventLog.publish` "
            "sends and copies of it without the lock and without NOTIFY",
            ["publishers", *variants, "lock / no lock (min-max)"],
            [],
        )
        with_lock, without_lock = list(variants)[:2]
        for threads in concurrency:
            with ExitStack() as stack:
                connections = [
                    stack.enter_context(psycopg.connect(database_url, autocommit=True)) for _ in range(threads)
                ]
                works = {
                    label: _statement_work(connections, statement, channel if notify else None)
                    for label, (statement, notify) in variants.items()
                }
                rates = interleave(rounds, _timed_runs(threads, duration, works))
            ratios = paired(rates[with_lock], rates[without_lock])
            table.rows.append(
                [str(threads)]
                + [f"{median(rates[name]):,.0f}" for name in variants]
                + [f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
            )
        return table
    finally:
        drop_schema(database_url, schema)


def _raw_params(number: int, channel: str | None) -> list[object]:
    params: list[object] = [
        [PRODUCT_TOPIC],
        EVENT_TYPE,
        encode_json(product_data(number)),
        encode_json(product_metadata(number)),
    ]
    return params if channel is None else [*params, channel]


def _statement_work(
    connections: list[psycopg.Connection], statement: str | sql.Composable, channel: str | None
) -> Callable[[int, float], int]:
    def work(index: int, deadline: float) -> int:
        conn = connections[index]
        done = 0
        while time.perf_counter() < deadline:
            conn.execute(statement, _raw_params(index * 1_000_000 + done, channel)).fetchone()
            done += 1
        return done

    return work
