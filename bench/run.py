"""Command line of the benchmark: pick sizes, get a server, run, write the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from eventlog._pgserver import LocalPostgres
from eventlog._settings import redact_url

from . import batch, environment, index, latency, publish, replay, report
from .common import Section

logger = logging.getLogger("bench")

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BENCHMARKS = ("publish", "batch", "latency", "replay", "index")

# Durable settings: fsync and synchronous_commit stay on. More WAL between
# checkpoints keeps the bulk write of benchmark 4 from starting a checkpoint
# during its timed reads. The larger buffer pool keeps the replayed log in
# memory, as on a server sized for it.
SERVER_SETTINGS = {
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


@dataclass
class Sizes:
    concurrency: list[int]
    publish_seconds: float
    publish_rounds: int
    lock_seconds: float
    batch_size: int
    batch_rounds: int
    latency_rate: float
    latency_events: int
    latency_rounds: int
    replay_events: int
    replay_rounds: int
    index_events: int


FULL = Sizes(
    concurrency=[1, 4, 16],
    publish_seconds=1.0,
    publish_rounds=20,
    lock_seconds=0.5,
    batch_size=1000,
    batch_rounds=15,
    latency_rate=200,
    latency_events=1000,
    latency_rounds=3,
    replay_events=1_000_000,
    replay_rounds=3,
    index_events=10_000_000,
)

QUICK = Sizes(
    concurrency=[1, 4, 16],
    publish_seconds=0.3,
    publish_rounds=1,
    lock_seconds=0.3,
    batch_size=1000,
    batch_rounds=3,
    latency_rate=200,
    latency_events=100,
    latency_rounds=1,
    replay_events=20_000,
    replay_rounds=1,
    index_events=100_000,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark eventlog against raw psycopg on one PostgreSQL server and write a Markdown report.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute (a smoke run)")
    parser.add_argument(
        "--database-url",
        help="an existing server to use (a database is created on it and dropped afterwards); "
        "default: start a throwaway local server",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"report path (default {DEFAULT_OUTPUT})")
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)}",
    )
    parser.add_argument("--replay-events", type=int, help="events in the replayed log (full: 1,000,000)")
    parser.add_argument("--index-events", type=int, help="events in the log of the index check (full: 10,000,000)")
    parser.add_argument("--publish-seconds", type=float, help="length of one publish run, in seconds (full: 1)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"invalid --only {','.join(unknown)}: choose from {','.join(BENCHMARKS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    # Subscriptions log every catch-up at INFO; the benchmark opens many of them.
    logging.getLogger("eventlog").setLevel(logging.WARNING)
    # Alembic logs each migration of each scratch schema.
    logging.getLogger("alembic").setLevel(logging.WARNING)

    sizes = dataclasses.replace(QUICK if args.quick else FULL)
    if args.replay_events:
        sizes.replay_events = args.replay_events
    if args.index_events:
        sizes.index_events = args.index_events
    if args.publish_seconds:
        sizes.publish_seconds = args.publish_seconds

    started_at = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()
    load_before = environment.load_average()
    with _database(args.database_url) as (url, origin):
        with psycopg.connect(url) as conn:
            server = environment.server_table(conn)
            durable = environment.is_durable(conn)
        sections = [_run_one(name, url, sizes) for name in BENCHMARKS if name in args.only]

    info = report.RunInfo(
        mode="quick" if args.quick else "full",
        started=started_at.strftime("%Y-%m-%d %H:%M UTC"),
        minutes=(time.perf_counter() - started) / 60,
        load_before=load_before,
        load_after=environment.load_average(),
        durable=durable,
        server_origin=origin,
    )
    text = report.render(info, environment.machine_table(), server, sections)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    logger.info("wrote %s in %.1f min", args.output, info.minutes)


def _run_one(name: str, url: str, sizes: Sizes) -> Section:
    runners: dict[str, Callable[[], Section]] = {
        "publish": lambda: publish.run(
            url, sizes.concurrency, sizes.publish_seconds, sizes.publish_rounds, sizes.lock_seconds
        ),
        "batch": lambda: batch.run(url, sizes.batch_size, sizes.batch_rounds),
        "latency": lambda: latency.run(url, sizes.latency_rate, sizes.latency_events, sizes.latency_rounds),
        "replay": lambda: replay.run(url, sizes.replay_events, sizes.replay_rounds),
        "index": lambda: index.run(url, sizes.index_events),
    }
    logger.info("benchmark %s: starting", name)
    started = time.perf_counter()
    section = runners[name]()
    logger.info("benchmark %s: done in %.1f s", name, time.perf_counter() - started)
    return section


@contextlib.contextmanager
def _database(database_url: str | None) -> Iterator[tuple[str, str]]:
    """Yield (url, description) of a database that the run may fill and throw away."""
    if database_url is None:
        with LocalPostgres(settings=SERVER_SETTINGS) as server:
            settings = ", ".join(f"{name} = {value}" for name, value in SERVER_SETTINGS.items())
            origin = f"a throwaway LocalPostgres ({server.binaries.source} binaries) with {settings}"
            yield server.url, origin
        return

    parts = urllib.parse.urlsplit(database_url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SystemExit(
            f"invalid --database-url {redact_url(database_url)!r}: expected postgresql://user@host:port/dbname"
        )
    name = f"eventlog_bench_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SystemExit(
            f"could not create database {name} on {redact_url(database_url)}: {exc}; "
            "use a role with CREATEDB, or leave out --database-url to start a throwaway server"
        ) from None
    logger.info("created database %s on %s", name, redact_url(database_url))
    try:
        origin = f"an existing server at {parts.hostname}:{parts.port or 5432}, database {name}"
        yield urllib.parse.urlunsplit(parts._replace(path="/" + name)), origin
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        logger.info("dropped database %s", name)
