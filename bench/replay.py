"""Benchmark 4: replaying a large log beside a raw server-side cursor."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from eventlog import EventLog, Settings

from .common import Comparison, Section, Table, drop_schema, interleave, median, new_schema, paired, plural

TARGET = 0.8


def fill_events(conn: psycopg.Connection, schema: str, count: int) -> None:
    """Append `count` shop-like events with INSERT ... SELECT, in one statement.

    Half of the events are product events (a dense topic and one of 20,000
    product topics), half are cart events of one of 100,000 users, so a user's
    cart topic is sparse: about count / 200,000 events each.
    """
    conn.execute(
        sql.SQL(
            """
            INSERT INTO {}.events (topics, type, data, metadata)
            SELECT CASE WHEN g %% 2 = 0
                        THEN ARRAY['shop:products', 'shop:products:' || (g / 2 %% 20000)]
                        ELSE ARRAY['shop:cart:user:' || (g / 2 %% 100000)]
                   END,
                   CASE WHEN g %% 2 = 0 THEN 'product_updated' ELSE 'cart_item_added' END,
                   jsonb_build_object('product_id', g / 2 %% 20000, 'name', 'Product ' || g,
                                      'price', '19.99', 'stock', g %% 50),
                   jsonb_build_object('correlation_id', 'bench-' || g, 'source', 'bench')
            FROM generate_series(1, %s) AS g
            """
        ).format(sql.Identifier(schema)),
        [count],
    )


def run(database_url: str, count: int, rounds: int) -> Section:
    page_size = Settings.load(database_url).batch_size  # what replay() uses by default
    section = Section(
        title=f"4. Replay of {count:,} events",
        method=(
            f"The log holds {count:,} events, written with INSERT ... SELECT generate_series, "
            "with about 100 bytes of data and 50 of metadata each. The library iterates "
            f"`EventLog.replay()` with its default page size ({page_size}). That is one query "
            "`WHERE id > cursor ORDER BY id LIMIT page` per page, and an `Event` model per row. "
            "Its connections decode jsonb with the standard library's `JSONDecoder.decode` on "
            "text rather than `json.loads` on bytes, which first detects the encoding. "
            "The raw baseline reads the same columns with one named (server-side) cursor, "
            f"`itersize = {page_size}`, `ORDER BY id`, in a transaction, and psycopg's "
            "default loaders (the standard library's `json.loads` for jsonb) build a tuple "
            f"per row. The rate is events per second, the median of {plural(rounds, 'pass', 'passes')} "
            "of each, alternating, and the ratio is the median of the ratios of the pairs."
        ),
    )
    schema = new_schema(database_url, "bench_replay")
    try:
        started = time.perf_counter()
        with psycopg.connect(database_url, autocommit=True) as conn:
            fill_events(conn, schema, count)
            conn.execute(sql.SQL("VACUUM ANALYZE {}.events").format(sql.Identifier(schema)))
        section.notes.append(f"Writing the {count:,} events took {time.perf_counter() - started:.1f} s.")

        with EventLog(database_url, schema=schema) as log, psycopg.connect(database_url) as conn:
            query = sql.SQL(
                "SELECT id, topics, type, data, metadata, occurred_at FROM {}.events ORDER BY id"
            ).format(sql.Identifier(schema))

            cpu: dict[str, list[float]] = {"library": [], "raw": []}

            def timed(name: str, replay_all: Callable[[], int]) -> float:
                started, started_cpu = time.perf_counter(), time.process_time()
                seen = replay_all()
                elapsed = time.perf_counter() - started
                cpu[name].append(time.process_time() - started_cpu)
                if seen != count:
                    raise RuntimeError(f"{name} replay returned {seen:,} events, expected {count:,}")
                return count / elapsed

            def library_replay() -> int:
                return sum(1 for _ in log.replay())

            def raw_replay() -> int:
                with conn.transaction(), conn.cursor(name="bench_replay") as cur:
                    cur.itersize = page_size
                    cur.execute(query)
                    return sum(1 for _ in cur)

            rates = interleave(
                rounds,
                {"library": lambda: timed("library", library_replay), "raw": lambda: timed("raw", raw_replay)},
            )
    finally:
        drop_schema(database_url, schema)

    section.comparisons.append(
        Comparison(
            f"{count:,} events",
            median(rates["library"]),
            median(rates["raw"]),
            "events/s",
            TARGET,
            paired_ratios=paired(rates["library"], rates["raw"]),
        )
    )
    section.tables.append(
        Table(
            "Passes (events/s, and the CPU time of this Python process per event, which "
            "other processes on the machine disturb less than the rate)",
            ["", "median", "min", "max", "client CPU per event"],
            [
                [name, f"{median(v):,.0f}", f"{min(v):,.0f}", f"{max(v):,.0f}", f"{median(cpu[name]) / count * 1e6:.1f} µs"]
                for name, v in rates.items()
            ],
        )
    )
    return section
