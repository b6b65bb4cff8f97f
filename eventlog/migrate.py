"""Apply eventlog's Alembic migrations from an installed package.

The migrations ship inside the package as ``eventlog._migrations``; in a source
checkout that package maps to the top-level ``migrations/`` folder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy.exc
from alembic import command
from alembic.config import Config

from ._settings import Settings
from .errors import translate
from .schema import EVENTS_TABLE, VERSION_TABLE

__all__ = [
    "alembic_config",
    "downgrade",
    "exclude_log",
    "migration_lock_key",
    "migrations_path",
    "upgrade",
]

logger = logging.getLogger(__name__)

# Alembic keeps the running migration's context in module globals (`alembic.context`,
# `alembic.op`), so two migrations run by threads of one process would use each
# other's. Processes are kept apart by an advisory lock in env.py instead.
_alembic_lock = threading.Lock()


def migrations_path() -> Path:
    """Return the folder that contains env.py and the versions of eventlog's history."""
    from . import _migrations

    return Path(_migrations.__file__).resolve().parent


def migration_lock_key(schema: str) -> int:
    """Return the advisory lock key that serializes migrations of the log in `schema`."""
    return zlib.crc32(f"eventlog-migrate:{schema}".encode()) & 0x7FFFFFFF


def alembic_config(
    database_url: str | None = None,
    *,
    schema: str | None = None,
    connection: Any = None,
) -> Config:
    """Return an Alembic `Config` for eventlog's history, without any ini file.

    `connection` may be an open SQLAlchemy `Connection`; the migrations then run
    in its transaction, and committing is up to the caller.
    """
    settings = Settings.load(database_url, schema_name=schema)
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes["eventlog_schema"] = settings.schema_name
    if connection is not None:
        config.attributes["connection"] = connection
    elif settings.database_url is not None:
        # ConfigParser treats % as interpolation; URL-encoded passwords contain it.
        url = settings.conninfo().replace("%", "%%")
        config.set_main_option("sqlalchemy.url", url)
    else:
        settings.conninfo()  # raises ConfigurationError with the fix
    return config


def upgrade(
    database_url: str | None = None,
    *,
    schema: str | None = None,
    revision: str = "head",
    connection: Any = None,
) -> None:
    """Upgrade the log's schema to `revision` (default: the newest)."""
    config = alembic_config(database_url, schema=schema, connection=connection)
    logger.info(
        "upgrading event log schema %r to %s", config.attributes["eventlog_schema"], revision
    )
    with _alembic_lock, _outer_environment_kept(), _translated(config):
        command.upgrade(config, revision)


def downgrade(
    database_url: str | None = None,
    *,
    schema: str | None = None,
    revision: str = "base",
    connection: Any = None,
) -> None:
    """Downgrade the log's schema to `revision` (default: nothing left)."""
    config = alembic_config(database_url, schema=schema, connection=connection)
    logger.info(
        "downgrading event log schema %r to %s", config.attributes["eventlog_schema"], revision
    )
    with _alembic_lock, _outer_environment_kept(), _translated(config):
        command.downgrade(config, revision)


@contextlib.contextmanager
def _translated(config: Config) -> Iterator[None]:
    """Raise eventlog errors for the driver's errors, as the rest of the library does."""
    try:
        yield
    except sqlalchemy.exc.DBAPIError as exc:
        if isinstance(exc.orig, psycopg.Error):
            raise translate(exc.orig, config.attributes["eventlog_schema"]) from exc
        raise


@contextlib.contextmanager
def _outer_environment_kept() -> Iterator[None]:
    # An application's env.py may call upgrade() inside its own Alembic run. Alembic
    # keeps the running environment in the globals of `alembic.context` and
    # `alembic.op`, and our run deletes them on exit, so put the application's back.
    from alembic import context, op

    outer = [m._proxy for m in (context, op) if getattr(m, "_proxy", None) is not None]
    try:
        yield
    finally:
        for proxy in outer:
            proxy._install_proxy()


IncludeName = Callable[[str | None, str, Mapping[str, Any]], bool]


def exclude_log(schema: str | None = None, *, include_name: IncludeName | None = None) -> IncludeName:
    """Return an Alembic ``include_name`` hook that leaves the log out of an application's history.

    For the application's own env.py, so that ``alembic revision --autogenerate``
    never proposes to drop or change the log's tables, which eventlog's own
    migrations manage::

        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            include_name=eventlog.migrate.exclude_log(),
        )

    `schema` is the log's schema (default: ``EVENTLOG_SCHEMA`` or ``eventlog``).
    Pass the application's own hook as `include_name` to apply it to everything else.
    """
    log_schema = Settings.load(schema_name=schema).schema_name
    log_tables = {EVENTS_TABLE, VERSION_TABLE}

    def include(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
        if type_ == "schema" and name == log_schema:
            return False
        if type_ == "table":
            table_schema = parent_names.get("schema_name")
            if table_schema is None and name in log_tables:
                # Alembic names the connection's default schema None.
                table_schema = _default_schema()
            if table_schema == log_schema:
                return False
        return include_name(name, type_, parent_names) if include_name is not None else True

    return include


def _default_schema() -> str:
    from alembic import context

    try:
        return context.get_context().dialect.default_schema_name or "public"
    except Exception:  # outside a running Alembic environment (Alembic raises a bare Exception)
        return "public"
