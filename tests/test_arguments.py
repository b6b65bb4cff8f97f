"""Arguments of reads, queries and subscriptions are checked before any query runs."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from eventlog import EventFilter, InvalidData, InvalidQuery


def test_filter_string_is_one_topic(log):
    log.publish("abc", "product_created")
    log.publish("a", "t")

    events = list(log.query(EventFilter(topics="abc", types="product_created")))

    assert [e.topics for e in events] == [("abc",)]
    assert [e.type for e in events] == ["product_created"]


@pytest.mark.parametrize("after", [-1, 1.5, "3", True, 2**63])
def test_read_rejects_bad_cursor(log, after):
    with pytest.raises(InvalidQuery, match="invalid after_id"):
        log.read("a", after=after)


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_read_rejects_bad_limit(log, limit):
    with pytest.raises(InvalidQuery, match="invalid limit"):
        log.read("a", limit=limit)


def test_replay_rejects_zero_page_size(log):
    with pytest.raises(InvalidQuery, match="invalid page_size"):
        list(log.replay("a", page_size=0))


def test_filter_rejects_naive_time():
    with pytest.raises(InvalidQuery, match="aware datetime"):
        EventFilter(since=dt.datetime(2026, 1, 1))


def test_deep_nesting_is_invalid_data(log):
    data: list = []
    for _ in range(5000):
        data = [data]

    with pytest.raises(InvalidData, match="nested too deeply"):
        log.publish("a", "deep", data)
    assert log.head() == 0


def test_cursor_beyond_head_is_logged(log, caplog):
    log.publish("a", "t")
    caplog.set_level(logging.WARNING, logger="eventlog")

    with log.subscribe("a", after=5):
        pass

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cursor 5 is beyond the newest event id 1" in w for w in warnings)
