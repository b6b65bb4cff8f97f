"""Benchmark 1: publish throughput, one event per transaction, and the cost of the lock."""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable
from contextlib import ExitStack

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
    raw_publish_statement,
    run_threads,
    spread,
)

EVENT_TYPE = "product_updated"
TARGET_AT_16 = 0.85
WARM_UP_SECONDS = 0.2

# The line of publish_v1 that takes the ordering lock, and the statement that rings
# the doorbells. The lock comparison builds copies of the function without them.
_LOCK_LINE = re.compile(r"^\s*PERFORM pg_advisory_xact_lock\([^;]*\);\s*$", re.MULTILINE)
_NOTIFY_STATEMENT = re.compile(r"^\s*PERFORM pg_notify\(.*?;\s*$", re.MULTILINE | re.DOTALL)


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
            "the library's call of `publish_v1`, with the same data encoded by `json.dumps`. So "
            "the ratio measures everything the library adds: validation and encoding, the pool, "
            "the function call, the advisory lock and the returned `Event`. The library prepares "
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
            prepared = stack.enter_context(psycopg.connect(url, autocommit=True))
            unprepared = stack.enter_context(psycopg.connect(url, autocommit=True, prepare_threshold=None))
            statement = raw_publish_statement(schema)
            function = _function_statement(schema, "publish_v1")
            channel = channel_for(PRODUCT_TOPIC, schema)

            def raw_calls(conn: psycopg.Connection, query: sql.Composed, notify: bool) -> Callable[[], float]:
                def calls() -> float:
                    started = time.perf_counter()
                    for number in range(OVERHEAD_EVENTS):
                        params = [[PRODUCT_TOPIC], EVENT_TYPE, encode_json(product_data(number)), encode_json(product_metadata(number))]
                        conn.execute(query, params + [channel] if notify else params).fetchone()
                    return (time.perf_counter() - started) / OVERHEAD_EVENTS * 1e6

                return calls

            def library_calls() -> float:
                started = time.perf_counter()
                for number in range(OVERHEAD_EVENTS):
                    log.publish(PRODUCT_TOPIC, EVENT_TYPE, product_data(number), metadata=product_metadata(number))
                return (time.perf_counter() - started) / OVERHEAD_EVENTS * 1e6

            runs = {
                "raw insert-and-NOTIFY statement, prepared (the raw baseline)": raw_calls(prepared, statement, True),
                "raw insert-and-NOTIFY statement, not prepared": raw_calls(unprepared, statement, True),
                "raw call of publish_v1, not prepared": raw_calls(unprepared, function, False),
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
        statement = raw_publish_statement(raw_schema)
        channel = channel_for(PRODUCT_TOPIC, raw_schema)

        def library_work(index: int, deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                number = index * 1_000_000 + done
                log.publish(PRODUCT_TOPIC, EVENT_TYPE, product_data(number), metadata=product_metadata(number))
                done += 1
            return done

        def raw_work(index: int, deadline: float) -> int:
            conn = connections[index]
            done = 0
            while time.perf_counter() < deadline:
                number = index * 1_000_000 + done
                params = [
                    [PRODUCT_TOPIC],
                    EVENT_TYPE,
                    encode_json(product_data(number)),
                    encode_json(product_metadata(number)),
                    channel,
                ]
                conn.execute(statement, params).fetchone()
                done += 1
            return done

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
    """Time the library's publish_v1 beside copies without the lock, and without NOTIFY.

    Each publisher thread calls one function in a loop for `duration` seconds.
    """
    schema = new_schema(database_url, "bench_lock")
    try:
        variants = _create_variants(database_url, schema)
        table = Table(
            f"What the advisory lock adds (events/s, median of {plural(rounds, 'run')} of {duration:g} s). "
            "The same raw psycopg client calls the library's SQL function and copies of it in a "
            "scratch schema",
            ["publishers", *variants, "lock / no lock (min-max)"],
            [],
        )
        with_lock, without_lock = list(variants)[:2]
        for threads in concurrency:
            rates = _time_variants(database_url, schema, variants, threads, duration, rounds)
            ratios = paired(rates[with_lock], rates[without_lock])
            table.rows.append(
                [str(threads)]
                + [f"{median(rates[name]):,.0f}" for name in variants]
                + [f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
            )
        return table
    finally:
        drop_schema(database_url, schema)


def _create_variants(database_url: str, schema: str) -> dict[str, str]:
    """Create copies of publish_v1 in `schema`; return {label: function name}."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_get_functiondef(%s::regprocedure)",
            [f"{schema}.publish_v1(text[], text, jsonb, jsonb)"],
        ).fetchone()
        assert row is not None
        definition: str = row[0]
        if len(_LOCK_LINE.findall(definition)) != 1:
            raise RuntimeError(
                f"{schema}.publish_v1 no longer has exactly one 'PERFORM pg_advisory_xact_lock(...);' "
                "line; update _LOCK_LINE in bench/publish.py to match the function"
            )
        variants = {"with lock (publish_v1)": "publish_v1"}
        without_lock = _rename(_LOCK_LINE.sub("", definition), "publish_nolock")
        conn.execute(without_lock)
        variants["without lock"] = "publish_nolock"
        if len(_NOTIFY_STATEMENT.findall(without_lock)) == 1:
            conn.execute(_rename(_NOTIFY_STATEMENT.sub("", without_lock), "publish_nolock_nonotify"))
            variants["without lock and NOTIFY"] = "publish_nolock_nonotify"
    return variants


def _rename(definition: str, name: str) -> str:
    # pg_get_functiondef starts with "CREATE OR REPLACE FUNCTION schema.publish_v1(".
    # Variable references such as publish_v1.topics must follow the new name.
    renamed = re.sub(r"\b(publish_v1|publish_nolock)(?=\s*\(|\.)", name, definition)
    if renamed == definition:
        raise RuntimeError("could not rename the copy of publish_v1; update _rename in bench/publish.py")
    return renamed


def _time_variants(
    database_url: str, schema: str, variants: dict[str, str], threads: int, duration: float, rounds: int
) -> dict[str, list[float]]:
    with ExitStack() as stack:
        connections = [
            stack.enter_context(psycopg.connect(database_url, autocommit=True)) for _ in range(threads)
        ]
        works = {label: _function_work(connections, schema, function) for label, function in variants.items()}
        return interleave(rounds, _timed_runs(threads, duration, works))


def _function_statement(schema: str, function: str) -> sql.Composed:
    return sql.SQL("SELECT id, occurred_at FROM {}.{}(%s::text[], %s, %s::jsonb, %s::jsonb)").format(
        sql.Identifier(schema), sql.Identifier(function)
    )


def _function_work(
    connections: list[psycopg.Connection], schema: str, function: str
) -> Callable[[int, float], int]:
    statement = _function_statement(schema, function)

    def work(index: int, deadline: float) -> int:
        conn = connections[index]
        done = 0
        while time.perf_counter() < deadline:
            number = index * 1_000_000 + done
            params = [[PRODUCT_TOPIC], EVENT_TYPE, encode_json(product_data(number)), encode_json(product_metadata(number))]
            conn.execute(statement, params).fetchone()
            done += 1
        return done

    return work
