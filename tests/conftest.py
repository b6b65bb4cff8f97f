"""Shared pytest configuration for the eventlog test suite."""

from __future__ import annotations

import itertools
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import psycopg
import pytest

import eventlog
from eventlog import migrate
from eventlog._pgserver import (
    SOURCES,
    LocalPostgres,
    PostgresServerError,
    find_binaries,
    probe_docker_engine,
)

# ===========================================================================
# Test database server
#
# The environment picks the PostgreSQL server that the suite runs against:
#
#   EVENTLOG_TEST_DATABASE_URL=postgresql://...  an existing server, used as is
#   EVENTLOG_TEST_BACKEND=docker                 a testcontainers container of
#                                                EVENTLOG_TEST_DOCKER_IMAGE
#                                                (default postgres:18)
#   EVENTLOG_TEST_BACKEND=embedded|system|auto   a LocalPostgres (default auto)
#
# Fixtures: database_url (str) and local_server (the LocalPostgres, or a skip
# when the suite did not start one).  Other shared fixtures go in the section
# after this one.
# ===========================================================================

BACKENDS = ("docker", *SOURCES)
DEFAULT_DOCKER_IMAGE = "postgres:18"
DOCKER_PROBE_TIMEOUT = 2.0  # seconds

# With fsync=off, data survives a server crash, which restart tests simulate
# with restart(mode="immediate"), because the written pages are still in the
# kernel's page cache.  Only a crash of the machine itself loses data.
TEST_SERVER_SETTINGS = {"fsync": "off"}


@dataclass
class SuiteDatabase:
    """The server the suite runs against."""

    backend: str  # "url", "docker", "embedded", "system" or "auto"
    url: str
    server: LocalPostgres | None = None


def selected_backend() -> str:
    """Return the backend that the environment selects, "url" for EVENTLOG_TEST_DATABASE_URL."""
    if os.environ.get("EVENTLOG_TEST_DATABASE_URL"):
        return "url"
    backend = os.environ.get("EVENTLOG_TEST_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise pytest.UsageError(
            f"invalid EVENTLOG_TEST_BACKEND={backend!r}: expected one of {', '.join(BACKENDS)}, "
            "or set EVENTLOG_TEST_DATABASE_URL to use an existing server"
        )
    return backend


def pytest_configure(config: pytest.Config) -> None:
    selected_backend()  # rejects an invalid EVENTLOG_TEST_BACKEND before collection


def pytest_report_header(config: pytest.Config) -> str:
    return describe_database()


def pytest_sessionstart(session: pytest.Session) -> None:
    # -q hides report headers, but a CI log still needs to say which server ran.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.option.verbose == -1:
        reporter.write_line(describe_database())


def describe_database() -> str:
    """Return one line that names the backend and the server version."""
    backend = selected_backend()
    if backend == "url":
        url = os.environ["EVENTLOG_TEST_DATABASE_URL"]
        return f"eventlog test database: EVENTLOG_TEST_DATABASE_URL={_redact_password(url)}, {_server_version(url)}"
    if backend == "docker":
        image = os.environ.get("EVENTLOG_TEST_DOCKER_IMAGE", DEFAULT_DOCKER_IMAGE)
        return f"eventlog test database: docker image {image}"
    try:
        binaries = find_binaries(backend)
    except PostgresServerError as exc:
        return f"eventlog test database: {backend}: unavailable: {exc}"
    return (
        f"eventlog test database: EVENTLOG_TEST_BACKEND={backend}, "
        f"PostgreSQL {binaries.version} ({binaries.source}) from {binaries.bindir}"
    )


@pytest.fixture(scope="session")
def suite_database() -> Iterator[SuiteDatabase]:
    backend = selected_backend()
    if backend == "url":
        yield SuiteDatabase("url", os.environ["EVENTLOG_TEST_DATABASE_URL"])
    elif backend == "docker":
        yield from _docker_database()
    else:
        yield from _local_database(backend)


@pytest.fixture(scope="session")
def database_url(suite_database: SuiteDatabase) -> str:
    """URL of the PostgreSQL server the suite runs against."""
    return suite_database.url


@pytest.fixture(scope="session")
def local_server(suite_database: SuiteDatabase) -> LocalPostgres:
    """The LocalPostgres behind database_url, for tests that stop or restart the server."""
    if suite_database.server is None:
        pytest.skip(f"needs a server this suite started, but the backend is {suite_database.backend}")
    return suite_database.server


# pytest.fail() is called outside the except blocks below so that the report
# shows the one message instead of a chained traceback.


def _local_database(source: str) -> Iterator[SuiteDatabase]:
    failure = None
    try:
        server = LocalPostgres(source, settings=TEST_SERVER_SETTINGS)  # type: ignore[arg-type]
        server.start()
    except PostgresServerError as exc:
        failure = f"EVENTLOG_TEST_BACKEND={source}: {exc}"
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    try:
        yield SuiteDatabase(source, server.url, server)
    finally:
        server.stop()


def _docker_database() -> Iterator[SuiteDatabase]:
    failure = None
    try:
        probe_docker_engine(DOCKER_PROBE_TIMEOUT)
    except PostgresServerError as exc:
        failure = f"EVENTLOG_TEST_BACKEND=docker: {exc}, or unset EVENTLOG_TEST_BACKEND to use a local server"
    if failure is not None:
        pytest.fail(failure, pytrace=False)

    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community namespace
        from testcontainers.postgres import PostgresContainer

    image = os.environ.get("EVENTLOG_TEST_DOCKER_IMAGE", DEFAULT_DOCKER_IMAGE)
    settings = [f"-c{name}={value}" for name, value in TEST_SERVER_SETTINGS.items()]
    # The postgres image's entrypoint passes arguments that start with "-" to postgres.
    container = PostgresContainer(image, driver=None).with_command(" ".join(settings))
    container.start()
    try:
        yield SuiteDatabase("docker", container.get_connection_url())
    finally:
        container.stop()


def _redact_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _server_version(url: str) -> str:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    except psycopg.Error as exc:
        return f"server unreachable ({_first_line(exc)})"
    return f"PostgreSQL {version}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ===========================================================================
# Shared fixtures
# ===========================================================================

_counter = itertools.count()

# Short intervals keep tests quick. Correct delivery does not depend on them: they
# only bound how long a missed doorbell can delay an event.
TEST_LOG_OPTIONS = dict(
    poll_interval=2.0, heartbeat_interval=2.0, heartbeat_timeout=2.0, connect_timeout=5.0
)


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A fresh, migrated log schema for one test, dropped afterwards."""
    name = f"t{os.getpid() % 10000}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    migrate.upgrade(database_url, schema=name)
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def log(database_url: str, schema: str) -> Iterator[eventlog.EventLog]:
    """An open EventLog on a fresh schema, with short intervals for tests."""
    with eventlog.EventLog(database_url, schema=schema, **TEST_LOG_OPTIONS) as opened:
        yield opened


@pytest.fixture
async def alog(database_url: str, schema: str) -> AsyncIterator[eventlog.AsyncEventLog]:
    """The AsyncEventLog twin of `log`."""
    async with eventlog.AsyncEventLog(database_url, schema=schema, **TEST_LOG_OPTIONS) as opened:
        yield opened


@pytest.fixture
def admin(database_url: str) -> Iterator[psycopg.Connection]:
    """A superuser autocommit connection for terminating backends and inspecting state."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
