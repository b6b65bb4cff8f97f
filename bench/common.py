"""Pieces shared by the benchmarks: results, statistics, schemas and payloads."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from eventlog import migrate

# -- results -----------------------------------------------------------------------------


@dataclass
class Comparison:
    """One library measurement beside its raw psycopg baseline.

    `ratio` is library / raw. Given `paired_ratios` (library / raw of each round,
    whose two runs ran back to back), it is their median instead, which a change
    of background load during the run disturbs less. With ``higher_is_better``
    (throughput) the target is a minimum ratio, otherwise (latency) a maximum.
    """

    case: str
    library: float
    raw: float
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    paired_ratios: list[float] | None = None

    @property
    def ratio(self) -> float:
        if self.paired_ratios:
            return median(self.paired_ratios)
        return self.library / self.raw if self.raw else float("nan")

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"≥ {self.target:g}" if self.higher_is_better else f"≤ {self.target:g}"

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target


@dataclass
class Table:
    """A free-form table of extra measurements."""

    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """The outcome of one benchmark, as the report prints it."""

    title: str
    method: str
    comparisons: list[Comparison] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (check, outcome, passed) for targets that are not ratios, such as a query plan.
    checks: list[tuple[str, str, bool]] = field(default_factory=list)


# -- statistics --------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def paired(library: Sequence[float], raw: Sequence[float]) -> list[float]:
    """Return library / raw for each round of `interleave`."""
    return [lib / base for lib, base in zip(library, raw)]


def plural(count: int, word: str, words: str | None = None) -> str:
    """Return "1 round" or "3 rounds"; `words` is the plural when it is not `word` + "s"."""
    return f"{count:,} {word}" if count == 1 else f"{count:,} {words or word + 's'}"


def spread(values: Sequence[float]) -> str:
    """Return "min-max" of repeated measurements, for the report's noise column."""
    return f"{min(values):,.0f}-{max(values):,.0f}"


def interleave(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Call every run once per round, rotating the order, and collect the results.

    Alternating the variants spreads background load over all of them, and
    rotating the order stops one variant from always running first (on a cold
    cache) or last (after the checkpoint the others provoked).
    """
    names = list(runs)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(runs[name]())
    return results


def run_threads(count: int, work: Callable[[int, float], int], duration: float) -> float:
    """Run `work(thread_index, deadline)` in `count` threads; return operations per second.

    Every thread starts at the same moment and runs until the deadline; the
    clock stops when the last one has finished its operation in flight.
    """
    barrier = threading.Barrier(count + 1)
    done = [0] * count
    errors: list[BaseException] = []
    timing: dict[str, float] = {}

    def target(index: int) -> None:
        barrier.wait()
        try:
            done[index] = work(index, timing["deadline"])
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    timing["deadline"] = start + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(done) / elapsed


# -- database ----------------------------------------------------------------------------


def new_schema(database_url: str, purpose: str) -> str:
    """Create and migrate a fresh log schema; its name starts with `purpose`."""
    name = f"{purpose}_{uuid.uuid4().hex[:8]}"
    migrate.upgrade(database_url, schema=name)
    return name


def drop_schema(database_url: str, schema: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def raw_publish_statement(schema: str) -> sql.Composed:
    """Return the raw baseline of one publish: insert and NOTIFY in one statement, no lock.

    In autocommit mode this is one round trip and one transaction, like the
    library's publish statement, which adds the ordering lock to it. So the two
    differ only in what the library adds: validation and encoding in Python, the
    pool, the advisory lock and building the returned Event.
    """
    return sql.SQL(
        "WITH ins AS (INSERT INTO {}.events (topics, type, data, metadata)"
        " VALUES (%s, %s, %s::jsonb, %s::jsonb) RETURNING id, occurred_at)"
        " SELECT id, occurred_at, pg_notify(%s, id::text) FROM ins"
    ).format(sql.Identifier(schema))


# -- payloads ----------------------------------------------------------------------------

PRODUCT_TOPIC = "shop:products"


def product_data(number: int) -> dict[str, Any]:
    """Return a payload of the size the shop publishes, about 100 bytes of JSON."""
    return {
        "product_id": number,
        "name": f"Product {number}",
        "price": "19.99",
        "stock": number % 50,
    }


def product_metadata(number: int) -> dict[str, Any]:
    return {"correlation_id": f"bench-{number}", "source": "bench"}


def encode_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
