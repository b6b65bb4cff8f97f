"""Events built from rows without validation must equal validated ones."""

from __future__ import annotations

import datetime as dt
import json

import pydantic
import pytest

from eventlog import Event
from eventlog._sql import EncodedEvent, event_from_row, stored_events

OCCURRED_AT = dt.datetime(2026, 12, 4, 12, 30, tzinfo=dt.timezone.utc)
ROW = (7, ["shop:cart:user:1", "shop:products"], "item_added", {"sku": "A-1", "price": "19.99"}, {"actor": "u1"}, OCCURRED_AT)


def validated() -> Event:
    return Event.model_validate(
        {
            "id": 7,
            "topics": ("shop:cart:user:1", "shop:products"),
            "type": "item_added",
            "data": {"sku": "A-1", "price": "19.99"},
            "metadata": {"actor": "u1"},
            "occurred_at": OCCURRED_AT,
        }
    )


def test_row_event_equals_validated():
    event = event_from_row(ROW)
    expected = validated()

    assert event == expected
    assert event.model_dump() == expected.model_dump()
    assert event.model_fields_set == expected.model_fields_set
    assert isinstance(event.topics, tuple)


def test_row_event_stays_frozen():
    event = event_from_row(ROW)

    with pytest.raises(pydantic.ValidationError):
        event.id = 8  # type: ignore[misc]
    assert event.model_copy(update={"id": 8}).id == 8
    assert event.id == 7


def test_stored_event_equals_validated():
    encoded = EncodedEvent(
        topics=("shop:cart:user:1", "shop:products"),
        type="item_added",
        data='{"sku":"A-1","price":"19.99"}',
        metadata='{"actor":"u1"}',
    )

    assert encoded.stored(7, OCCURRED_AT) == validated()


def test_row_events_do_not_share_fields_set():
    first, second = event_from_row(ROW), event_from_row(ROW)

    assert first.model_fields_set is not second.model_fields_set


def test_stored_events_match_one_by_one():
    values = [{"sku": "A-1"}, [1, 2.5, None], "käse \u2603", 0, None, {}, {"nested": {"a": [True, False]}}]
    encoded = [
        EncodedEvent(topics=(f"t{i}",), type="x", data=json.dumps(value, ensure_ascii=False), metadata=json.dumps({"n": i}))
        for i, value in enumerate(values)
    ]
    rows = [(100 + i, OCCURRED_AT) for i in range(len(values))]

    events = stored_events(encoded, rows)

    assert events == [e.stored(row[0], row[1]) for e, row in zip(encoded, rows)]
    assert [event.data for event in events] == values
