"""Replay: reading by id, page by page, with topic, type and time filters; and the query plans."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import eventlog
from eventlog import Event, EventFilter, migrate
from eventlog._sql import select_events
from flavors import TEST_OPTIONS, SyncFlavor, elog  # noqa: F401  (elog is a fixture)

TOPICS = ["a", "b", "c"]


async def fill(elog: SyncFlavor, count: int = 30) -> list[Event]:
    """Publish `count` events round-robin over TOPICS, plus one on both a and c."""
    events = []
    for i in range(count):
        kind = "created" if i % 2 else "updated"
        events.append(await elog.publish(TOPICS[i % 3], kind, {"i": i}))
    events.append(await elog.publish(["a", "c"], "linked", {"i": count}))
    return events


def of(events: list[Event], topics: list[str], after: int = 0, until: int | None = None) -> list[Event]:
    return [
        e for e in events
        if set(e.topics) & set(topics) and e.id > after and (until is None or e.id <= until)
    ]


def assert_ascending(events: list[Event]) -> None:
    ids = [e.id for e in events]
    assert all(a < b for a, b in zip(ids, ids[1:])), ids


@pytest.mark.parametrize("page_size", [1, 4, 5, 500])
async def test_replay_pages(elog: SyncFlavor, page_size: int) -> None:
    events = await fill(elog)
    after = events[3].id

    replayed = await elog.replay(["a"], after=after, page_size=page_size)

    assert_ascending(replayed)
    assert replayed == of(events, ["a"], after)
    assert len(replayed) == 9  # 8 round-robin events after the cursor, and the linked one


async def test_replay_until(elog: SyncFlavor) -> None:
    events = await fill(elog)
    after, until = events[2].id, events[20].id

    replayed = await elog.replay(["a", "b"], after=after, until=until, page_size=3)

    assert replayed == of(events, ["a", "b"], after, until)
    assert replayed[-1].id <= until


async def test_replay_everything(elog: SyncFlavor) -> None:
    events = await fill(elog)

    assert await elog.replay(page_size=7) == events
    assert await elog.replay(after=events[-1].id) == []
    assert await elog.replay(until=0) == []


async def test_topic_filter(elog: SyncFlavor) -> None:
    events = await fill(elog)

    assert await elog.replay("b") == of(events, ["b"])
    assert all(e.topics == ("b",) for e in await elog.replay("b"))
    assert await elog.replay(["c"]) == of(events, ["c"])
    assert await elog.replay("nobody-publishes-here") == []
    assert await elog.read("nobody-publishes-here") == []


async def test_read_one_page(elog: SyncFlavor) -> None:
    events = await fill(elog)
    after = events[5].id

    page = await elog.read(["a", "c"], after=after, limit=4)

    assert page == of(events, ["a", "c"], after)[:4]
    assert await elog.read(limit=3) == events[:3]
    assert await elog.read() == events  # default page: batch_size, larger than the log


async def test_read_default_page_is_batch_size(elog: SyncFlavor) -> None:
    small = await elog.other(batch_size=4)
    events = await fill(small, count=10)

    assert await small.read() == events[:4]
    assert await small.replay() == events  # replay goes on past one page


async def test_head(elog: SyncFlavor) -> None:
    assert await elog.head() == 0

    events = await fill(elog, count=5)

    assert await elog.head() == events[-1].id


async def test_query(elog: SyncFlavor) -> None:
    events = await fill(elog)
    since, until = events[4].occurred_at, events[25].occurred_at

    found = await elog.query(EventFilter(types=["created", "linked"], since=since, until=until), page_size=3)

    expected = [
        e for e in events if e.type in ("created", "linked") and since <= e.occurred_at < until
    ]
    assert found == expected
    assert len(found) == 10  # odd i from 5 to 23; `until` is exclusive, the linked event is later


async def test_query_all_conditions(elog: SyncFlavor) -> None:
    events = await fill(elog)
    where = EventFilter(
        topics=["a", "b"], types=["updated"], after_id=events[1].id, until_id=events[20].id,
        since=events[0].occurred_at,
    )

    found = await elog.query(where, page_size=2)

    expected = [e for e in of(events, ["a", "b"], events[1].id, events[20].id) if e.type == "updated"]
    assert found
    assert found == expected


# -- query plans -----------------------------------------------------------------------

ROWS = 200_000
SPARSE_EVERY = 10_000  # 20 events of the sparse topic in the whole log


@pytest.fixture(scope="module")
def big_schema(database_url: str) -> Iterator[str]:
    """A log of 200k events in which the topic "sparse" has 20."""
    name = f"plans_{uuid.uuid4().hex[:8]}"
    migrate.upgrade(database_url, schema=name)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.events (topics, type, data) "
                "SELECT CASE WHEN g % {} = 0 THEN ARRAY['sparse', 'dense:' || g % 7] "
                "            ELSE ARRAY['dense:' || g % 7] END, "
                "       'generated', jsonb_build_object('g', g) "
                "FROM generate_series(1, {}) AS g"
            ).format(sql.Identifier(name), SPARSE_EVERY, ROWS)
        )
        conn.execute(sql.SQL("ANALYZE {}.events").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def plan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    if isinstance(plan, dict):
        if "Node Type" in plan:
            yield plan
        for value in plan.values():
            yield from plan_nodes(value)
    elif isinstance(plan, list):
        for item in plan:
            yield from plan_nodes(item)


def explain(conn: psycopg.Connection, query: sql.Composable, params: list[Any]) -> list[dict[str, Any]]:
    row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()
    assert row is not None
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return list(plan_nodes(plan))


def uses_index(nodes: list[dict[str, Any]], index: str) -> bool:
    return any(node.get("Index Name") == index for node in nodes)


def seq_scans(nodes: list[dict[str, Any]]) -> list[str]:
    return [node.get("Relation Name", "?") for node in nodes if node["Node Type"] == "Seq Scan"]


@pytest.mark.parametrize("after", [0, ROWS // 2])
def test_sparse_topic_uses_topics_index(admin: psycopg.Connection, big_schema: str, after: int) -> None:
    query, params = select_events(big_schema, EventFilter(topics=["sparse"], after_id=after), 500)

    nodes = explain(admin, query, params)

    assert uses_index(nodes, "events_topics_idx"), nodes
    assert seq_scans(nodes) == []


def test_all_topics_page_uses_primary_key(admin: psycopg.Connection, big_schema: str) -> None:
    query, params = select_events(big_schema, EventFilter(after_id=ROWS // 2), 500)

    nodes = explain(admin, query, params)

    assert uses_index(nodes, "events_pkey"), nodes
    assert seq_scans(nodes) == []


def test_sparse_topic_read(database_url: str, big_schema: str) -> None:
    with eventlog.EventLog(database_url, schema=big_schema, **TEST_OPTIONS) as log:
        events = list(log.replay("sparse", page_size=7))

    assert [e.data["g"] for e in events] == list(range(SPARSE_EVERY, ROWS + 1, SPARSE_EVERY))


def test_plan_after_many_reads(database_url: str, big_schema: str) -> None:
    # Drivers prepare a statement run often on one connection, and PostgreSQL may
    # then switch to a generic plan that ignores the topic's rarity and scans the
    # primary key through the whole log. Every statement the log's connection
    # keeps prepared must still use the topics index for a sparse topic.
    with eventlog.EventLog(
        database_url, schema=big_schema, pool_min_size=1, pool_max_size=1, **TEST_OPTIONS
    ) as log:
        for _ in range(20):
            assert len(log.read("sparse")) == ROWS // SPARSE_EVERY
        with log.connection() as conn:
            prepared = conn.execute(
                "SELECT name, parameter_types::text[] FROM pg_prepared_statements "
                "WHERE statement LIKE %s",
                ["%topics && %"],
            ).fetchall()
            plans = [explain_prepared(conn, name, types) for name, types in prepared]

    for nodes in plans:
        assert uses_index(nodes, "events_topics_idx"), nodes
        assert seq_scans(nodes) == []


def explain_prepared(conn: psycopg.Connection, name: str, types: list[str]) -> list[dict[str, Any]]:
    # The parameters of a read: after id, topics, limit.
    assert len(types) == 3, types
    values = sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(kind))
        for value, kind in zip(["0", "{sparse}", "500"], types)
    )
    row = conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(sql.Identifier(name), values)
    ).fetchone()
    assert row is not None
    return list(plan_nodes(row[0]))
