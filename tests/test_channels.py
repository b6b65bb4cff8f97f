"""The topic -> channel mapping: Python and SQL agree, names fit, and doorbells ring."""

from __future__ import annotations

import random
import re

import psycopg
import pytest
from psycopg import sql

import eventlog
from eventlog import channel_for

MAX_CHANNEL_BYTES = 63  # PostgreSQL's identifier limit, NAMEDATALEN - 1


def readable_limit(schema: str) -> int:
    """Return the maximum topic length, in bytes, that keeps the readable channel "<schema>:<topic>"."""
    return MAX_CHANNEL_BYTES - len(schema) - 1


def awkward_topics(schema: str) -> dict[str, str]:
    """Topics by name; each name says what makes the topic hard."""
    limit = readable_limit(schema)
    return {
        "plain": "shop:products",
        "ids": "shop:cart:user:42",
        "mixed case": "Shop:Products",
        "other case": "shop:PRODUCTS",
        "at readable limit": "x" * limit,
        "one byte over": "x" * (limit + 1),
        "64 bytes": "y" * 64,
        "very long": "shop:products:" + "z" * 300,
        "accent": "shop:café",
        "accent decomposed": "shop:cafe\u0301",
        "japanese": "shop:日本",
        "emoji": "shop:🛒",
        "single quote": "shop:o'brien",
        "double quote": 'shop:"quoted"',
        "space": "shop products",
        "leading space": " shop:products",
        "colons": "::a::b::",
        "backslash": "shop\\products",
        "dots and slashes": "shop/./products/../x",
        "dash underscore": "shop-cart_user",
        "trailing newline": "shop:products\n",
        "tab": "shop:\tproducts",
        "percent": "shop:100%",
        "semicolon": "shop; DROP TABLE x",
        "hash sign": "shop#products",
    }


def sql_channels(conn: psycopg.Connection, schema: str, topics: list[str]) -> list[str]:
    rows = conn.execute(
        sql.SQL("SELECT {}.channel_v1(t) FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n").format(
            sql.Identifier(schema)
        ),
        [topics],
    ).fetchall()
    return [row[0] for row in rows]


def random_topics(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    readable = "abcXYZ019_.:/-"
    other = " '\"\\#%é日🛒\nßıK\u212a\u00a0"
    topics = set()
    while len(topics) < count:
        length = rng.choice([rng.randint(1, 12), rng.randint(40, 70), rng.randint(1, 200)])
        alphabet = readable if rng.random() < 0.6 else readable + other
        topics.add("".join(rng.choice(alphabet) for _ in range(length)))
    return sorted(topics)


def test_readable_and_hashed_forms() -> None:
    assert channel_for("shop:products") == "eventlog:shop:products"
    assert channel_for("Shop:Products", "audit") == "audit:Shop:Products"
    assert re.fullmatch(r"audit#[0-9a-f]{32}", channel_for("shop products", "audit"))
    assert channel_for("shop:products", "audit") != channel_for("shop:products", "eventlog")


def test_python_and_sql_agree(admin: psycopg.Connection, schema: str) -> None:
    topics = awkward_topics(schema)
    names = list(topics)

    from_sql = sql_channels(admin, schema, list(topics.values()))

    for name, topic, channel in zip(names, topics.values(), from_sql):
        assert channel_for(topic, schema) == channel, name


def test_limit_boundary(schema: str) -> None:
    topics = awkward_topics(schema)

    assert channel_for(topics["at readable limit"], schema) == f"{schema}:{topics['at readable limit']}"
    assert len(channel_for(topics["at readable limit"], schema)) == MAX_CHANNEL_BYTES
    assert channel_for(topics["one byte over"], schema).startswith(f"{schema}#")
    assert channel_for(topics["trailing newline"], schema) != channel_for(topics["plain"], schema)


def test_channels_fit_and_differ(admin: psycopg.Connection, schema: str) -> None:
    topics = list(awkward_topics(schema).values()) + random_topics(3000, seed=20261204)
    assert len(set(topics)) == len(topics)

    channels = [channel_for(t, schema) for t in topics]

    assert all(len(c.encode("utf-8")) <= MAX_CHANNEL_BYTES for c in channels)
    assert len(set(channels)) == len(topics)
    assert sql_channels(admin, schema, topics) == channels


@pytest.mark.parametrize("schema_name", ["eventlog", "a", "_" * 30])
def test_longest_schema_name_fits(schema_name: str) -> None:
    for topic in ["x", "x" * 100, "日本"]:
        assert len(channel_for(topic, schema_name).encode()) <= MAX_CHANNEL_BYTES


def test_publish_rings_listen(database_url: str, log: eventlog.EventLog) -> None:
    topics = awkward_topics(log.schema)
    channels = {channel_for(topic, log.schema): name for name, topic in topics.items()}
    assert len(channels) == len(topics)

    with psycopg.connect(database_url, autocommit=True) as listener:
        for channel in channels:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        published = {log.publish(topic, "rung").id: name for name, topic in topics.items()}
        rung = {
            (channels.get(n.channel, f"unknown channel {n.channel!r}"), int(n.payload))
            for n in listener.notifies(timeout=30, stop_after=len(topics))
        }

    assert rung == {(name, event_id) for event_id, name in published.items()}


def test_subscription_rung_for_awkward_topics(database_url: str, log: eventlog.EventLog) -> None:
    # No poll for an hour: each event can only come through its doorbell, so the
    # listener must LISTEN on exactly the channel that publish_v1 notifies.
    topics = awkward_topics(log.schema)
    with eventlog.EventLog(database_url, schema=log.schema, poll_interval=3600) as doorbell_only:
        with doorbell_only.subscribe(list(topics.values())) as sub:
            assert sub.next_event(timeout=0.1) is None
            for name, topic in topics.items():
                event = log.publish(topic, "rung")
                assert sub.next_event(timeout=30) == event, name


def test_batch_awkward_topics_round_trip(database_url: str, log: eventlog.EventLog) -> None:
    # publish_many sends each event's topics as an array literal: quotes,
    # backslashes, braces, commas and the word NULL must come back unchanged.
    topics = {
        **awkward_topics(log.schema),
        "braces and comma": "{a,b}",
        "null word": "NULL",
        "quoted null": '"NULL"',
        "only backslashes": "\\\\",
    }
    channels = {channel_for(topic, log.schema): name for name, topic in topics.items()}
    every = list(topics.values())

    with psycopg.connect(database_url, autocommit=True) as listener:
        for channel in channels:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        batch = log.publish_many([(topic, "rung") for topic in every] + [(every, "all")])
        single = log.publish(every, "all again")
        notifies = listener.notifies(timeout=30, stop_after=2 * len(topics))
        rung = [(channels.get(n.channel, n.channel), int(n.payload)) for n in notifies]

    stored = {event.id: event.topics for event in log.replay(after=batch[0].id - 1)}
    assert [stored[event.id] for event in batch] == [(topic,) for topic in every] + [tuple(every)]
    assert stored[single.id] == tuple(every)
    # One doorbell per channel and transaction, carrying the transaction's last id.
    assert sorted(rung) == sorted([(name, batch[-1].id) for name in topics] + [(name, single.id) for name in topics])
