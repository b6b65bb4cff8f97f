"""Apply eventlog's Alembic migrations from an installed package.

The migrations ship inside the package as ``eventlog._migrations``; in a source
checkout that package maps to the top-level ``migrations/`` folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from ._settings import Settings

__all__ = ["alembic_config", "downgrade", "migrations_path", "upgrade"]

logger = logging.getLogger(__name__)


def migrations_path() -> Path:
    """Return the folder that holds env.py and the versions of eventlog's history."""
    from . import _migrations

    return Path(_migrations.__file__).resolve().parent


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
    command.downgrade(config, revision)
