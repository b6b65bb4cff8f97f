"""publish_many rings each distinct channel of the batch once, with the batch's last id."""

from __future__ import annotations

import psycopg
from psycopg import sql

import eventlog
from eventlog import channel_for

TOPICS = ["shop:products", "shop:cart:user:7", "käse topic", "shop:products:1"]


def test_batch_rings_each_channel_once(database_url: str, log: eventlog.EventLog) -> None:
    # Topics repeat across events and within the batch; the multibyte one maps
    # to a hashed channel.
    batch = [([TOPICS[n % 3], TOPICS[(n + 1) % 3]], "imported", {"n": n}) for n in range(40)]
    batch.append(([TOPICS[3]], "imported", {"n": 40}))
    channels = {channel_for(topic, log.schema): topic for topic in TOPICS}

    with psycopg.connect(database_url, autocommit=True) as listener:
        for channel in channels:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        events = log.publish_many(batch)
        rung = [
            (channels.get(n.channel, f"unknown channel {n.channel!r}"), n.payload)
            for n in listener.notifies(timeout=30, stop_after=len(channels))
        ]
        # One doorbell per channel, not one per event: nothing else comes.
        extra = list(listener.notifies(timeout=0.5))

    assert sorted(rung) == sorted((topic, str(events[-1].id)) for topic in TOPICS)
    assert extra == []
