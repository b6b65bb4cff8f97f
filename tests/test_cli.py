"""The `eventlog` command line, run as real subprocesses of the installed script."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

import eventlog
from eventlog import cli, migrate

# Generous for a loaded machine, where starting the script alone can take seconds.
TIMEOUT = 60.0  # seconds

READY = re.compile(r"following (.+) after event id (\d+)")


def _script() -> str:
    script = Path(sys.executable).with_name("eventlog")
    if script.exists():
        return str(script)
    found = shutil.which("eventlog")
    if found is None:
        pytest.fail("the eventlog script is not installed: run pip install -e '.[test]'", pytrace=False)
    return found


class Running:
    """A started `eventlog` process whose output is read line by line in threads."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # Start through exec so that SIGINT has its default action in the child even
        # when the test runner ignores it (as a background job of a shell does).
        launcher = (
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, _script(), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._stdout: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._stderr_changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._stdout.put(line)
        self._stdout.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._stderr_changed:
                self._stderr.append(line)
                self._stderr_changed.notify_all()

    def next_line(self) -> str:
        """Return the next line of stdout; fail on end of output or timeout."""
        try:
            line = self._stdout.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no line on stdout within {TIMEOUT} s; stderr:\n{self.stderr}")
        if line is None:
            pytest.fail(f"stdout ended, exit status {self.process.poll()}; stderr:\n{self.stderr}")
        return line

    def wait_for_stderr(self, pattern: re.Pattern[str]) -> re.Match[str]:
        def search() -> re.Match[str] | None:
            return next(filter(None, map(pattern.search, self._stderr)), None)

        with self._stderr_changed:
            if not self._stderr_changed.wait_for(search, TIMEOUT):
                pytest.fail(f"{pattern.pattern!r} not on stderr within {TIMEOUT} s:\n{self.stderr}")
            match = search()
        assert match is not None
        return match

    def wait(self) -> int:
        status = self.process.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        return status

    @property
    def stderr(self) -> str:
        with self._stderr_changed:
            return "".join(self._stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)


class Cli:
    """Runs `eventlog` with EVENTLOG_DATABASE_URL and EVENTLOG_SCHEMA set."""

    def __init__(self, database_url: str, schema: str | None) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTLOG_")}
        self.env["EVENTLOG_DATABASE_URL"] = database_url
        if schema is not None:
            self.env["EVENTLOG_SCHEMA"] = schema
        self.started: list[Running] = []

    def run(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_script(), *args],
            env=self.env if env is None else env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def start(self, *args: str) -> Running:
        running = Running(list(args), self.env)
        self.started.append(running)
        return running


@pytest.fixture
def cli_runner(database_url: str, schema: str) -> Iterator[Cli]:
    runner = Cli(database_url, schema)
    yield runner
    for running in runner.started:
        running.kill()


@pytest.fixture
def fresh_schema(admin: psycopg.Connection) -> Iterator[str]:
    """A schema name that nothing has created yet; dropped afterwards."""
    name = f"cli_{uuid.uuid4().hex[:10]}"
    yield name
    admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stderr.splitlines()


def _schema_exists(admin: psycopg.Connection, schema: str) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()
    return row is not None and row[0] == 1


# ---------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------


def test_migrate_then_publish_and_tail(database_url: str, fresh_schema: str, admin: psycopg.Connection) -> None:
    runner = Cli(database_url, None)
    head = ScriptDirectory.from_config(migrate.alembic_config(database_url, schema=fresh_schema)).get_current_head()
    options = ["--schema", fresh_schema, "--database-url", database_url]

    first = runner.run("migrate", *options)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"schema '{fresh_schema}': upgraded from base to {head} (head)\n"

    again = runner.run("migrate", *options)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"schema '{fresh_schema}': already at {head} (head)\n"

    published = runner.run(
        "publish", "shop:products", "--type", "product_created", "--data", '{"id": 1}', *options
    )
    assert published.returncode == 0, published.stderr
    tailed = runner.run("tail", "shop:products", "--after", "0", "--limit", "1", *options)
    assert tailed.returncode == 0, tailed.stderr
    assert _json_lines(tailed.stdout) == _json_lines(published.stdout)

    down = runner.run("migrate", "--downgrade", "--revision", "base", *options)
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"schema '{fresh_schema}': downgraded from {head} to base\n"
    events_table = admin.execute("SELECT to_regclass(%s)", [f"{fresh_schema}.events"]).fetchone()
    assert events_table == (None,)


def test_migrate_downgrade_needs_revision(cli_runner: Cli) -> None:
    result = cli_runner.run("migrate", "--downgrade")
    assert result.returncode == 2
    assert len(_error_lines(result)) == 1
    assert "--downgrade needs --revision" in result.stderr


def test_migrate_unknown_revision(cli_runner: Cli) -> None:
    result = cli_runner.run("migrate", "--revision", "nosuchrev")
    assert result.returncode == 1
    assert _error_lines(result) == [
        f"eventlog: error: migration of schema '{cli_runner.env['EVENTLOG_SCHEMA']}' failed: "
        "Can't locate revision identified by 'nosuchrev'"
    ]


# ---------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------


def test_publish_prints_stored_event(cli_runner: Cli, schema: str, admin: psycopg.Connection) -> None:
    result = cli_runner.run(
        "publish", "shop:cart:user:7", "shop:products",
        "--type", "item_added",
        "--data", '{"sku": "A-1", "price": "19.99", "qty": 2}',
        "--metadata", '{"actor": "admin"}',
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    [printed] = _json_lines(result.stdout)
    assert printed["topics"] == ["shop:cart:user:7", "shop:products"]
    assert printed["type"] == "item_added"
    assert printed["data"] == {"sku": "A-1", "price": "19.99", "qty": 2}
    assert printed["metadata"] == {"actor": "admin"}
    assert dt.datetime.fromisoformat(printed["occurred_at"]).tzinfo is not None
    stored = admin.execute(
        f'SELECT topics, type, data, metadata FROM "{schema}".events WHERE id = %s', [printed["id"]]
    ).fetchone()
    assert stored == (printed["topics"], printed["type"], printed["data"], printed["metadata"])


def test_publish_data_from_stdin(cli_runner: Cli) -> None:
    result = cli_runner.run(
        "publish", "shop:inventory", "--type", "stock_changed", "--data", "-",
        input='{"sku": "A-1", "delta": -3}\n',
    )

    assert result.returncode == 0, result.stderr
    assert _json_lines(result.stdout)[0]["data"] == {"sku": "A-1", "delta": -3}


@pytest.mark.parametrize(
    ("option", "value", "stdin"),
    [
        ("--data", '{"id": 1,}', None),
        ("--data", "-", '{\n  "id": 1\n  "name": "x"\n}'),
        ("--metadata", "{actor: admin}", None),
    ],
    ids=["data", "data-stdin", "metadata"],
)
def test_publish_invalid_json(
    cli_runner: Cli, schema: str, admin: psycopg.Connection, option: str, value: str, stdin: str | None
) -> None:
    args = ["publish", "t", "--type", "x", "--data", "{}", "--metadata", "{}"]
    args[args.index(option) + 1] = value
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(stdin if value == "-" else value)

    result = cli_runner.run(*args, input=stdin)

    assert result.returncode == 2
    [line] = _error_lines(result)
    assert line.startswith(f"eventlog: error: argument {option}")
    assert f"line {expected.value.lineno}, column {expected.value.colno}" in line
    count = admin.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()
    assert count == (0,)


def test_publish_nan_and_array_metadata(cli_runner: Cli) -> None:
    nan = cli_runner.run("publish", "t", "--type", "x", "--data", '{"v": NaN}')
    array = cli_runner.run("publish", "t", "--type", "x", "--data", "{}", "--metadata", "[1]")

    assert nan.returncode == 2
    assert "argument --data: invalid JSON: NaN" in nan.stderr
    assert array.returncode == 2
    assert "argument --metadata: expected a JSON object" in array.stderr


def test_publish_null_and_huge_numbers(cli_runner: Cli, admin: psycopg.Connection, schema: str) -> None:
    null = cli_runner.run("publish", "t", "--type", "x", "--data", "null")
    huge = cli_runner.run("publish", "t", "--type", "x", "--data", '{"v": 1e400}')

    assert null.returncode == 2
    assert "argument --data: null is not allowed as event data; pass {}" in null.stderr
    assert huge.returncode == 2
    assert "argument --data: the number 1e400 is too large for a double" in huge.stderr
    assert admin.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()[0] == 0


def test_verbose_before_command(cli_runner: Cli) -> None:
    before = cli_runner.run("-vv", "events")
    after = cli_runner.run("events", "-vv")

    assert before.returncode == 0, before.stderr
    assert "DEBUG" in before.stderr
    assert "DEBUG" in after.stderr


def test_publish_missing_type(cli_runner: Cli) -> None:
    result = cli_runner.run("publish", "t", "--data", "{}")

    assert result.returncode == 2
    assert _error_lines(result) == [
        "eventlog: error: the following arguments are required: --type (see 'eventlog publish --help')"
    ]


def test_publish_empty_topic(cli_runner: Cli) -> None:
    result = cli_runner.run("publish", "", "--type", "x", "--data", "{}")

    assert result.returncode == 2
    assert len(_error_lines(result)) == 1
    assert "argument TOPIC: invalid topic ''" in result.stderr


# ---------------------------------------------------------------------------
# tail
# ---------------------------------------------------------------------------


def test_tail_live_delivery(cli_runner: Cli, log: eventlog.EventLog) -> None:
    earlier = log.publish("shop:products", "product_created", {"id": 1})
    tail = cli_runner.start("tail", "shop:products", "--limit", "2", "-v")
    ready = tail.wait_for_stderr(READY)
    assert int(ready.group(2)) == earlier.id  # without --after it starts at the head

    first = cli_runner.run("publish", "shop:products", "--type", "product_updated", "--data", '{"id": 1}')
    other_topic = cli_runner.run("publish", "shop:inventory", "--type", "stock_changed", "--data", "{}")
    second = cli_runner.run("publish", "shop:products", "shop:categories", "--type", "x", "--data", "[]")

    assert other_topic.returncode == 0, other_topic.stderr
    assert json.loads(tail.next_line()) == json.loads(first.stdout)
    assert json.loads(tail.next_line()) == json.loads(second.stdout)
    assert tail.wait() == 0
    assert "Traceback" not in tail.stderr


def test_tail_after_resumes(cli_runner: Cli, log: eventlog.EventLog) -> None:
    a1 = log.publish("a", "e", {"n": 1})
    log.publish("b", "e", {"n": 2})
    a2 = log.publish("a", "e", {"n": 3})
    a3 = log.publish(["a", "b"], "e", {"n": 4})
    b2 = log.publish("b", "e", {"n": 5})
    a4 = log.publish("a", "e", {"n": 6})

    from_a2 = cli_runner.run("tail", "a", "--after", str(a2.id), "--limit", "2")
    from_b2 = cli_runner.run("tail", "a", "--after", str(b2.id), "--limit", "1")
    everything = cli_runner.run("tail", "a", "--after", "0", "--limit", "4")

    assert from_a2.returncode == 0, from_a2.stderr
    assert _json_lines(from_a2.stdout) == [a3.to_json_dict(), a4.to_json_dict()]
    assert _json_lines(from_b2.stdout) == [a4.to_json_dict()]
    assert [e["id"] for e in _json_lines(everything.stdout)] == [a1.id, a2.id, a3.id, a4.id]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tail_signal_exits_cleanly(cli_runner: Cli, signum: int) -> None:
    tail = cli_runner.start("tail", "shop:products", "--after", "0", "-v")
    tail.wait_for_stderr(READY)

    tail.process.send_signal(signum)

    assert tail.wait() == 0
    assert "Traceback" not in tail.stderr
    assert "error" not in tail.stderr.lower()
    assert "printed 0 events; subscription and log closed" in tail.stderr


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------


def _catalog(log: eventlog.EventLog) -> dict[str, eventlog.Event]:
    return {
        "created": log.publish("shop:products", "product_created", {"id": 7, "name": "lamp"}),
        "updated": log.publish(["shop:products", "shop:products:7"], "product_updated", {"id": 7}),
        "stock": log.publish("shop:inventory", "stock_changed", {"sku": "A-1", "delta": -1}),
        "deleted": log.publish("shop:products", "product_deleted", {"id": 7}),
        "restock": log.publish(["shop:inventory", "shop:products"], "stock_changed", {"sku": "A-1"}),
        "category": log.publish("shop:categories", "category_created", {"id": 1}),
    }


def _event_ids(result: subprocess.CompletedProcess[str]) -> list[int]:
    assert result.returncode == 0, result.stderr
    return [event["id"] for event in _json_lines(result.stdout)]


def test_events_topic_filter(cli_runner: Cli, log: eventlog.EventLog) -> None:
    ev = _catalog(log)

    products = cli_runner.run("events", "--topic", "shop:products", "--format", "jsonl")
    two_topics = cli_runner.run(
        "events", "--topic", "shop:inventory", "--topic", "shop:categories", "--format", "jsonl"
    )

    assert _json_lines(products.stdout) == [
        ev[name].to_json_dict() for name in ("created", "updated", "deleted", "restock")
    ]
    assert _event_ids(two_topics) == [ev["stock"].id, ev["restock"].id, ev["category"].id]


def test_events_type_filter(cli_runner: Cli, log: eventlog.EventLog) -> None:
    ev = _catalog(log)

    one_type = cli_runner.run("events", "--type", "stock_changed", "--format", "jsonl")
    two_types = cli_runner.run(
        "events", "--type", "product_created", "--type", "product_deleted", "--format", "jsonl"
    )
    with_topic = cli_runner.run(
        "events", "--type", "stock_changed", "--topic", "shop:products", "--format", "jsonl"
    )

    assert _event_ids(one_type) == [ev["stock"].id, ev["restock"].id]
    assert _event_ids(two_types) == [ev["created"].id, ev["deleted"].id]
    assert _event_ids(with_topic) == [ev["restock"].id]


def test_events_id_range_and_limit(cli_runner: Cli, log: eventlog.EventLog) -> None:
    ev = _catalog(log)

    id_range = cli_runner.run(
        "events", "--after", str(ev["updated"].id), "--until-id", str(ev["deleted"].id), "--format", "jsonl"
    )
    limited = cli_runner.run("events", "--after", str(ev["created"].id), "--limit", "2", "--format", "jsonl")

    assert _event_ids(id_range) == [ev["stock"].id, ev["deleted"].id]
    assert _event_ids(limited) == [ev["updated"].id, ev["stock"].id]


def test_events_time_range(cli_runner: Cli, log: eventlog.EventLog) -> None:
    ev = _catalog(log)
    events = sorted(ev.values(), key=lambda e: e.id)
    since, until = ev["updated"].occurred_at, ev["restock"].occurred_at
    # Computed from the stored times, so that equal timestamps cannot break the test.
    expected = [e.id for e in events if since <= e.occurred_at < until]

    with_offset = cli_runner.run(
        "events", "--since", since.isoformat(), "--until", until.isoformat(), "--format", "jsonl"
    )
    naive_utc = cli_runner.run(
        "events",
        "--since", since.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat(),
        "--until", until.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat(),
        "--format", "jsonl",
    )

    assert ev["updated"].id in expected
    assert ev["restock"].id not in expected
    assert _event_ids(with_offset) == expected
    assert _event_ids(naive_utc) == expected


def test_events_table_format(cli_runner: Cli, log: eventlog.EventLog) -> None:
    ev = _catalog(log)
    long = log.publish("shop:products", "product_described", {"text": "x" * 500})
    expected = [ev["created"], ev["updated"], ev["deleted"], ev["restock"], long]
    width = 160

    result = cli_runner.run(
        "events", "--topic", "shop:products", "--format", "table",
        env={**cli_runner.env, "COLUMNS": str(width)},
    )

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "OCCURRED_AT", "TYPE", "TOPICS", "DATA"]
    assert len(rows) == len(expected)
    starts = {title: header.index(title) for title in ("OCCURRED_AT", "TYPE", "TOPICS", "DATA")}
    for row, event in zip(rows, expected):
        occurred_at = event.occurred_at.astimezone(dt.timezone.utc).isoformat(sep=" ", timespec="microseconds")
        assert int(row[: starts["OCCURRED_AT"]]) == event.id
        assert row[starts["OCCURRED_AT"]:].startswith(occurred_at)
        assert row[starts["TYPE"]:].startswith(event.type + " ")
        assert row[starts["TOPICS"]:].startswith(",".join(event.topics) + " ")
        assert len(row) <= width
    assert rows[-1][starts["DATA"]:].startswith('{"text":"xxx')
    assert rows[-1].endswith("...")


def test_events_broken_pipe(cli_runner: Cli, log: eventlog.EventLog) -> None:
    # Far more output than a pipe buffers (64 KiB on Linux), so the writer must
    # notice that the reader is gone.
    log.publish_many([("bulk", "filler", {"text": "x" * 2000}) for _ in range(200)])
    process = subprocess.Popen(
        [_script(), "events", "--format", "jsonl"],
        env=cli_runner.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None

    first = process.stdout.readline()
    process.stdout.close()
    status = process.wait(TIMEOUT)
    stderr = process.stderr.read()

    assert json.loads(first)["type"] == "filler"
    assert status == 141
    assert "Traceback" not in stderr


def test_events_invalid_time(cli_runner: Cli) -> None:
    result = cli_runner.run("events", "--since", "yesterday")

    assert result.returncode == 2
    [line] = _error_lines(result)
    assert "argument --since: invalid time 'yesterday'" in line


# ---------------------------------------------------------------------------
# errors shared by every command
# ---------------------------------------------------------------------------

COMMANDS_ON_A_LOG = {
    "publish": ["publish", "t", "--type", "x", "--data", "{}"],
    "tail": ["tail", "t"],
    "events": ["events"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS_ON_A_LOG))
def test_unmigrated_schema(
    database_url: str, fresh_schema: str, admin: psycopg.Connection, command: str
) -> None:
    result = Cli(database_url, fresh_schema).run(*COMMANDS_ON_A_LOG[command])

    assert result.returncode == 1
    assert result.stdout == ""
    assert _error_lines(result) == [
        f"eventlog: error: no event log in schema '{fresh_schema}' of this database: "
        f"create it with `eventlog migrate --schema {fresh_schema}`"
    ]
    assert not _schema_exists(admin, fresh_schema)


PASSWORD = "s3cr%40t-Pa55"  # percent-encoded in the URL; the server would get "s3cr@t-Pa55"


@pytest.mark.parametrize(
    ("command", "verbosity"),
    [
        *((command, []) for command in ["migrate", *sorted(COMMANDS_ON_A_LOG)]),
        # DEBUG logging of eventlog and the libraries it uses.
        ("migrate", ["-vv"]),
        ("tail", ["-vv"]),
    ],
)
def test_unreachable_server(closed_port: int, command: str, verbosity: list[str]) -> None:
    url = f"postgresql://bob:{PASSWORD}@127.0.0.1:{closed_port}/app"
    args = ["migrate"] if command == "migrate" else COMMANDS_ON_A_LOG[command]

    result = Cli(url, None).run(*args, *verbosity)

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert PASSWORD not in output
    assert "s3cr@t-Pa55" not in output
    assert f"could not connect to postgresql://bob:***@127.0.0.1:{closed_port}/app" in result.stderr
    if not verbosity:
        assert len(_error_lines(result)) == 1


def _url_with_password(database_url: str) -> tuple[str, str]:
    """Return the suite's URL with a password in it, and that password."""
    parts = urllib.parse.urlsplit(database_url)
    if parts.scheme not in ("postgres", "postgresql") or parts.username is None:
        pytest.skip("needs a postgresql://user@host/db URL to add a password to")
    if parts.password is not None:
        return database_url, urllib.parse.unquote(parts.password)
    # A server that trusts this user ignores the password, but the client still has it in its URL.
    netloc = f"{parts.username}:{PASSWORD}@{parts.netloc.rsplit('@', 1)[1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), urllib.parse.unquote(PASSWORD)


def test_password_absent_from_debug_output(database_url: str, fresh_schema: str) -> None:
    url, password = _url_with_password(database_url)
    runner = Cli(url, fresh_schema)

    results = [
        runner.run("migrate", "-vv"),
        runner.run("publish", "t", "--type", "x", "--data", "{}", "-vv"),
        runner.run("tail", "t", "--after", "0", "--limit", "1", "-vv"),
        runner.run("events", "-vv"),
    ]

    for result in results:
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
        assert urllib.parse.quote(password) not in result.stdout + result.stderr


def test_missing_database_url(database_url: str) -> None:
    runner = Cli(database_url, None)
    del runner.env["EVENTLOG_DATABASE_URL"]

    result = runner.run("events")

    assert result.returncode == 2
    [line] = _error_lines(result)
    assert "no database URL: pass --database-url or set EVENTLOG_DATABASE_URL" in line


def test_invalid_schema_name(database_url: str) -> None:
    result = Cli(database_url, None).run("events", "--schema", "Shop-Log")

    assert result.returncode == 2
    [line] = _error_lines(result)
    assert "argument --schema: invalid schema name 'Shop-Log'" in line


# ---------------------------------------------------------------------------
# help and version
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["migrate", "publish", "tail", "events"])
def test_help_of_command(command: str) -> None:
    result = subprocess.run(
        [_script(), command, "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: eventlog {command} ")
    for option in ("--database-url", "--schema", "--connect-timeout", "--verbose"):
        assert option in result.stdout


def test_help_lists_commands() -> None:
    result = subprocess.run([_script(), "--help"], capture_output=True, text=True, timeout=TIMEOUT)

    assert result.returncode == 0, result.stderr
    for command in ("migrate", "publish", "tail", "events"):
        assert f"\n    {command} " in result.stdout


def test_every_option_has_help() -> None:
    parser = cli.build_parser()
    [subparsers] = [a for a in parser._actions if a.dest == "command"]
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"


def test_version() -> None:
    script = subprocess.run([_script(), "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    module = subprocess.run(
        [sys.executable, "-m", "eventlog", "--version"], capture_output=True, text=True, timeout=TIMEOUT
    )

    assert script.stdout == f"eventlog {eventlog.__version__}\n"
    assert module.stdout == script.stdout
