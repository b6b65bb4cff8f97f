"""Alembic environment for eventlog's migration history.

The schema of the log comes from, in order: ``config.attributes["eventlog_schema"]``
(set by `eventlog.migrate`), ``alembic -x schema=NAME``, ``EVENTLOG_SCHEMA``, and the
default ``eventlog``. The database comes from ``config.attributes["connection"]``
(an open SQLAlchemy connection), the ``sqlalchemy.url`` option, or
``EVENTLOG_DATABASE_URL``.
"""

from __future__ import annotations

import logging

from alembic import context
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Connection

from eventlog._settings import Settings, sqlalchemy_url
from eventlog.migrate import migration_lock_key
from eventlog.schema import VERSION_TABLE, build_metadata

logger = logging.getLogger("eventlog.migrations")

config = context.config


def _schema() -> str:
    schema = config.attributes.get("eventlog_schema")
    if schema is None:
        schema = context.get_x_argument(as_dictionary=True).get("schema")
    return Settings.load(schema_name=schema).schema_name


def _include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    # Autogenerate compares only the log's own schema; an application's tables
    # elsewhere in the database are none of this history's business.
    if type_ == "schema":
        return name == SCHEMA
    return True


SCHEMA = _schema()
OPTIONS = dict(
    target_metadata=build_metadata(SCHEMA),
    version_table=VERSION_TABLE,
    version_table_schema=SCHEMA,
    include_schemas=True,
    include_name=_include_name,
    eventlog_schema=SCHEMA,
)


def _run_online(connection: Connection) -> None:
    # Two processes migrating the same log at once would race on CREATE
    # statements; the second waits here and then finds nothing left to do. The
    # lock comes first: CREATE SCHEMA IF NOT EXISTS is no exception, the second
    # of two concurrent ones fails with a unique violation.
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": migration_lock_key(SCHEMA)})
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or Settings.load().conninfo()
    context.configure(url=sqlalchemy_url(url), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_online(connection)
        return

    url = config.get_main_option("sqlalchemy.url") or Settings.load().conninfo()
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.begin() as connection:
        _run_online(connection)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
