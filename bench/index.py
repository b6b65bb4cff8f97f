"""Benchmark 5: "events of these topics after id n" must use the topics index on a large log."""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
from psycopg import sql

from eventlog import EventLog
from eventlog._sql import EventFilter, select_events

from .common import Section, Table, drop_schema, median, new_schema, plural
from .replay import fill_events

TOPICS_INDEX = "events_topics_idx"
SPARSE_TOPIC = "shop:cart:user:4242"
DENSE_TOPIC = "shop:products"
TIMED_READS = 20
# The index build sorts in memory up to this much, per the session that builds it.
BUILD_MEMORY = "512MB"


def run(database_url: str, count: int) -> Section:
    section = Section(title=f"5. Index check on {count:,} events", method="")
    schema = new_schema(database_url, "bench_index")
    try:
        started = time.perf_counter()
        _build(database_url, schema, count)
        section.notes.append(
            f"Writing the {count:,} events and building the indexes took {time.perf_counter() - started:.0f} s."
        )
        after = count // 2
        with psycopg.connect(database_url, autocommit=True) as conn, EventLog(database_url, schema=schema) as log:
            section.method = _method(conn, schema, count, after)
            with log.connection() as pooled:
                threshold = pooled.prepare_threshold
            section.notes.append(_preparing_note(threshold))
            section.notes.append(
                "For the dense topic, which half of the events carry, the range scan of the primary key "
                "is the right plan: it stops after one page of matching events."
            )

            plans = Table(
                "Plans (scan lines) and times", ["query", "plan", "plan line(s)", "execution", "`EventLog.read`"], []
            )
            for topic in (SPARSE_TOPIC, DENSE_TOPIC):
                query, params = select_events(
                    schema, EventFilter(topics=(topic,), after_id=after), log.settings.batch_size
                )
                custom = _explain(conn, sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params)
                generic = _explain_generic(conn, query, params)
                read_ms = _time_reads(log, topic, after)
                label = f"{'sparse' if topic == SPARSE_TOPIC else 'dense'} {topic!r} after {after:,}"
                plans.rows.append([label, "custom", _scan_lines(custom), _execution_ms(custom), f"{read_ms:.2f} ms"])
                plans.rows.append([label, "generic", _scan_lines(generic), _execution_ms(generic), "-"])
                if topic == SPARSE_TOPIC:
                    # Only the custom plan is checked: the library reads with
                    # prepare=False, so PostgreSQL never uses the generic plan for them.
                    section.checks.append(_plan_check("custom plan", custom))
            section.tables.append(plans)
    finally:
        drop_schema(database_url, schema)
    return section


def _method(conn: psycopg.Connection, schema: str, count: int, after: int) -> str:
    sparse_total, sparse_after = conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE id > %s) FROM {}.events WHERE topics && %s").format(
            sql.Identifier(schema)
        ),
        [after, [SPARSE_TOPIC]],
    ).fetchone()  # type: ignore[misc]
    return (
        f"The log holds {count:,} events. Half are product events (topic {DENSE_TOPIC!r} and one "
        "of 20,000 product topics) and half are cart events of one of 100,000 users, so the "
        f"cart topic {SPARSE_TOPIC!r} has {plural(sparse_total, 'event')}, {sparse_after:,} of "
        f"them after id {after:,}. The events are written with the log's secondary indexes dropped, "
        "which are then rebuilt from their own definitions and analyzed, as after a restore. "
        "The query is the library's own for one topic after the id in the middle of the log, "
        "with the default page size, as `EventLog.read`, `replay` and subscriptions send it "
        "(`eventlog._sql.select_events`). The custom plan is `EXPLAIN (ANALYZE, BUFFERS)` with "
        "the parameters bound as the library binds them. The generic plan is the one "
        "PostgreSQL may switch to when the statement is prepared, forced with "
        "`plan_cache_mode = force_generic_plan`. psycopg prepares a statement from its 5th "
        "execution on a connection unless `prepare_threshold` is None. The query time is the "
        f"median of {TIMED_READS} `EventLog.read` calls, Python side included."
    )


def _preparing_note(threshold: int | None) -> str:
    return (
        "The library runs its reads with `prepare=False`, so PostgreSQL plans every read for "
        "its parameters (the custom plan), whatever the connection's `prepare_threshold` "
        f"(here {threshold}); the generic plan above cannot occur, and it is not a check for "
        "that reason."
    )


def _build(database_url: str, schema: str, count: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'events'"
            " AND indexname <> 'events_pkey'",
            [schema],
        ).fetchall()
        if TOPICS_INDEX not in {name for name, _ in rows}:
            raise RuntimeError(f"the log in schema {schema!r} has no index {TOPICS_INDEX!r}; update bench/index.py")
        for name, _ in rows:
            conn.execute(sql.SQL("DROP INDEX {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
        fill_events(conn, schema, count)
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(BUILD_MEMORY)))
        for _, definition in rows:
            conn.execute(definition)
        conn.execute(sql.SQL("VACUUM ANALYZE {}.events").format(sql.Identifier(schema)))


def _explain(conn: psycopg.Connection, query: sql.Composable, params: list[Any]) -> list[str]:
    return [row[0] for row in conn.execute(query, params).fetchall()]


def _explain_generic(conn: psycopg.Connection, query: sql.Composed, params: list[Any]) -> list[str]:
    """EXPLAIN the generic plan of `query` as a prepared statement."""
    text = query.as_string(conn)
    numbered = iter(range(1, len(params) + 1))
    text = re.sub(r"%s", lambda _: f"${next(numbered)}", text)
    arguments = sql.SQL(", ").join(sql.Literal(p) for p in params)
    with conn.transaction():
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(sql.SQL("PREPARE bench_generic AS {}").format(sql.SQL(text)))
        try:
            return _explain(conn, sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_generic ({})").format(arguments), [])
        finally:
            conn.execute("DEALLOCATE bench_generic")


def _time_reads(log: EventLog, topic: str, after: int) -> float:
    timings = []
    for _ in range(TIMED_READS):
        started = time.perf_counter()
        log.read([topic], after=after)
        timings.append((time.perf_counter() - started) * 1000)
    return median(timings)


def _scan_lines(plan: list[str]) -> str:
    nodes = [line.strip().removeprefix("->").strip() for line in plan if "Scan" in line]
    # Drop the cost and row estimates, keep the node and its actual rows.
    return "; ".join(re.sub(r"\s*\(cost=[^)]*\)", "", node) for node in nodes)


def _execution_ms(plan: list[str]) -> str:
    for line in plan:
        match = re.match(r"\s*Execution Time: ([\d.]+) ms", line)
        if match:
            return f"{float(match.group(1)):.2f} ms"
    return "?"


def _plan_check(label: str, plan: list[str]) -> tuple[str, str, bool]:
    uses_index = any(TOPICS_INDEX in line for line in plan)
    seq_scan = any("Seq Scan" in line for line in plan)
    outcome = (f"uses {TOPICS_INDEX}" if uses_index else "does not use the topics index") + (
        "; has a Seq Scan" if seq_scan else "; no Seq Scan"
    )
    return (f"sparse topic, {label}: scan of {TOPICS_INDEX}, no Seq Scan", outcome, uses_index and not seq_scan)
