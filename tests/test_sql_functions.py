"""The SQL functions publish_v1 and publish_batch_v1 check events as the Python library does.

Each rejected call must raise InvalidParameterValue (SQLSTATE 22023) with a
message that names the value, and store nothing. Calls go through plain psycopg,
as a service in another language or a psql session would make them.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import psycopg
import psycopg.errors
import pytest

import eventlog
from eventlog import InvalidEvent, NewEvent
from eventlog._encoding import MAX_TOPIC_BYTES, MAX_TOPICS_PER_EVENT, MAX_TYPE_BYTES
from eventlog._settings import MAX_DATA_BYTES
from eventlog._sql import encode_event

LONG_TOPIC = "x" * (MAX_TOPIC_BYTES + 88)
# Fewer characters than MAX_TOPIC_BYTES, but more bytes in UTF-8.
WIDE_TOPIC = "é" * (MAX_TOPIC_BYTES // 2 + 1)
TOO_MANY_TOPICS = [f"t{i}" for i in range(MAX_TOPICS_PER_EVENT + 6)]
# The migration that creates the functions, for its WHITESPACE pattern.
MIGRATION = importlib.import_module("eventlog._migrations.versions.0001_create_event_log")

# Characters for which str.isspace() is false, though some render as blanks.
NOT_WHITESPACE = ["\u200b", "\u180e", "\ufeff", "\u2060", "\x1b", "\x7f", "_"]
AWKWARD_TOPICS = ['say "hi"', "back\\slash", "{braces}", "NULL", "a,b", " padded ", "käse", "é:ü/ß"]

DATA = '{"n": 1}'
METADATA_REASON = 'expected a JSON object such as {"correlation_id": "...", "actor": "..."}'
LONG_METADATA = list(range(40))


def publish(
    conn: psycopg.Connection,
    schema: str,
    topics: Any,
    event_type: Any,
    data: str | None = DATA,
    metadata: str | None = "{}",
) -> int:
    """Call publish_v1 with `data` and `metadata` as JSON text (None as SQL NULL) and return the new id."""
    row = conn.execute(
        f'SELECT id FROM "{schema}".publish_v1(%s::text[], %s::text, %s::jsonb, %s::jsonb)',
        [topics, event_type, data, metadata],
    ).fetchone()
    assert row is not None
    return row[0]


def publish_batch(
    conn: psycopg.Connection,
    schema: str,
    topics: Any,
    types: list[Any],
    data: list[str | None] | None = None,
    metadata: list[str | None] | None = None,
) -> list[int]:
    """Call publish_batch_v1 with `topics` as JSON (None as SQL NULL) and return the ids.

    `data` and `metadata` give each event's JSON text, with None as SQL NULL. By
    default each event gets {"n": <position>} and {}.
    """
    rows = conn.execute(
        f'SELECT id FROM "{schema}".publish_batch_v1(%s::jsonb, %s::text[], %s::jsonb[], %s::jsonb[])',
        [
            None if topics is None else json.dumps(topics),
            types,
            [json.dumps({"n": n}) for n in range(len(types))] if data is None else data,
            ["{}"] * len(types) if metadata is None else metadata,
        ],
    ).fetchall()
    return [row[0] for row in rows]


def stored(conn: psycopg.Connection, schema: str) -> list[tuple[list[str], str]]:
    """Return the topics and type of every stored event, in id order."""
    return [
        (row[0], row[1])
        for row in conn.execute(f'SELECT topics, type FROM "{schema}".events ORDER BY id').fetchall()
    ]


def stored_payloads(conn: psycopg.Connection, schema: str) -> list[tuple[Any, Any]]:
    """Return the data and metadata of every stored event, in id order."""
    return [
        (row[0], row[1])
        for row in conn.execute(f'SELECT data, metadata FROM "{schema}".events ORDER BY id').fetchall()
    ]


def stored_count(conn: psycopg.Connection, schema: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()
    assert row is not None
    return row[0]


def invalid(
    name: str,
    topics: Any,
    event_type: Any,
    subject: str,
    reason: str,
    batch: tuple[str, str] | None = None,
    *,
    data: str = DATA,
    metadata: str = "{}",
) -> Any:
    batch_subject, batch_reason = batch or (subject, reason)
    return pytest.param(
        topics, event_type, data, metadata, subject, reason, batch_subject, batch_reason, id=name
    )


def cut(text: str) -> str:
    """Return the long value `text` as a message quotes it, cut to 77 characters and "..."."""
    return f'"{text[:77]}..."'


# Events that eventlog._encoding rejects, or stores with {} in place of JSON null.
# publish_v1's message is "<subject>: <reason>", and publish_batch_v1 puts the
# event's position after the subject. `batch` gives publish_batch_v1's subject
# and reason where they differ. `data` and `metadata` are JSON text.
INVALID_EVENTS = [
    invalid("topic-empty", ["ok", ""], "t", 'invalid topic ""', "a topic must not be empty"),
    invalid(
        "topic-null", ["ok", None], "t", "invalid topic NULL", "expected a string",
        batch=("invalid topic null", "expected a JSON string"),
    ),
    invalid(
        "topic-over", ["ok", LONG_TOPIC], "t", f"invalid topic {cut(LONG_TOPIC)}",
        f"{len(LONG_TOPIC)} bytes in UTF-8, the maximum is {MAX_TOPIC_BYTES}",
    ),
    invalid(
        "topic-bytes-over", [WIDE_TOPIC], "t", f"invalid topic {cut(WIDE_TOPIC)}",
        f"{MAX_TOPIC_BYTES + 2} bytes in UTF-8, the maximum is {MAX_TOPIC_BYTES}",
    ),
    invalid("no-topics", [], "t", "no topic given", "an event needs at least one topic"),
    invalid("topics-null", None, "t", "no topic given", "an event needs at least one topic"),
    invalid(
        "too-many-topics", TOO_MANY_TOPICS, "t", f"too many topics ({len(TOO_MANY_TOPICS)} distinct)",
        f"an event may have at most {MAX_TOPICS_PER_EVENT}",
    ),
    invalid("type-empty", ["ok"], "", 'invalid event type ""', "it must contain a visible character"),
    invalid("type-space", ["ok"], " ", 'invalid event type " "', "it must contain a visible character"),
    invalid("type-tab", ["ok"], "\t", r'invalid event type "\t"', "it must contain a visible character"),
    invalid("type-newline", ["ok"], "\n", r'invalid event type "\n"', "it must contain a visible character"),
    invalid(
        "type-mixed-blanks", ["ok"], " \t\r\n\u00a0\u3000", 'invalid event type " \\t\\r\\n\u00a0\u3000"',
        "it must contain a visible character",
    ),
    invalid("type-null", ["ok"], None, "invalid event type NULL", "expected a string"),
    invalid(
        "type-over", ["ok"], "x" * (MAX_TYPE_BYTES + 1), f"invalid event type {cut('x' * MAX_TYPE_BYTES)}",
        f"{MAX_TYPE_BYTES + 1} bytes in UTF-8, the maximum is {MAX_TYPE_BYTES}",
    ),
    invalid(
        "type-bytes-over", ["ok"], "é" * (MAX_TYPE_BYTES // 2 + 1), f"invalid event type {cut('é' * MAX_TYPE_BYTES)}",
        f"{MAX_TYPE_BYTES + 1} bytes in UTF-8, the maximum is {MAX_TYPE_BYTES}",
    ),
    invalid(
        "data-null", ["ok"], "t", "invalid event data null", "JSON null is not allowed; pass {} or omit data",
        batch=("invalid event data null", "JSON null is not allowed; pass {} instead"), data="null",
    ),
    invalid("metadata-array", ["ok"], "t", "invalid event metadata []", METADATA_REASON, metadata="[]"),
    invalid("metadata-string", ["ok"], "t", 'invalid event metadata "x"', METADATA_REASON, metadata='"x"'),
    invalid("metadata-number", ["ok"], "t", "invalid event metadata 7", METADATA_REASON, metadata="7"),
    invalid("metadata-boolean", ["ok"], "t", "invalid event metadata true", METADATA_REASON, metadata="true"),
    invalid("metadata-null", ["ok"], "t", "invalid event metadata null", METADATA_REASON, metadata="null"),
    invalid(
        "metadata-long-array", ["ok"], "t", f"invalid event metadata {json.dumps(LONG_METADATA)[:77]}...",
        METADATA_REASON, metadata=json.dumps(LONG_METADATA),
    ),
    # The first problem is named, in the order topics, type, data, metadata.
    invalid(
        "type-before-data", ["ok"], "", 'invalid event type ""', "it must contain a visible character",
        data="null", metadata="[]",
    ),
    invalid(
        "data-before-metadata", ["ok"], "t", "invalid event data null",
        "JSON null is not allowed; pass {} or omit data",
        batch=("invalid event data null", "JSON null is not allowed; pass {} instead"), data="null", metadata="[]",
    ),
]

INVALID_EVENT_FIELDS = "topics, event_type, data, metadata, subject, reason, batch_subject, batch_reason"


def library_rejects(topics: Any, event_type: Any, data: str, metadata: str) -> None:
    """Check that the Python library rejects the event too, or stores {} in place of its JSON null.

    JSON null is Python's None, which the library stores as {} in data and metadata.
    """
    try:
        encoded = encode_event(NewEvent(topics, event_type, json.loads(data), json.loads(metadata)), MAX_DATA_BYTES)
    except InvalidEvent:
        return
    assert "null" in (data, metadata)
    expected = [{} if value == "null" else json.loads(value) for value in (data, metadata)]
    assert [json.loads(encoded.data), json.loads(encoded.metadata)] == expected


@pytest.mark.parametrize(INVALID_EVENT_FIELDS, INVALID_EVENTS)
def test_publish_v1_rejects(
    admin: psycopg.Connection,
    schema: str,
    topics: Any,
    event_type: Any,
    data: str,
    metadata: str,
    subject: str,
    reason: str,
    batch_subject: str,
    batch_reason: str,
) -> None:
    library_rejects(topics, event_type, data, metadata)

    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        publish(admin, schema, topics, event_type, data, metadata)
    assert raised.value.diag.message_primary == f"{subject}: {reason}"
    assert stored_count(admin, schema) == 0


@pytest.mark.parametrize(INVALID_EVENT_FIELDS, INVALID_EVENTS)
def test_publish_batch_v1_rejects(
    admin: psycopg.Connection,
    schema: str,
    topics: Any,
    event_type: Any,
    data: str,
    metadata: str,
    subject: str,
    reason: str,
    batch_subject: str,
    batch_reason: str,
) -> None:
    # The JSON form of the batch has no SQL NULL for an event's topics.
    event_topics = [] if topics is None else topics

    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        publish_batch(
            admin, schema, [["a"], ["b"], event_topics, ["d"]], ["t", "t", event_type, "t"],
            data=[DATA, None, data, "[]"], metadata=["{}", None, metadata, '{"k": "v"}'],
        )
    assert raised.value.diag.message_primary == f"{batch_subject} in event 3 of 4: {batch_reason}"
    assert stored_count(admin, schema) == 0


@pytest.mark.parametrize(
    "event_topics, named",
    [
        pytest.param("a", 'invalid topics "a" in event 2 of 2: expected a JSON array', id="string"),
        pytest.param({"a": 1}, 'invalid topics {"a": 1} in event 2 of 2', id="object"),
        pytest.param(["ok", 7], "invalid topic 7 in event 2 of 2: expected a JSON string", id="number"),
        pytest.param(["ok", ["x"]], 'invalid topic ["x"] in event 2 of 2', id="nested-array"),
    ],
)
def test_publish_batch_v1_rejects_json_shape(
    admin: psycopg.Connection, schema: str, event_topics: Any, named: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        publish_batch(admin, schema, [["a"], event_topics], ["t", "t"])
    assert named in raised.value.diag.message_primary
    assert stored_count(admin, schema) == 0


def test_publish_batch_v1_names_first_invalid_event(admin: psycopg.Connection, schema: str) -> None:
    topics = [["a"], ["b", ""], ["c"], [None]]

    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        publish_batch(admin, schema, topics, ["t", "t", "\t", "t"])
    assert raised.value.diag.message_primary == 'invalid topic "" in event 2 of 4: a topic must not be empty'
    assert stored_count(admin, schema) == 0


@pytest.mark.parametrize(
    "topics, types, named",
    [
        pytest.param(None, ["t"], "invalid batch topics NULL", id="topics-null"),
        pytest.param({"a": ["b"]}, ["t"], 'invalid batch topics {"a": ["b"]}', id="topics-object"),
        pytest.param([["a"], ["b"]], ["t"], "one entry per event, not 2, 1, 1 and 1", id="lengths-differ"),
    ],
)
def test_publish_batch_v1_rejects_malformed_batch(
    admin: psycopg.Connection, schema: str, topics: Any, types: list[str], named: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        publish_batch(admin, schema, topics, types)
    assert named in raised.value.diag.message_primary
    assert stored_count(admin, schema) == 0


def test_publish_v1_rejects_two_dimensional_topics(admin: psycopg.Connection, schema: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        admin.execute(f"""SELECT * FROM "{schema}".publish_v1(ARRAY[['a', 'b'], ['c', 'd']], 't')""")
    assert "invalid topics {{a,b},{c,d}}: expected a one-dimensional array" in raised.value.diag.message_primary
    assert stored_count(admin, schema) == 0


def test_rejected_calls_skip_ordering_lock(database_url: str, admin: psycopg.Connection, schema: str) -> None:
    # Another transaction holds the ordering lock. A call that checked its
    # arguments after taking the lock would wait for it and fail on lock_timeout.
    with psycopg.connect(database_url) as holder:
        holder.execute(f'SELECT "{schema}".ordering_lock_v1()')
        admin.execute("SET lock_timeout = '5s'")

        with pytest.raises(psycopg.errors.InvalidParameterValue):
            publish(admin, schema, ["a"], "\t")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            publish_batch(admin, schema, [["a"], [""]], ["t", "t"])
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            publish(admin, schema, ["a"], "t", data="null")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            publish_batch(admin, schema, [["a"], ["b"]], ["t", "t"], metadata=["{}", "[]"])
        # An empty batch writes nothing, so it does not wait for the lock either.
        assert publish_batch(admin, schema, [], []) == []
        holder.rollback()


def test_publish_v1_stores_duplicate_topics_once(
    admin: psycopg.Connection, schema: str, log: eventlog.EventLog
) -> None:
    publish(admin, schema, ["b", "a", "b", "c", "a"], "t")

    assert stored(admin, schema) == [(["b", "a", "c"], "t")]
    assert log.read()[0].topics == NewEvent(["b", "a", "b", "c", "a"], "t").topics


def test_publish_batch_v1_stores_duplicate_topics_once(admin: psycopg.Connection, schema: str) -> None:
    topics = [["x"], ["b", "a", "b", "c", "a"], ["y", "y"], ["z", "w"]]

    ids = publish_batch(admin, schema, topics, ["t1", "t2", "t3", "t4"])

    assert ids == sorted(ids)
    assert stored(admin, schema) == [(["x"], "t1"), (["b", "a", "c"], "t2"), (["y"], "t3"), (["z", "w"], "t4")]


# Data that publish_v1 and publish_batch_v1 accept: any JSON value but null.
ACCEPTED_DATA = [[1, "two"], [], "text", "", 0, -1.5, True, False, {"nested": {"list": [None]}}, {}]


def test_data_other_than_null_accepted(admin: psycopg.Connection, schema: str, log: eventlog.EventLog) -> None:
    metadata = {"correlation_id": "c-1", "actor": {"id": 7}}
    for data in ACCEPTED_DATA:
        encode_event(NewEvent(["a"], "t", data, metadata), MAX_DATA_BYTES)  # the Python library accepts it too

    for data in ACCEPTED_DATA:
        publish(admin, schema, ["a"], "t", json.dumps(data), json.dumps(metadata))
    publish_batch(
        admin, schema, [["a"]] * len(ACCEPTED_DATA), ["t"] * len(ACCEPTED_DATA),
        data=[json.dumps(data) for data in ACCEPTED_DATA], metadata=[json.dumps(metadata)] * len(ACCEPTED_DATA),
    )

    # Compared as JSON text with sorted keys, because 0 == False in Python and
    # jsonb does not keep the order of keys.
    expected = json.dumps([(data, metadata) for data in ACCEPTED_DATA] * 2, sort_keys=True)
    assert json.dumps(stored_payloads(admin, schema), sort_keys=True) == expected
    events = log.read(limit=100)
    assert json.dumps([(event.data, event.metadata) for event in events], sort_keys=True) == expected


def test_sql_null_payload_stored_as_empty(admin: psycopg.Connection, schema: str) -> None:
    library = encode_event(NewEvent(["a"], "t"), MAX_DATA_BYTES)  # the library stores {} for None
    assert library.data == "{}"
    assert library.metadata == "{}"

    publish(admin, schema, ["a"], "t", None, None)
    publish(admin, schema, ["a"], "t", DATA, None)
    publish(admin, schema, ["a"], "t", None, '{"k": "v"}')
    admin.execute(f"""SELECT * FROM "{schema}".publish_v1(ARRAY['a'], 't')""")  # both left out
    publish_batch(admin, schema, [["a"], ["b"], ["c"]], ["t", "t", "t"], [None, DATA, None], [None, None, '{"k": "v"}'])

    assert stored_payloads(admin, schema) == [
        ({}, {}),
        ({"n": 1}, {}),
        ({}, {"k": "v"}),
        ({}, {}),
        ({}, {}),
        ({"n": 1}, {}),
        ({}, {"k": "v"}),
    ]


def test_limits_accepted(admin: psycopg.Connection, schema: str) -> None:
    max_topics = [f"t{i}" for i in range(MAX_TOPICS_PER_EVENT)]
    max_bytes_topic = "é" * (MAX_TOPIC_BYTES // 2)
    max_bytes_type = "x" * MAX_TYPE_BYTES
    # Duplicates do not count towards the maximum number of topics.
    repeated = max_topics + max_topics[::-1]
    events = [(max_topics, "t"), ([max_bytes_topic], "t"), (["a"], max_bytes_type), (repeated, "t")]
    for topics, event_type in events:
        NewEvent(topics, event_type)  # the Python library accepts it too

    for topics, event_type in events:
        publish(admin, schema, topics, event_type)
    publish_batch(admin, schema, [topics for topics, _ in events], [event_type for _, event_type in events])

    expected = [(max_topics, "t"), ([max_bytes_topic], "t"), (["a"], max_bytes_type), (max_topics, "t")]
    assert stored(admin, schema) == expected * 2


def test_whitespace_pattern_matches_python(admin: psycopg.Connection) -> None:
    encoding = admin.execute("SHOW server_encoding").fetchone()
    if encoding != ("UTF8",):
        pytest.skip(f"chr() needs a UTF8 database for code points above 127, not {encoding}")

    # Every code point except the surrogates, which PostgreSQL text cannot contain.
    row = admin.execute(
        "SELECT array_agg(n ORDER BY n) FROM generate_series(1, 1114111) AS n"
        " WHERE n NOT BETWEEN 55296 AND 57343 AND chr(n) ~ %s",
        [f"^[{MIGRATION.WHITESPACE}]*$"],
    ).fetchone()
    assert row is not None
    assert row[0] == [code for code in range(0x110000) if chr(code).isspace()]


def test_whitespace_types_rejected_as_python_does(admin: psycopg.Connection, schema: str) -> None:
    whitespace = [chr(code) for code in range(0x110000) if chr(code).isspace()]

    for char in whitespace:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
            publish(admin, schema, ["a"], char)
        assert "it must contain a visible character" in raised.value.diag.message_primary, f"U+{ord(char):04X}"
    assert stored_count(admin, schema) == 0

    for char in NOT_WHITESPACE:
        NewEvent(["a"], char)  # the Python library accepts it too
        publish(admin, schema, ["a"], char)
    assert [event_type for _, event_type in stored(admin, schema)] == NOT_WHITESPACE


def test_awkward_topics_stored_exactly(admin: psycopg.Connection, schema: str, log: eventlog.EventLog) -> None:
    batch_topics = [AWKWARD_TOPICS, AWKWARD_TOPICS[::-1], ["NULL"]]

    publish(admin, schema, AWKWARD_TOPICS, "single")
    publish_batch(admin, schema, batch_topics, ["first", "second", "third"])

    assert stored(admin, schema) == [
        (AWKWARD_TOPICS, "single"),
        (AWKWARD_TOPICS, "first"),
        (AWKWARD_TOPICS[::-1], "second"),
        (["NULL"], "third"),
    ]
    assert [event.topics for event in log.read()] == [
        tuple(AWKWARD_TOPICS),
        tuple(AWKWARD_TOPICS),
        tuple(AWKWARD_TOPICS[::-1]),
        ("NULL",),
    ]
