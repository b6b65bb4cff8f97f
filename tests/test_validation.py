"""Invalid input: the right error, a message that names the value, and nothing written."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import traceback
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import eventlog
from eventlog import (
    MAX_TOPIC_BYTES,
    MAX_TOPICS_PER_EVENT,
    MAX_TYPE_BYTES,
    ConfigurationError,
    ConnectionFailed,
    DataTooLarge,
    EventLog,
    InvalidData,
    InvalidEvent,
    InvalidEventType,
    InvalidTopic,
    NewEvent,
    Settings,
)
from eventlog import migrate
from flavors import TEST_OPTIONS, SyncFlavor, elog  # noqa: F401  (elog is a fixture)

NAIVE = dt.datetime(2026, 1, 2, 3, 4, 5)
TOO_LONG_TOPIC = "é" * (MAX_TOPIC_BYTES // 2 + 1)  # few characters, too many bytes


def bad(name: str, error: type[Exception], named: str, **fields: Any) -> Any:
    """A publish call that must raise `error` with `named` in the message."""
    call = {"topics": "t", "type": "e", "data": {"ok": True}, "metadata": None, **fields}
    return pytest.param(call, error, named, id=name)


INVALID = [
    # topics
    bad("topic-empty", InvalidTopic, "''", topics=""),
    bad("topic-empty-in-list", InvalidTopic, "''", topics=["ok", ""]),
    bad("topic-nul", InvalidTopic, r"'a\x00b'", topics="a\x00b"),
    bad("topic-bytes-over", InvalidTopic, f"{MAX_TOPIC_BYTES + 2} bytes", topics=TOO_LONG_TOPIC),
    bad("topic-int", InvalidTopic, "42", topics=42),
    bad("topic-none-in-list", InvalidTopic, "None", topics=["ok", None]),
    bad("topic-bytes-object", InvalidTopic, "b'raw'", topics=b"raw"),
    bad("topic-surrogate", InvalidTopic, r"'\ud800'", topics="\ud800"),
    bad("no-topics", InvalidTopic, "no topic", topics=[]),
    bad(
        "too-many-topics", InvalidTopic, str(MAX_TOPICS_PER_EVENT + 1),
        topics=[f"t{i}" for i in range(MAX_TOPICS_PER_EVENT + 1)],
    ),
    # type
    bad("type-empty", InvalidEventType, "''", type=""),
    bad("type-blank", InvalidEventType, "'  \\t '", type="  \t "),
    bad("type-nul", InvalidEventType, r"'a\x00'", type="a\x00"),
    bad("type-over", InvalidEventType, f"{MAX_TYPE_BYTES + 1} bytes", type="x" * (MAX_TYPE_BYTES + 1)),
    bad("type-bytes-over", InvalidEventType, f"{MAX_TYPE_BYTES + 1} bytes", type="é" * (MAX_TYPE_BYTES // 2 + 1)),
    bad("type-int", InvalidEventType, "42", type=42),
    bad("type-none", InvalidEventType, "None", type=None),
    # data
    bad("data-object", InvalidData, "<object object", data={"a": object()}),
    bad("data-set", InvalidData, "{1, 2}", data={"a": {1, 2}}),
    bad("data-bytes", InvalidData, "b'raw'", data={"a": b"raw"}),
    bad("data-naive-datetime", InvalidData, "2026-01-02T03:04:05", data={"at": NAIVE}),
    bad("data-nan", InvalidData, "nan", data={"x": float("nan")}),
    bad("data-inf", InvalidData, "-inf in data['a'][1]", data={"a": [1, float("-inf")]}),
    bad("data-decimal-nan", InvalidData, "NaN", data={"x": Decimal("NaN")}),
    bad("data-decimal-inf", InvalidData, "Infinity", data={"x": Decimal("Infinity")}),
    bad("data-nul", InvalidData, r"'x\x00y' in data['s']", data={"s": "x\x00y"}),
    bad("data-nul-key", InvalidData, r"'k\x00'", data={"k\x00": 1}),
    bad("data-surrogate", InvalidData, r"'\udc00'", data=["\udc00"]),
    # metadata
    bad("metadata-str", InvalidData, "'actor'", metadata="actor"),
    bad("metadata-list", InvalidData, "[1]", metadata=[1]),
    bad("metadata-object", InvalidData, "<object object", metadata={"a": object()}),
    bad("metadata-naive-datetime", InvalidData, "2026-01-02T03:04:05", metadata={"at": NAIVE}),
    bad("metadata-nul", InvalidData, r"'\x00'", metadata={"actor": "\x00"}),
]

GOOD = NewEvent("t", "good", {"n": 1})


@pytest.fixture(scope="module")
def schema(database_url: str) -> Iterator[str]:
    """One log for the whole module: every test here checks that nothing is written."""
    name = f"validation_{uuid.uuid4().hex[:8]}"
    migrate.upgrade(database_url, schema=name)
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.mark.parametrize("call, error, named", INVALID)
async def test_rejected(elog: SyncFlavor, call: dict[str, Any], error: type[Exception], named: str) -> None:
    await elog.publish("t", "before")
    head = await elog.head()

    with pytest.raises(error) as raised:
        await elog.publish(call["topics"], call["type"], call["data"], metadata=call["metadata"])
    assert named in str(raised.value)
    assert isinstance(raised.value, InvalidEvent)
    assert await elog.head() == head

    # One bad event among good ones: none is written.
    batch = [GOOD, GOOD, dict(call), GOOD]
    with pytest.raises(error) as raised:
        await elog.publish_many(batch)
    assert named in str(raised.value)
    assert await elog.head() == head


async def test_rejected_in_transaction(elog: SyncFlavor, admin: psycopg.Connection) -> None:
    admin.execute(f'CREATE TABLE IF NOT EXISTS "{elog.schema}".orders (id int PRIMARY KEY)')
    head = await elog.head()

    with pytest.raises(InvalidData, match="2026-01-02T03:04:05"):
        async with elog.transaction() as tx:
            await elog.execute(tx.connection, f'INSERT INTO "{elog.schema}".orders VALUES (1)')
            tx.publish("shop:orders", "order_placed", {"id": 1})
            tx.publish("shop:orders", "order_dated", {"at": NAIVE})

    assert admin.execute(f'SELECT count(*) FROM "{elog.schema}".orders').fetchone() == (0,)
    assert await elog.head() == head


@pytest.mark.parametrize(
    "item, named",
    [
        pytest.param(42, "42", id="int"),
        pytest.param(("only-a-topic",), "only-a-topic", id="short-tuple"),
        pytest.param({"topic": "t", "type": "e"}, "topic", id="unknown-key"),
    ],
)
async def test_rejected_batch_item(elog: SyncFlavor, item: Any, named: str) -> None:
    head = await elog.head()

    with pytest.raises(InvalidEvent) as raised:
        await elog.publish_many([GOOD, item, GOOD])

    assert named in str(raised.value)
    assert await elog.head() == head


async def test_limits_accepted(elog: SyncFlavor) -> None:
    # Exactly at each limit: accepted, and counted in bytes.
    topic = "é" * (MAX_TOPIC_BYTES // 2)
    event_type = "é" * (MAX_TYPE_BYTES // 2) + "x"
    topics = [f"t{i}" for i in range(MAX_TOPICS_PER_EVENT)]

    first = await elog.publish(topic, event_type)
    second = await elog.publish(topics + topics, "many")  # duplicates count once

    assert first.topics == (topic,)
    assert first.type == event_type
    assert second.topics == tuple(topics)
    # A backslash followed by "u0000" is text, not a NUL character.
    third = await elog.publish("t", "path", {"path": "C:\\u0000dir"})
    assert (await elog.read("t", after=third.id - 1))[0].data == third.data == {"path": "C:\\u0000dir"}


async def test_data_size_limit(elog: SyncFlavor) -> None:
    small = await elog.other(max_data_bytes=100)

    # The JSON text of a string is the string and two quotes.
    await small.publish("t", "fits", "x" * 98)
    await small.publish("t", "fits", "é" * 49)
    head = await small.head()
    with pytest.raises(DataTooLarge) as raised:
        await small.publish("t", "too_big", "é" * 50)  # 50 characters, 102 bytes

    assert (raised.value.size, raised.value.limit) == (102, 100)
    assert "102 bytes" in str(raised.value)
    assert "100 bytes" in str(raised.value)
    with pytest.raises(DataTooLarge, match="metadata"):
        await small.publish("t", "too_big", metadata={"note": "x" * 100})
    with pytest.raises(DataTooLarge):
        await small.publish_many([GOOD, NewEvent("t", "too_big", "x" * 99)])
    assert await small.head() == head


async def test_default_data_size_limit(elog: SyncFlavor) -> None:
    assert Settings().max_data_bytes == 1024 * 1024
    assert elog.log.settings.max_data_bytes == 1024 * 1024

    fits = await elog.publish("t", "fits", "x" * (1024 * 1024 - 2))
    with pytest.raises(DataTooLarge) as raised:
        await elog.publish("t", "too_big", "x" * (1024 * 1024 - 1))

    assert raised.value.limit == 1024 * 1024
    assert await elog.head() == fits.id


# -- configuration ---------------------------------------------------------------------

LOG_CLASSES = [pytest.param(EventLog, id="sync"), pytest.param(eventlog.AsyncEventLog, id="async")]
PASSWORD = "s3cret-pass"


@pytest.mark.parametrize("log_class", LOG_CLASSES)
def test_missing_url(log_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTLOG_DATABASE_URL", raising=False)

    with pytest.raises(ConfigurationError, match="EVENTLOG_DATABASE_URL"):
        log_class()
    with pytest.raises(ConfigurationError, match="EVENTLOG_DATABASE_URL"):
        migrate.upgrade(schema="anything")


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    monkeypatch.setenv("EVENTLOG_DATABASE_URL", database_url)
    monkeypatch.setenv("EVENTLOG_SCHEMA", schema)

    with EventLog(**TEST_OPTIONS) as log:
        event = log.publish("t", "from_env")
        assert log.read(after=event.id - 1) == [event]


@pytest.mark.parametrize("log_class", LOG_CLASSES)
@pytest.mark.parametrize("name", ["Bad-Name", "1abc", "a" * 31, "", "pg temp", 'x"y'])
def test_invalid_schema(log_class: type, name: str, database_url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        log_class(database_url, schema=name)

    assert repr(name) in str(raised.value)
    assert "lower-case" in str(raised.value)


def test_invalid_schema_from_environment(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    monkeypatch.setenv("EVENTLOG_SCHEMA", "Shop")

    with pytest.raises(ConfigurationError, match="EVENTLOG_SCHEMA.*'Shop'"):
        EventLog(database_url)
    with pytest.raises(ConfigurationError, match="'Shop'"):
        migrate.upgrade(database_url)


def test_invalid_setting() -> None:
    with pytest.raises(ConfigurationError, match="poll_interval.*-1"):
        EventLog(f"postgresql://app:{PASSWORD}@localhost/app", poll_interval=-1)


def secret_free(*texts: str) -> bool:
    return not any(PASSWORD in text for text in texts)


def exception_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


def record_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter()
    return [formatter.format(record) for record in caplog.records]


@pytest.mark.parametrize("log_class", LOG_CLASSES)
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@localhost:5432/app?nosuch=1",
        f"postgresql://app:{PASSWORD}@local host/app",
        f"host=localhost password={PASSWORD} nosuch=1",
        f"mysql://app:{PASSWORD}@localhost/app",
        # Malformed URLs that a redactor cannot parse: the value must not be shown.
        f"app:{PASSWORD}@127.0.0.1:5432/app",
        f"postgresql:/app:{PASSWORD}@127.0.0.1/app",
        f"host=127.0.0.1 password='{PASSWORD} x",
    ],
)
def test_bad_url(log_class: type, url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    with pytest.raises(ConfigurationError) as raised:
        log_class(url)

    assert "invalid database URL" in str(raised.value)
    assert "not shown" in str(raised.value)
    assert secret_free(*exception_texts(raised.value), *record_texts(caplog))


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_password_hidden_when_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{unused_port()}/app"
    texts = []

    with EventLog(url, connect_timeout=1.0) as log:
        texts += [repr(log), repr(log.settings), str(log.settings), log.settings.model_dump_json()]
        with pytest.raises(ConnectionFailed) as raised:
            log.publish("t", "e")
        texts += exception_texts(raised.value)
        assert "***" in str(raised.value)
    async with eventlog.AsyncEventLog(url, connect_timeout=1.0) as alog:
        texts.append(repr(alog))
        with pytest.raises(ConnectionFailed) as raised:
            await alog.head()
        texts += exception_texts(raised.value)
    with pytest.raises(Exception) as raised:
        migrate.upgrade(url, schema="unreachable")
    texts += exception_texts(raised.value)

    assert texts and secret_free(*texts, *record_texts(caplog))
