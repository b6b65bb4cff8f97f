"""Publishing: one event, many events, events inside the caller's transaction, and data encoding."""

from __future__ import annotations

import datetime as dt
import enum
import secrets
import uuid
from decimal import Decimal

import psycopg
import pytest
from pydantic import BaseModel

from eventlog import Event, NewEvent
from flavors import SyncFlavor, elog, table_rows  # noqa: F401  (elog is a fixture)


async def test_one_topic(elog: SyncFlavor) -> None:
    event = await elog.publish("shop:products", "product_created", {"id": 1, "name": "Mug"})

    assert isinstance(event.id, int) and event.id >= 1
    assert event.topics == ("shop:products",)
    assert event.type == "product_created"
    assert event.data == {"id": 1, "name": "Mug"}
    assert event.metadata == {}
    assert event.occurred_at.tzinfo is not None
    [stored] = await elog.read("shop:products")
    assert stored == event
    assert stored.to_json_dict() == event.to_json_dict()


async def test_several_topics(elog: SyncFlavor) -> None:
    topics = ["shop:products", "shop:products:42", "shop:inventory"]

    event = await elog.publish(topics, "product_updated", {"id": 42}, metadata={"actor": "admin"})

    assert event.topics == tuple(topics)
    assert event.metadata == {"actor": "admin"}
    for topic in topics:
        assert await elog.read(topic) == [event]


async def test_returned_event_as_readers_see_it(elog: SyncFlavor) -> None:
    # The returned event contains the data after the JSON round trip, not the caller's objects.
    ref = uuid.UUID("12345678-1234-5678-1234-567812345678")

    event = await elog.publish("t", "typed", {"price": Decimal("19.99"), "ref": ref, "tags": ("a", "b")})

    assert event.data == {"price": "19.99", "ref": str(ref), "tags": ["a", "b"]}
    assert await elog.read("t") == [event]


async def test_publish_many(elog: SyncFlavor, admin: psycopg.Connection) -> None:
    items = [
        NewEvent("a", "first", {"n": 1}),
        ("b", "second", {"n": 2}),
        {"topics": ["a", "b"], "type": "third", "data": {"n": 3}, "metadata": {"actor": "x"}},
        NewEvent(["c"], "fourth"),
    ]

    events = await elog.publish_many(items)

    assert [e.type for e in events] == ["first", "second", "third", "fourth"]
    ids = [e.id for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert events[2].metadata == {"actor": "x"}
    assert events[3].data == {}
    assert await elog.read() == events
    # One transaction: every row was written by the same one.
    xmins = admin.execute(f'SELECT DISTINCT xmin::text FROM "{elog.schema}".events').fetchall()
    assert len(xmins) == 1


async def test_publish_many_empty(elog: SyncFlavor) -> None:
    assert await elog.publish_many([]) == []
    assert await elog.head() == 0


@pytest.fixture
def orders_table(admin: psycopg.Connection, schema: str) -> str:
    """An application table beside the log, written in the same transactions."""
    admin.execute(f'CREATE TABLE "{schema}".orders (id int PRIMARY KEY, total numeric NOT NULL)')
    return f'"{schema}".orders'


async def test_transaction_commit(elog: SyncFlavor, admin: psycopg.Connection, orders_table: str) -> None:
    async with elog.transaction() as tx:
        await elog.execute(tx.connection, f"INSERT INTO {orders_table} VALUES (1, 19.99)")
        tx.publish("shop:orders", "order_placed", {"id": 1})
        tx.publish(["shop:orders", "shop:orders:1"], "order_paid", {"id": 1})
        # Buffered: other connections see nothing until commit.
        assert await elog.head() == 0

    assert [e.type for e in tx.events] == ["order_placed", "order_paid"]
    assert await elog.read() == tx.events
    rows = admin.execute(f"SELECT id, total FROM {orders_table}").fetchall()
    assert rows == [(1, Decimal("19.99"))]
    # The events were written in the application's own transaction.
    xmins = admin.execute(
        f'SELECT xmin::text FROM {orders_table} UNION SELECT xmin::text FROM "{elog.schema}".events'
    ).fetchall()
    assert len(xmins) == 1


async def test_transaction_rollback(elog: SyncFlavor, admin: psycopg.Connection, orders_table: str) -> None:
    class Refused(Exception):
        pass

    with pytest.raises(Refused):
        async with elog.transaction() as tx:
            await elog.execute(tx.connection, f"INSERT INTO {orders_table} VALUES (1, 5)")
            tx.publish("shop:orders", "order_placed", {"id": 1})
            raise Refused

    assert admin.execute(f"SELECT count(*) FROM {orders_table}").fetchone() == (0,)
    assert await elog.head() == 0
    assert tx.events == []


async def test_two_topics_stored_once(elog: SyncFlavor, admin: psycopg.Connection) -> None:
    await elog.publish("shop:cart:user:1", "before")
    event = await elog.publish(["shop:cart:user:1", "shop:cart:session:s1"], "item_added", {"sku": "A"})
    await elog.publish("shop:cart:session:s1", "after")

    assert len(table_rows(admin, elog.schema)) == 3
    both = ["shop:cart:user:1", "shop:cart:session:s1"]
    assert [e.type for e in await elog.read(both)] == ["before", "item_added", "after"]
    assert [e.id for e in await elog.replay(both, page_size=1)].count(event.id) == 1


async def test_large_payload(elog: SyncFlavor, admin: psycopg.Connection) -> None:
    # Random text barely compresses, so the row goes to TOAST storage.
    blob = secrets.token_hex(100_000)
    data = {"blob": blob, "items": [{"n": i, "text": "é日本"} for i in range(100)]}

    event = await elog.publish("big", "large", data)

    stored_size = admin.execute(f'SELECT pg_column_size(data) FROM "{elog.schema}".events').fetchone()
    assert stored_size is not None and stored_size[0] > 8000
    [read] = await elog.read("big")
    assert read.data == data
    assert read == event


class Price(BaseModel):
    amount: Decimal
    currency: str


async def test_decimal_exact(elog: SyncFlavor) -> None:
    await elog.publish("shop:products", "priced", {"amount": Decimal("19.99"), "currency": "EUR"})
    await elog.publish("shop:products", "priced", Price(amount=Decimal("0.10"), currency="EUR"))

    first, second = await elog.read("shop:products")

    assert first.data["amount"] == "19.99"
    price = first.data_as(Price)
    assert price.amount == Decimal("19.99")
    assert str(price.amount) == "19.99"
    # Trailing zeros are digits too.
    assert second.data["amount"] == "0.10"
    assert str(second.data_as(Price).amount) == "0.10"


class Status(enum.Enum):
    PAID = "paid"
    SHIPPED = "shipped"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Shipment(BaseModel):
    at: dt.datetime
    day: dt.date
    ref: uuid.UUID
    status: Status
    priority: Priority


async def test_typed_values(elog: SyncFlavor) -> None:
    at = dt.datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ref = uuid.uuid4()
    shipment = Shipment(at=at, day=dt.date(2026, 3, 4), ref=ref, status=Status.SHIPPED, priority=Priority.HIGH)

    await elog.publish("shop:shipments", "shipped", shipment.model_dump())
    [event] = await elog.read("shop:shipments")

    assert event.data == {
        "at": "2026-03-04T05:06:07.891011+02:00",
        "day": "2026-03-04",
        "ref": str(ref),
        "status": "shipped",
        "priority": 2,
    }
    restored = event.data_as(Shipment)
    assert restored == shipment
    assert restored.at.utcoffset() == dt.timedelta(hours=2)


async def test_utc_datetime(elog: SyncFlavor) -> None:
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    event = await elog.publish("t", "timed", {"at": at})

    assert event.data == {"at": "2026-01-01T00:00:00+00:00"}
    assert dt.datetime.fromisoformat(event.data["at"]) == at


async def test_event_model_is_frozen(elog: SyncFlavor) -> None:
    event = await elog.publish("t", "x")

    with pytest.raises(ValueError):
        event.type = "y"  # type: ignore[misc]
    assert isinstance(event, Event)
