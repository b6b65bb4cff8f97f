"""The ``eventlog`` command line: migrate, publish, tail and query a log.

Each subcommand is added by one registration function that receives the
`Commands` registry, declares its options and names the function that runs it::

    def add_hello_command(commands: Commands) -> None:
        parser = commands.add("hello", run=run_hello, help="print a greeting")
        parser.add_argument("--name", default="world", help="who to greet")

    def run_hello(args: argparse.Namespace) -> int:
        write_line(f"hello {args.name}")
        return 0

and by one entry in `registrations()`. Every subcommand gets the common options
(`--database-url`, `--schema`, `--connect-timeout`, `-v`). A run function opens
the log with `open_log(args)` and raises `UsageError` for bad input that argparse
could not check. It lets `EventLogError` propagate, and `main` prints either one
as a single line on stderr.

Exit statuses:

=====  ==================================================================
0      success, and also `tail` ended by Ctrl-C (SIGINT) or SIGTERM,
       because a signal is the normal way to stop following a log
1      runtime error: server unreachable, log schema missing, event
       rejected, migration failed
2      usage error: unknown option, invalid value, invalid JSON
130    any other command interrupted by Ctrl-C
141    stdout closed by its reader, as with ``eventlog events | head``
=====  ==================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import psycopg
from pydantic import ValidationError

from . import __version__
from ._encoding import validate_topic, validate_type
from ._models import Event
from ._settings import Settings
from ._sql import EventFilter
from ._subscription import Subscription
from .errors import (
    ConnectionFailed,
    EventLogError,
    InvalidEventType,
    InvalidTopic,
    SchemaNotFound,
    translate,
)
from .log import EventLog

__all__ = [
    "Commands",
    "UsageError",
    "build_parser",
    "load_settings",
    "main",
    "open_log",
    "registrations",
    "write_json_line",
    "write_line",
]

logger = logging.getLogger(__name__)

PROG = "eventlog"

RunFunction = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a C tool reports in `... | head`


class UsageError(Exception):
    """Invalid command-line input found after parsing, reported with exit status 2."""


# ===========================================================================
# The parser and the subcommand registry
# ===========================================================================


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block, with a pointer to --help.
        self.exit(EXIT_USAGE_ERROR, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


class Commands:
    """The registry that registration functions add their subcommands to."""

    def __init__(self, subparsers: Any, common: Callable[[str | None, str | None], argparse.ArgumentParser]) -> None:
        self._subparsers = subparsers
        self._common = common

    def add(
        self,
        name: str,
        *,
        run: RunFunction,
        help: str,
        description: str | None = None,
        epilog: str | None = None,
        database_url_help: str | None = None,
        schema_help: str | None = None,
    ) -> argparse.ArgumentParser:
        """Add subcommand `name` with the common options.

        `run(args)` carries out the subcommand and returns the exit status.
        `database_url_help` and `schema_help` replace the help of --database-url
        and --schema.
        """
        parser = self._subparsers.add_parser(
            name,
            parents=[self._common(database_url_help, schema_help)],
            help=help,
            description=description or help[:1].upper() + help[1:] + ".",
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(run=run)
        return parser


def registrations() -> list[Callable[[Commands], None]]:
    """Return the functions that add the subcommands, in the order `--help` lists them."""
    from . import demo  # imported here: demo imports this module for its helpers

    return [add_migrate_command, add_publish_command, add_tail_command, add_events_command, demo.register]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A durable, replayable event log on PostgreSQL.",
        epilog=(
            "Connection settings come from --database-url and --schema, or from the\n"
            "EVENTLOG_DATABASE_URL and EVENTLOG_SCHEMA environment variables.\n"
            f"Run '{PROG} COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # -v before the command too. Its own dest: a subcommand's default of 0 for
    # "verbose" would overwrite a count made here.
    parser.add_argument(
        "-v", "--verbose", dest="verbose_before_command", action="count", default=0,
        help="as -v after the command (the two counts add up)",
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    commands = Commands(subparsers, _common_options)
    for register in registrations():
        register(commands)
    return parser


def _common_options(database_url_help: str | None = None, schema_help: str | None = None) -> argparse.ArgumentParser:
    # Built once per subcommand: argparse shares a parent's actions with every
    # child, so one subcommand could not change a help text for itself alone.
    common = _Parser(add_help=False)
    group = common.add_argument_group("connection and logging")
    group.add_argument(
        "--database-url",
        metavar="URL",
        help=database_url_help or (
            "PostgreSQL URL of the database that holds the log, such as "
            "postgresql://user:password@localhost:5432/app (default: $EVENTLOG_DATABASE_URL; "
            "prefer the variable, because other users can see command lines in ps)"
        ),
    )
    group.add_argument(
        "--schema",
        metavar="NAME",
        type=_schema_name,
        help=schema_help or "PostgreSQL schema of the log (default: $EVENTLOG_SCHEMA, else eventlog)",
    )
    group.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=_positive_float,
        help=(
            "how long to wait for the database server, in seconds "
            f"(default: {Settings.model_fields['connect_timeout'].default:g})"
        ),
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help=(
            "log progress to stderr: -v for INFO messages of eventlog, "
            "-vv for DEBUG messages of eventlog and the libraries it uses"
        ),
    )
    return common


# ===========================================================================
# main
# ===========================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose + args.verbose_before_command)
    _configure_stdout()
    try:
        return args.run(args)
    except UsageError as exc:
        prog = f"{PROG} {args.command}"
        return _fail(f"{exc} (see '{prog} --help')", EXIT_USAGE_ERROR)
    except EventLogError as exc:
        return _fail(str(exc), EXIT_RUNTIME_ERROR)
    except psycopg.Error as exc:
        # Library calls translate driver errors already; this covers any that slip past.
        return _fail(str(translate(exc, args.schema or "eventlog")), EXIT_RUNTIME_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _fail(message: str, status: int) -> int:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    print(f"{PROG}: error: {lines[0] if lines else 'failed'}", file=sys.stderr, flush=True)
    return status


def _configure_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity >= 2 else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbosity == 1:
        # INFO from eventlog only: psycopg_pool logs every connection checkout at INFO.
        logging.getLogger("eventlog").setLevel(logging.INFO)
    elif verbosity >= 2:
        # psycopg sets its logger to WARNING when imported, unless the level was set before.
        logging.getLogger("psycopg").setLevel(logging.DEBUG)


def _configure_stdout() -> None:
    # A terminal in a non-UTF-8 locale cannot show every character of event data.
    # Escape those characters instead of failing halfway through the output.
    if not _stdout_is_utf8() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def _stdout_is_utf8() -> bool:
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return encoding == "utf8"


def _discard_stdout() -> None:
    # The reader is gone. Point stdout at /dev/null, so that the interpreter's final
    # flush does not raise BrokenPipeError a second time.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ===========================================================================
# Helpers for run functions
# ===========================================================================


def load_settings(args: argparse.Namespace) -> Settings:
    """Return the log settings from the common options and ``EVENTLOG_*`` variables."""
    settings = Settings.load(
        args.database_url, schema_name=args.schema, connect_timeout=args.connect_timeout
    )
    if settings.database_url is None:
        raise UsageError(
            "no database URL: pass --database-url or set EVENTLOG_DATABASE_URL, "
            "such as postgresql://user:password@localhost:5432/app"
        )
    return settings


def open_log(args: argparse.Namespace) -> EventLog:
    """Check the server and the log schema, then return an `EventLog` to open with ``with``.

    The check fails in one connection attempt with the server's own reason. The
    pool would instead retry in the background until the connect timeout and log
    a warning for every attempt.
    """
    settings = load_settings(args)
    with _connect(settings) as conn:
        _require_log_schema(conn, settings.schema_name)
    return EventLog(settings=settings)


@contextlib.contextmanager
def _connect(settings: Settings) -> Iterator[psycopg.Connection]:
    """Open one autocommit connection, turning failures into eventlog errors."""
    try:
        conn = psycopg.connect(
            settings.conninfo(),
            autocommit=True,
            # libpq takes whole seconds and waits at least 2.
            connect_timeout=max(2, math.ceil(settings.connect_timeout)),
            application_name="eventlog-cli",
        )
    except psycopg.OperationalError as exc:
        reason = _first_line(exc).removeprefix("connection failed: ")
        raise ConnectionFailed(f"could not connect to {settings.redacted_url()}: {reason}") from exc
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        raise translate(exc, settings.schema_name) from exc


def _require_log_schema(conn: psycopg.Connection, schema: str) -> None:
    # Schema names are validated lower-case identifiers, so quoting them is safe.
    row = conn.execute("SELECT to_regclass(%s)", [f'"{schema}".events']).fetchone()
    if row is None or row[0] is None:
        migrate_command = f"{PROG} migrate" + ("" if schema == "eventlog" else f" --schema {schema}")
        raise SchemaNotFound(
            f"no event log in schema {schema!r} of this database: "
            f"create it with `{migrate_command}`"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_line(text: str) -> None:
    """Write one line to stdout and flush it, so that a reader on a pipe gets it at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def write_json_line(value: Any) -> None:
    """Write `value` as one line of JSON, with non-ASCII escaped unless stdout is UTF-8."""
    write_line(json.dumps(value, ensure_ascii=not _stdout_is_utf8()))


# -- argument types ------------------------------------------------------------------
# Each raises ArgumentTypeError, which argparse reports as "argument --x: message".


def _schema_name(value: str) -> str:
    try:
        Settings(schema_name=value)
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = error.get("ctx", {}).get("error")
        raise argparse.ArgumentTypeError(str(cause or error["msg"])) from None
    return value


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number above 0")
    return number


def _event_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid event id {value!r}: expected a whole number >= 0"
        ) from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid event id {value!r}: expected a whole number >= 0")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}: expected a whole number >= 1") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}: expected a whole number >= 1")
    return number


def _topic(value: str) -> str:
    try:
        return validate_topic(value)
    except InvalidTopic as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _event_type(value: str) -> str:
    try:
        return validate_type(value)
    except InvalidEventType as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_time(value: str) -> dt.datetime:
    """Parse an ISO 8601 date or time, taking one without an offset as UTC."""
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # datetime.fromisoformat accepts "Z" only from Python 3.11
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {value!r}: expected ISO 8601 such as 2024-05-01T12:00:00+02:00, "
            "2024-05-01T10:00:00Z or 2024-05-01 (a time without an offset is UTC)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed


# ===========================================================================
# migrate
# ===========================================================================

MIGRATE_EPILOG = f"""\
examples:
  {PROG} migrate                                  create or upgrade the log
  {PROG} migrate --schema audit                   the log in schema "audit"
  {PROG} migrate --downgrade --revision base      remove the log and ALL its events
"""


def add_migrate_command(commands: Commands) -> None:
    parser = commands.add(
        "migrate",
        run=run_migrate,
        help="create or upgrade the log's tables and functions (Alembic migrations)",
        description=(
            "Apply eventlog's Alembic migrations to the log's schema, creating the\n"
            "schema if needed, and print the revision reached. Migrations of one\n"
            "schema wait for each other, so running this from several processes is safe."
        ),
        epilog=MIGRATE_EPILOG,
    )
    parser.add_argument(
        "--revision",
        metavar="REV",
        help=(
            "Alembic revision to migrate to (default: head, the newest, when upgrading; "
            "required with --downgrade, where base removes the log and every event in it)"
        ),
    )
    parser.add_argument(
        "--downgrade",
        action="store_true",
        help="migrate down to --revision instead of up",
    )


def run_migrate(args: argparse.Namespace) -> int:
    # Alembic and SQLAlchemy load only for this command, which keeps the others quick to start.
    import sqlalchemy.exc
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from . import migrate

    if args.downgrade and args.revision is None:
        raise UsageError(
            "--downgrade needs --revision: the revision to go back to, "
            "or base to remove the log and all its events"
        )
    settings = load_settings(args)
    schema = settings.schema_name
    url = settings.database_url.get_secret_value()  # type: ignore[union-attr]
    before = _current_revision(settings)

    try:
        if args.downgrade:
            migrate.downgrade(url, schema=schema, revision=args.revision)
        else:
            migrate.upgrade(url, schema=schema, revision=args.revision or "head")
    except CommandError as exc:
        raise EventLogError(f"migration of schema {schema!r} failed: {_first_line(exc)}") from exc
    except sqlalchemy.exc.DBAPIError as exc:
        if isinstance(exc.orig, psycopg.Error):
            raise translate(exc.orig, schema) from exc
        raise EventLogError(f"migration of schema {schema!r} failed: {_first_line(exc)}") from exc

    after = _current_revision(settings)
    head = ScriptDirectory.from_config(migrate.alembic_config(url, schema=schema)).get_current_head()
    reached = f"{after} (head)" if after == head else after
    if after == before:
        write_line(f"schema {schema!r}: already at {reached}")
    else:
        verb = "downgraded" if args.downgrade else "upgraded"
        write_line(f"schema {schema!r}: {verb} from {before} to {reached}")
    return EXIT_OK


def _current_revision(settings: Settings) -> str:
    """Return the log's Alembic revision, "base" when no migration has been applied."""
    from psycopg import sql

    from .schema import VERSION_TABLE

    schema = settings.schema_name
    with _connect(settings) as conn:
        row = conn.execute("SELECT to_regclass(%s)", [f'"{schema}".{VERSION_TABLE}']).fetchone()
        if row is None or row[0] is None:
            return "base"
        query = sql.SQL("SELECT version_num FROM {}.{} ORDER BY version_num").format(
            sql.Identifier(schema), sql.Identifier(VERSION_TABLE)
        )
        versions = [r[0] for r in conn.execute(query).fetchall()]
    return ",".join(versions) or "base"


# ===========================================================================
# publish
# ===========================================================================

PUBLISH_EPILOG = f"""\
examples:
  {PROG} publish shop:products --type product_created --data '{{"id": 7, "price": "19.99"}}'
  echo '{{"sku": "A-1"}}' | {PROG} publish shop:inventory --type stock_changed --data -

JSON numbers are read as floating point (IEEE 754 doubles); write exact
decimals such as prices as strings.
"""


def add_publish_command(commands: Commands) -> None:
    parser = commands.add(
        "publish",
        run=run_publish,
        help="append one event to the log and print it as a JSON line",
        description=(
            "Append one event with the given topics to the log, ring the doorbell of\n"
            "each topic, and print the stored event (with its id and time) as one JSON line."
        ),
        epilog=PUBLISH_EPILOG,
    )
    parser.add_argument(
        "topics", metavar="TOPIC", nargs="+", type=_topic, help="topic of the event, such as shop:products"
    )
    parser.add_argument(
        "--type", required=True, type=_event_type, help="event type, such as product_created"
    )
    parser.add_argument(
        "--data",
        metavar="JSON",
        required=True,
        help="event data as a JSON value, or - to read it from stdin",
    )
    parser.add_argument(
        "--metadata",
        metavar="JSON",
        help=(
            "event metadata as a JSON object with keys such as correlation_id and actor, "
            "or - to read it from stdin (default: {})"
        ),
    )


def run_publish(args: argparse.Namespace) -> int:
    if args.data == "-" and args.metadata == "-":
        raise UsageError("only one of --data and --metadata can read stdin")
    data = _json_option("--data", args.data)
    if data is None:
        raise UsageError("argument --data: null is not allowed as event data; pass {} for empty data")
    metadata = None
    if args.metadata is not None:
        metadata = _json_option("--metadata", args.metadata)
        if not isinstance(metadata, dict):
            raise UsageError(
                f"argument --metadata: expected a JSON object such as "
                f'{{"actor": "admin"}}, not {type(metadata).__name__} {_shorten(json.dumps(metadata))}'
            )

    with open_log(args) as log:
        event = log.publish(args.topics, args.type, data, metadata=metadata)
    write_json_line(event.to_json_dict())
    return EXIT_OK


def _json_option(option: str, value: str) -> Any:
    source = option
    if value == "-":
        value = sys.stdin.read()
        source = f"{option} (read from stdin)"

    def reject_constant(name: str) -> NoReturn:
        raise UsageError(f"argument {source}: invalid JSON: {name} is not a JSON number")

    def finite_float(text: str) -> float:
        number = float(text)
        if math.isinf(number):
            raise UsageError(f"argument {source}: the number {_shorten(text)} is too large for a double")
        return number

    try:
        return json.loads(value, parse_constant=reject_constant, parse_float=finite_float)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"argument {source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# ===========================================================================
# tail
# ===========================================================================

TAIL_EPILOG = f"""\
examples:
  {PROG} tail shop:products                  new events from now on
  {PROG} tail shop:products --after 0        every event, then new ones
  {PROG} tail shop:products --after 1041     resume after event 1041
  {PROG} tail shop:inventory --after 0 --limit 10 | jq .data

Ctrl-C (SIGINT) or SIGTERM stops it with exit status 0. With -v, the line
"following ... after event id N" on stderr marks the point from which every
new event is delivered.
"""


def add_tail_command(commands: Commands) -> None:
    parser = commands.add(
        "tail",
        run=run_tail,
        help="print events of topics as JSON lines, then follow the log live",
        description=(
            "Print the events of the given topics as JSON lines, in id order: first\n"
            "the stored ones after --after (catch-up), then new ones as they are\n"
            "published (live), until stopped. Every line is flushed, so pipes see it at once."
        ),
        epilog=TAIL_EPILOG,
    )
    parser.add_argument(
        "topics", metavar="TOPIC", nargs="+", type=_topic, help="topic to follow, such as shop:products"
    )
    parser.add_argument(
        "--after",
        metavar="ID",
        type=_event_id,
        help=(
            "start after this event id, so 0 prints every stored event "
            "(default: only events published from now on)"
        ),
    )
    parser.add_argument(
        "--limit",
        metavar="N",
        type=_count,
        help="stop after printing N events (default: follow until stopped)",
    )


def run_tail(args: argparse.Namespace) -> int:
    printed = 0
    stop = _StopOnSignal()
    try:
        with stop:
            log = open_log(args)
            with log, log.subscribe(args.topics, after=args.after) as subscription:
                stop.subscription = subscription
                logger.info(
                    "following %s after event id %d",
                    ", ".join(sorted(subscription.topics)),
                    subscription.cursor,
                )
                for event in subscription:
                    write_json_line(event.to_json_dict())
                    printed += 1
                    if args.limit is not None and printed >= args.limit:
                        break
    except KeyboardInterrupt:
        # A signal came before the subscription was open, and the with blocks have
        # closed whatever was open.
        pass
    if stop.signalled:
        logger.info("stopped by a signal")
    logger.info("printed %d events; subscription and log closed", printed)
    return EXIT_OK


class _StopOnSignal:
    """Close `subscription` on SIGINT or SIGTERM, so that its iteration ends.

    The handler only starts a thread that calls `Subscription.close`, which is
    thread-safe. An exception raised from the handler instead would land wherever
    the main thread happens to be, often inside a query: psycopg then abandons the
    connection and the pool logs warnings about it. Before `subscription` is set
    there is nothing to close yet, and the handler raises KeyboardInterrupt.

    A second signal gets the default action, so a close that hangs can still be
    cut short. A signal that the parent process set to be ignored stays ignored,
    as in a background job of a shell script.
    """

    def __init__(self) -> None:
        self.subscription: Subscription | None = None
        self.signalled = False
        self._previous: dict[int, Any] = {}
        self._closer: threading.Thread | None = None

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set signal handlers, as when main() runs in a test thread
        defaults = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
        for signum, default in defaults:
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._closer is not None:
            self._closer.join()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        for handled in self._previous:
            signal.signal(handled, signal.SIG_DFL)
        self.signalled = True
        if self.subscription is None:
            raise KeyboardInterrupt
        self._closer = threading.Thread(
            target=self.subscription.close, name="eventlog-tail-stop", daemon=True
        )
        self._closer.start()


# ===========================================================================
# events
# ===========================================================================

EVENTS_EPILOG = f"""\
examples:
  {PROG} events --topic shop:products --limit 20
  {PROG} events --type order_placed --since 2024-05-01 --until 2024-06-01
  {PROG} events --after 1000 --until-id 2000 --format jsonl > events.jsonl

Times are ISO 8601, and a time without an offset is UTC. The table shows
occurred_at in UTC, and JSON lines show it as the server returns it.
"""

# Maximum widths of the TYPE and TOPICS columns. Longer values are cut with "...".
MAX_TYPE_WIDTH = 32
MAX_TOPICS_WIDTH = 48
MIN_DATA_WIDTH = 20
# Rows formatted together. Columns widen between blocks when later rows need it,
# so that the table never holds more than one block in memory.
TABLE_BLOCK_ROWS = 500


def add_events_command(commands: Commands) -> None:
    parser = commands.add(
        "events",
        run=run_events,
        help="query stored events: by topic, type, id range and time range",
        description=(
            "Print stored events that match every given filter, in id order, as an\n"
            "aligned table or as JSON lines. Repeat --topic or --type to match any of\n"
            "several values."
        ),
        epilog=EVENTS_EPILOG,
    )
    parser.add_argument(
        "--topic",
        dest="topics",
        metavar="TOPIC",
        action="append",
        type=_topic,
        help="only events with this topic (repeat the option to match any of several)",
    )
    parser.add_argument(
        "--type",
        dest="types",
        metavar="TYPE",
        action="append",
        type=_event_type,
        help="only events of this type (repeat the option to match any of several)",
    )
    parser.add_argument(
        "--after", metavar="ID", type=_event_id, default=0, help="only events with an id above ID"
    )
    parser.add_argument(
        "--until-id", metavar="ID", type=_event_id, help="only events with an id of at most ID"
    )
    parser.add_argument(
        "--since",
        metavar="TIME",
        type=parse_time,
        help="only events that occurred at or after TIME (ISO 8601, UTC when it has no offset)",
    )
    parser.add_argument(
        "--until",
        metavar="TIME",
        type=parse_time,
        help="only events that occurred before TIME (ISO 8601, UTC when it has no offset)",
    )
    parser.add_argument(
        "--limit", metavar="N", type=_count, help="print at most N events (default: all)"
    )
    parser.add_argument(
        "--format",
        choices=("table", "jsonl"),
        default="table",
        help=(
            "table prints aligned columns with data cut to the terminal width, "
            "jsonl prints one JSON object per line (default: table)"
        ),
    )


def run_events(args: argparse.Namespace) -> int:
    if args.until_id is not None and args.until_id <= args.after:
        raise UsageError(
            f"invalid --until-id {args.until_id}: it must be above --after {args.after}, "
            "or no event can match"
        )
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise UsageError(
            f"invalid --since {args.since.isoformat()}: it must be before --until "
            f"{args.until.isoformat()}, or no event can match"
        )
    where = EventFilter(
        topics=args.topics,
        types=args.types,
        after_id=args.after,
        until_id=args.until_id,
        since=args.since,
        until=args.until,
    )

    with open_log(args) as log:
        page_size = min(args.limit, log.settings.batch_size) if args.limit else None
        events: Iterable[Event] = log.query(where, page_size=page_size)
        if args.limit is not None:
            events = itertools.islice(events, args.limit)
        if args.format == "jsonl":
            for event in events:
                write_json_line(event.to_json_dict())
        else:
            _write_table(events)
    return EXIT_OK


TABLE_HEADER = ("ID", "OCCURRED_AT", "TYPE", "TOPICS", "DATA")


def _write_table(events: Iterable[Event]) -> None:
    widths = [len(title) for title in TABLE_HEADER[:-1]]
    header_written = False
    iterator = iter(events)
    while block := list(itertools.islice(iterator, TABLE_BLOCK_ROWS)):
        rows = [_table_row(event) for event in block]
        widths = [max(width, *(len(row[i]) for row in rows)) for i, width in enumerate(widths)]
        data_width = max(MIN_DATA_WIDTH, _terminal_width() - sum(widths) - 2 * len(widths))
        if not header_written:
            write_line(_format_row(TABLE_HEADER, widths, data_width).rstrip())
            header_written = True
        for row in rows:
            sys.stdout.write(_format_row(row, widths, data_width).rstrip() + "\n")
        sys.stdout.flush()
    if not header_written:
        print("no events match", file=sys.stderr)


def _table_row(event: Event) -> tuple[str, str, str, str, str]:
    occurred_at = event.occurred_at.astimezone(dt.timezone.utc)
    data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
    return (
        str(event.id),
        occurred_at.isoformat(sep=" ", timespec="microseconds"),
        _cut(_printable(event.type), MAX_TYPE_WIDTH),
        _cut(",".join(_printable(t) for t in event.topics), MAX_TOPICS_WIDTH),
        _printable(data),
    )


def _format_row(row: Sequence[str], widths: Sequence[int], data_width: int) -> str:
    ident, occurred_at, type_, topics, data = row
    return "  ".join(
        (
            ident.rjust(widths[0]),
            occurred_at.ljust(widths[1]),
            type_.ljust(widths[2]),
            topics.ljust(widths[3]),
            _cut(data, data_width),
        )
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _printable(text: str) -> str:
    # Control characters in a topic or in data would break the table's lines and columns.
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _terminal_width() -> int:
    return shutil.get_terminal_size(fallback=(120, 24)).columns
