"""Settings of one event log, read from arguments or ``EVENTLOG_*`` variables."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg.conninfo
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .errors import ConfigurationError

DEFAULT_SCHEMA = "eventlog"
MAX_DATA_BYTES = 1024 * 1024
# The highest max_data_bytes: data and metadata of one event must fit in one write
# (256 MiB, eventlog._sql.MAX_BATCH_BYTES). NOTE: jsonb may still fail below it for
# values of very many small elements (see the guide), which no byte limit predicts.
MAX_DATA_BYTES_LIMIT = 128 * 1024 * 1024

# Lower-case identifiers only, so the schema never needs quoting in SQL that other
# tools write by hand. Channel names start with the schema name and must fit in 63
# bytes with a 32-character topic hash behind it, hence the 30-character limit.
_SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,29}$")

# Environment variable for each setting; the database URL is the one most often set.
ENVIRONMENT = {
    "database_url": "EVENTLOG_DATABASE_URL",
    "schema_name": "EVENTLOG_SCHEMA",
    "poll_interval": "EVENTLOG_POLL_INTERVAL",
    "heartbeat_interval": "EVENTLOG_HEARTBEAT_INTERVAL",
    "heartbeat_timeout": "EVENTLOG_HEARTBEAT_TIMEOUT",
    "batch_size": "EVENTLOG_BATCH_SIZE",
    "max_data_bytes": "EVENTLOG_MAX_DATA_BYTES",
    "pool_max_size": "EVENTLOG_POOL_MAX_SIZE",
    "prepared_statements": "EVENTLOG_PREPARED_STATEMENTS",
}


class Settings(BaseModel):
    """Configuration of one log.

    Intervals are in seconds. `database_url` is a secret: it never appears in
    `repr()`, in logs or in error messages (see `redact_url`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    database_url: SecretStr | None = None
    schema_name: str = DEFAULT_SCHEMA
    poll_interval: float = Field(default=5.0, gt=0)
    heartbeat_interval: float = Field(default=10.0, gt=0)
    heartbeat_timeout: float = Field(default=5.0, gt=0)
    reconnect_initial_delay: float = Field(default=0.1, gt=0)
    reconnect_max_delay: float = Field(default=10.0, gt=0)
    batch_size: int = Field(default=500, ge=1, le=100_000)
    max_data_bytes: int = Field(default=MAX_DATA_BYTES, ge=1, le=MAX_DATA_BYTES_LIMIT)
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    prepared_statements: bool = True

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if not _SCHEMA_PATTERN.match(value):
            raise ValueError(
                f"invalid schema name {value!r}: use 1 to 30 lower-case letters, "
                "digits or underscores, starting with a letter or underscore"
            )
        return value

    @classmethod
    def load(cls, database_url: str | None = None, **overrides: Any) -> Settings:
        """Build settings from ``EVENTLOG_*`` variables, then explicit arguments.

        Arguments that are None are ignored, so callers can pass optional CLI
        options straight through.
        """
        values: dict[str, Any] = {}
        for field, variable in ENVIRONMENT.items():
            raw = os.environ.get(variable)
            if raw not in (None, ""):
                values[field] = raw
        if database_url is not None:
            values["database_url"] = database_url
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValueError as exc:
            raise ConfigurationError(_describe_validation_error(exc)) from None

    def conninfo(self) -> str:
        """Return the libpq connection string, raising if no URL was configured."""
        if self.database_url is None:
            raise ConfigurationError(
                "no database URL: pass database_url=... or set EVENTLOG_DATABASE_URL, "
                "e.g. postgresql://user:password@localhost:5432/app"
            )
        return normalize_url(self.database_url.get_secret_value())

    def redacted_url(self) -> str:
        """Return the database URL without its password, for logs and messages."""
        if self.database_url is None:
            return "<no database URL>"
        return redact_url(self.database_url.get_secret_value())


def normalize_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs (``postgresql+psycopg://``) as libpq URLs."""
    url = url.strip()
    match = re.match(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", url)
    if match:
        url = "postgresql://" + url[match.end():]
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # The value is not shown: a URL that fails to parse cannot be redacted
        # reliably, and it may contain a password.
        raise ConfigurationError(
            "invalid database URL (not shown, as it may contain a password): expected "
            "postgresql://user:password@host:port/dbname or a libpq key=value string"
        ) from None
    return url


def sqlalchemy_url(url: str) -> str:
    """Return `url` in the form SQLAlchemy needs to pick the psycopg 3 driver."""
    url = normalize_url(url)
    if "://" not in url:
        raise ConfigurationError(
            "SQLAlchemy (and so `eventlog migrate`) needs a URL of the form "
            "postgresql://user:password@host:port/dbname, not a key=value string"
        )
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def redact_url(url: str) -> str:
    """Return `url` with any password replaced by ``***``."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if "@" in rest:
            credentials, location = rest.rsplit("@", 1)
            user = credentials.split(":", 1)[0]
            rest = f"{user}:***@{location}" if ":" in credentials else f"{user}@{location}"
        rest = re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)
        return f"{scheme}://{rest}"
    return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)


def _describe_validation_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        field = ".".join(str(p) for p in error.get("loc", ())) or "settings"
        variable = ENVIRONMENT.get(field)
        where = f"{field} (or {variable})" if variable else field
        value = error.get("input")
        shown = "<secret>" if field == "database_url" else repr(value)
        parts.append(f"invalid {where} {shown}: {error.get('msg')}")
    return "; ".join(parts)
