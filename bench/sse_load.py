"""SSE load: many browsers' event streams on one server process.

    python -m bench.sse_load [--database-url URL] [--carts 1000] [--product-clients 50]

One uvicorn process on 127.0.0.1 serves `eventlog.web.EventStream`. This process
opens one SSE stream per cart topic (``shop:cart:user:{n}``) and
`--product-clients` streams of ``shop:products``, all with httpx in one event
loop, then publishes events at a steady rate from a thread and checks that every
stream got exactly its events, in order. It reports:

* delivery latency, from just before the publish call to the moment the client
  read the event's ``id:`` line (so it includes the publish round trip and the
  client's own scheduling), p50 / p99 / max, for carts and for products;
* the server's memory per open stream: (RSS with every stream open - RSS
  before) / streams;
* the read load the streams put on PostgreSQL, in transactions per second from
  ``pg_stat_database``, while idle (only the subscriptions' periodic polls) and
  while publishing;
* how long opening every stream took, and that closing them all left no stream
  open on the server.

The section is written to docs/benchmarks-sse.md (see --output).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from eventlog import EventLog, migrate
from eventlog._settings import redact_url

from .common import percentile

logger = logging.getLogger("bench.sse_load")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks-sse.md"
PRODUCTS = "shop:products"
WAIT = 120.0  # seconds, for each phase to finish on a loaded machine


@dataclass
class Sizes:
    carts: int = 1000
    product_clients: int = 50
    cart_events: int = 3  # per cart
    product_events: int = 20
    rate: float = 300.0  # events per second, all topics together
    idle_seconds: float = 10.0
    poll_interval: float = 5.0  # the library's default
    pool_max_size: int = 10  # the library's default


@dataclass
class Client:
    topic: str
    expected: list[int] = field(default_factory=list)
    received: list[tuple[int, float]] = field(default_factory=list)
    connected: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


@dataclass
class Result:
    sizes: Sizes
    streams: int
    open_seconds: float
    rss_before_kib: int
    rss_open_kib: int
    rss_after_kib: int
    idle_tps: float
    publish_tps: float
    publish_seconds: float
    cart_latency_ms: tuple[float, float, float]
    product_latency_ms: tuple[float, float, float]
    delivered: int
    expected: int
    complete_clients: int
    left_open: int
    pool: dict
    database: str

    @property
    def kib_per_stream(self) -> float:
        return (self.rss_open_kib - self.rss_before_kib) / self.streams


# -- the server process -------------------------------------------------------------------


def serve(schema: str, poll_interval: float, pool_max_size: int) -> None:
    """Run the SSE server on an ephemeral port of 127.0.0.1; print the port on stdout."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from eventlog import AsyncEventLog
    from eventlog.web import EventStream

    raise_open_file_limit()
    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(name)s %(message)s")
    log = AsyncEventLog(schema=schema, poll_interval=poll_interval, pool_max_size=pool_max_size)
    events = EventStream(log, authorize=lambda request, topics: True)

    async def stats(request):
        pool = log._pool.get_stats() if log._pool is not None else {}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return JSONResponse({
            "active": events.active, "rss_kib": rss_kib(os.getpid()), "pool": pool,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        })

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with log:
            yield
            await events.close()

    app = Starlette(routes=[Route("/events", events), Route("/stats", stats)], lifespan=lifespan)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", backlog=4096, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_open_file_limit() -> None:
    """Each stream costs one file descriptor on each side; the soft limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def server_process(url: str, schema: str, sizes: Sizes) -> Iterator[str]:
    env = {**os.environ, "EVENTLOG_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "bench.sse_load", "--serve", "--schema", schema,
        "--poll-interval", str(sizes.poll_interval), "--pool-max-size", str(sizes.pool_max_size),
    ]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"the SSE server did not start (exit status {process.wait(10)})")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the clients ---------------------------------------------------------------------------


async def follow(http, url: str, client: Client, after: int, stop: asyncio.Event) -> None:
    """Read one stream, keeping (id, time) of each event, until it has them all or `stop`."""
    params = {"topic": client.topic, "last_event_id": after}
    try:
        async with http.stream("GET", url + "/events", params=params) as response:
            if response.status_code != 200:
                client.error = f"status {response.status_code}"
                return
            client.connected = True
            pending = b""
            async for chunk in response.aiter_raw():
                now = time.perf_counter()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.startswith(b"id: "):
                        client.received.append((int(line[4:]), now))
                if client.expected and len(client.received) >= len(client.expected):
                    client.done.set()
                if stop.is_set():
                    return
    except Exception as exc:  # recorded and reported: one broken client must not hide the others
        client.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.done.set()


def transactions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0])


def publish_steadily(log: EventLog, plan: list[str], rate: float, sent: dict[int, float]) -> float:
    """Publish one event per topic in `plan` at `rate` per second; return the seconds it took."""
    started = time.perf_counter()
    for n, topic in enumerate(plan):
        due = started + n / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        before = time.perf_counter()
        event = log.publish(topic, "load_probe", {"n": n})
        sent[event.id] = before
    return time.perf_counter() - started


def publish_plan(sizes: Sizes) -> list[str]:
    """Cart events round-robin over the carts, product events spread evenly among them."""
    carts = [f"shop:cart:user:{c}" for _ in range(sizes.cart_events) for c in range(sizes.carts)]
    if not sizes.product_events:
        return carts
    step = max(1, len(carts) // sizes.product_events)
    plan: list[str] = []
    products_left = sizes.product_events
    for n, topic in enumerate(carts):
        if n % step == 0 and products_left:
            plan.append(PRODUCTS)
            products_left -= 1
        plan.append(topic)
    plan.extend([PRODUCTS] * products_left)
    return plan


async def stats(http, url: str) -> dict:
    response = await http.get(url + "/stats")
    response.raise_for_status()
    return response.json()


async def wait_for(condition, what: str, timeout: float = WAIT, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def drive(url: str, database_url: str, schema: str, sizes: Sizes) -> Result:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    # uvicorn closes idle connections after 5 s; a request on one it is closing fails.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    timeout = httpx.Timeout(WAIT, read=None)
    async with httpx.AsyncClient(timeout=WAIT, limits=no_reuse) as control:
        http = httpx.AsyncClient(limits=limits, timeout=timeout)
        try:
            measured = await _load(http, control, url, database_url, schema, sizes)
        finally:
            await http.aclose()
        try:
            await wait_for(lambda: _no_streams(control, url), "the server to close every stream", timeout=30)
        except RuntimeError as exc:
            logger.warning("%s", exc)
        final = await stats(control, url)
    return _result(sizes, *measured, final["rss_kib"], final["active"])


async def _load(http, control, url: str, database_url: str, schema: str, sizes: Sizes) -> tuple:
    await wait_for(lambda: _responds(control, url), "the server to answer")
    rss_before = (await stats(control, url))["rss_kib"]

    with EventLog(database_url, schema=schema) as log:
        after = log.head()
    clients = [Client(f"shop:cart:user:{c}") for c in range(sizes.carts)]
    clients += [Client(PRODUCTS) for _ in range(sizes.product_clients)]
    stop = asyncio.Event()

    logger.info("opening %d streams", len(clients))
    opened_at = time.perf_counter()
    tasks = [asyncio.create_task(follow(http, url, c, after, stop)) for c in clients]

    async def all_open() -> bool:
        broken = [c.error for c in clients if c.error]
        if broken:
            raise RuntimeError(f"{len(broken)} streams failed to open, first: {broken[0]}")
        return (await stats(control, url))["active"] >= len(clients) and all(c.connected for c in clients)

    await wait_for(all_open, f"{len(clients)} open streams")
    open_seconds = time.perf_counter() - opened_at
    # The last subscriptions finish their first read just after the count is reached.
    await asyncio.sleep(2.0)
    server = await stats(control, url)
    logger.info("%d streams open in %.1f s, server RSS %d KiB", len(clients), open_seconds, server["rss_kib"])

    before = transactions(database_url)
    await asyncio.sleep(sizes.idle_seconds)
    idle_tps = (transactions(database_url) - before) / sizes.idle_seconds

    plan = publish_plan(sizes)
    sent: dict[int, float] = {}
    topics_by_id: dict[int, str] = {}
    with EventLog(database_url, schema=schema) as log:
        logger.info("publishing %d events at %g/s", len(plan), sizes.rate)
        before = transactions(database_url)
        publish_seconds = await asyncio.to_thread(publish_steadily, log, plan, sizes.rate, sent)
        publish_tps = (transactions(database_url) - before) / publish_seconds
        for event in log.read(after=after, limit=len(plan) + 1):
            topics_by_id[event.id] = event.topics[0]
    for client in clients:
        client.expected = sorted(i for i, t in topics_by_id.items() if t == client.topic)
        if len(client.received) >= len(client.expected):
            client.done.set()

    try:
        await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in clients)), WAIT)
    except asyncio.TimeoutError:
        logger.warning("not every stream got all its events within %g s", WAIT)
    rss_open = (await stats(control, url))["rss_kib"]
    pool = (await stats(control, url))["pool"]

    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    logger.info("%d streams still open on the server after the client tasks ended", (await stats(control, url))["active"])
    return (
        clients, sent, open_seconds, rss_before, max(server["rss_kib"], rss_open),
        idle_tps, publish_tps, publish_seconds, pool,
    )


async def _responds(http, url: str) -> bool:
    try:
        await stats(http, url)
    except Exception:
        return False
    return True


async def _no_streams(http, url: str) -> bool:
    return (await stats(http, url))["active"] == 0


def _result(
    sizes, clients, sent, open_seconds, rss_before, rss_open, idle_tps, publish_tps,
    publish_seconds, pool, rss_after, left_open,
) -> Result:
    cart, product = [], []
    delivered = expected = complete = 0
    for client in clients:
        ids = [i for i, _ in client.received]
        expected += len(client.expected)
        delivered += len(set(ids) & set(client.expected))
        if ids == client.expected:
            complete += 1
        elif client.error:
            logger.warning("stream of %s failed: %s", client.topic, client.error)
        bucket = product if client.topic == PRODUCTS else cart
        bucket.extend((at - sent[i]) * 1000 for i, at in client.received if i in sent)
    return Result(
        sizes=sizes, streams=len(clients), open_seconds=open_seconds,
        rss_before_kib=rss_before, rss_open_kib=rss_open, rss_after_kib=rss_after,
        idle_tps=idle_tps, publish_tps=publish_tps, publish_seconds=publish_seconds,
        cart_latency_ms=_summary(cart), product_latency_ms=_summary(product),
        delivered=delivered, expected=expected, complete_clients=complete,
        left_open=left_open, pool=pool, database="",
    )


def _summary(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    return percentile(values, 0.50), percentile(values, 0.99), max(values)


# -- running and reporting -------------------------------------------------------------------


def run(server_url: str, sizes: Sizes) -> Result:
    """Run the whole load on the server at `server_url`, in a scratch database.

    A database of its own, so that its transaction counts are the load's alone.
    """
    raise_open_file_limit()
    with scratch_database(server_url) as database_url:
        schema = "sse_load"
        migrate.upgrade(database_url, schema=schema)
        with server_process(database_url, schema, sizes) as url:
            result = asyncio.run(drive(url, database_url, schema, sizes))
        with psycopg.connect(database_url) as conn:
            result.database = "PostgreSQL " + conn.execute("SHOW server_version").fetchone()[0]
    return result


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    parts = urllib.parse.urlsplit(server_url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SystemExit(
            f"invalid database URL {redact_url(server_url)!r}: expected postgresql://user@host:port/dbname"
        )
    name = f"eventlog_sse_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urllib.parse.urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def render(result: Result) -> str:
    s = result.sizes
    cart, product = result.cart_latency_ms, result.product_latency_ms
    lines = [
        "<!-- BEGIN sse-load: written by `python -m bench.sse_load`; do not edit by hand -->",
        "## SSE streams under load",
        "",
        f"{result.streams:,} Server-Sent Events streams on one uvicorn process (`eventlog.web.EventStream`, "
        f"h11, one event loop) on 127.0.0.1: {s.carts:,} follow one cart topic each, "
        f"{s.product_clients} follow `shop:products`. The clients are httpx streams in one event loop "
        f"of a second process; a thread publishes {s.cart_events} events per cart and "
        f"{s.product_events} product events at {s.rate:g} events/s. {result.database}, "
        f"on {os.cpu_count()} cores shared by the server, the clients and PostgreSQL. "
        f"Library settings: poll_interval {s.poll_interval:g} s, pool_max_size {s.pool_max_size}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| events delivered / expected | {result.delivered:,} / {result.expected:,} |",
        f"| streams that got exactly their events, in order | {result.complete_clients:,} / {result.streams:,} |",
        f"| cart latency p50 / p99 / max | {cart[0]:.1f} / {cart[1]:.1f} / {cart[2]:.1f} ms |",
        f"| product latency p50 / p99 / max (fan-out {s.product_clients}) | "
        f"{product[0]:.1f} / {product[1]:.1f} / {product[2]:.1f} ms |",
        f"| time to open every stream | {result.open_seconds:.1f} s |",
        f"| server RSS before / with every stream open / after closing them | "
        f"{result.rss_before_kib / 1024:.1f} / {result.rss_open_kib / 1024:.1f} / "
        f"{result.rss_after_kib / 1024:.1f} MiB |",
        f"| memory per stream (RSS delta / streams) | {result.kib_per_stream:.1f} KiB |",
        f"| database transactions/s, idle (periodic polls) | {result.idle_tps:.0f} |",
        f"| database transactions/s, while publishing | {result.publish_tps:.0f} |",
        f"| streams still open on the server after the clients left | {result.left_open} |",
        "",
        "Latency runs from just before the publish call to the moment the client read the "
        "event's `id:` line, so it includes the publish round trip and the client's own event "
        "loop. Every subscription reads from its cursor through the log's connection pool "
        f"(at most {s.pool_max_size} connections); the one listener connection only rings "
        "doorbells. A product event rings 50 subscriptions, which then read in turns through "
        "the pool: that queue is the product latency's extra. While idle, each subscription "
        f"polls once per poll_interval, about {result.streams / s.poll_interval:.0f} reads/s for "
        f"{result.streams:,} streams; a longer poll_interval cuts that, at the price of a later "
        "catch-up when a doorbell is lost.",
        "<!-- END sse-load -->",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_load", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="an existing server; default: start a throwaway local one")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"report path (default {DEFAULT_OUTPUT})")
    parser.add_argument("--carts", type=int, default=Sizes.carts, help="streams that follow one cart each")
    parser.add_argument("--product-clients", type=int, default=Sizes.product_clients, help="streams of shop:products")
    parser.add_argument("--rate", type=float, default=Sizes.rate, help="events published per second")
    parser.add_argument("--poll-interval", type=float, default=Sizes.poll_interval)
    parser.add_argument("--pool-max-size", type=int, default=Sizes.pool_max_size)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(args.schema, args.poll_interval, args.pool_max_size)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("eventlog").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sizes = Sizes(
        carts=args.carts, product_clients=args.product_clients, rate=args.rate,
        poll_interval=args.poll_interval, pool_max_size=args.pool_max_size,
    )
    with _database(args.database_url) as url:
        result = run(url, sizes)
    text = render(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    if result.complete_clients != result.streams:
        raise SystemExit(f"{result.streams - result.complete_clients} streams missed events")


@contextlib.contextmanager
def _database(database_url: str | None) -> Iterator[str]:
    if database_url is not None:
        logger.info("using %s", redact_url(database_url))
        yield database_url
        return
    from eventlog._pgserver import LocalPostgres

    with LocalPostgres() as server:
        yield server.url


if __name__ == "__main__":
    main()
