"""Benchmark 1: publish throughput, one event per transaction, and the cost of the lock."""

from __future__ import annotations

import re
import time
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
            "the function call, the advisory lock and the returned `Event`. The library's "
            "connections never prepare statements (`prepare_threshold=None`), while the raw "
            "connections keep psycopg's default of preparing from the 5th execution. Each event "
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

    section.tables.append(lock_comparison(database_url, concurrency, lock_duration, rounds))
    section.notes.append(
        "Why the lock should cost little: a transaction that sends NOTIFY takes a cluster-wide "
        "heavyweight lock just before its commit and holds it until the commit is flushed "
        "(`PreCommit_Notify` in PostgreSQL's src/backend/commands/async.c). "
        "So publishing commits already run one at a time. The advisory lock queues them a "
        "little earlier, before the insert. In the table above, \"lock / no lock\" is the "
        "median of the rounds' ratios: below 1 means the lock costs throughput. The variant "
        "without NOTIFY shows what the commits reach when nothing serializes them and the "
        "server can flush many in one group commit."
    )
    return section


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
            ["publishers", *variants, "lock / no lock"],
            [],
        )
        with_lock, without_lock = list(variants)[:2]
        for threads in concurrency:
            rates = _time_variants(database_url, schema, variants, threads, duration, rounds)
            lock_ratio = median(paired(rates[with_lock], rates[without_lock]))
            table.rows.append(
                [str(threads)] + [f"{median(rates[name]):,.0f}" for name in variants] + [f"{lock_ratio:.2f}"]
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


def _function_work(
    connections: list[psycopg.Connection], schema: str, function: str
) -> Callable[[int, float], int]:
    statement = sql.SQL(
        "SELECT id, occurred_at FROM {}.{}(%s::text[], %s, %s::jsonb, %s::jsonb)"
    ).format(sql.Identifier(schema), sql.Identifier(function))

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
