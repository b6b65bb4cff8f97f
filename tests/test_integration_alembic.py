"""eventlog's migrations inside an application's own Alembic environment.

Each test builds the application's environment in a temporary folder, with its
models in ``public`` of a fresh database, and runs Alembic's commands on it.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import alembic
import psycopg
import pytest
from _apps import app_database, doc_examples
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import eventlog.migrate

MODELS = '''
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Cart(Base):
    __tablename__ = "carts"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int]


class CartItem(Base):
    __tablename__ = "cart_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    cart_id: Mapped[int] = mapped_column(ForeignKey("carts.id"))
    quantity: Mapped[int]
'''

# The documented env.py with the two knobs the tests turn: the schemas that
# autogenerate compares, and the hook that leaves the log out.
ENV_VARIANT = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

import eventlog.migrate
from shop.models import Base

config = context.config
engine = engine_from_config(
    config.get_section(config.config_ini_section, {{}}), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_schemas={include_schemas},
        include_name={include_name},
    )
    with context.begin_transaction():
        eventlog.migrate.upgrade(connection=connection)
        context.run_migrations()
'''


@pytest.fixture
def app_url(admin: psycopg.Connection, database_url: str) -> Iterator[str]:
    with app_database(admin, database_url) as url:
        yield url


@pytest.fixture
def app_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The application's source tree: shop/models.py and an empty migrations/ folder."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("shop", "shop.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    migrations = tmp_path / "migrations"
    (migrations / "versions").mkdir(parents=True)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, migrations / "script.py.mako")
    return tmp_path


def app_config(folder: Path, url: str, env_py: str) -> Config:
    (folder / "migrations" / "env.py").write_text(env_py)
    config = Config()
    config.set_main_option("script_location", str(folder / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("postgresql://", "postgresql+psycopg://", 1).replace("%", "%%"))
    return config


def autogenerate(config: Config, message: str) -> str:
    """Run ``alembic revision --autogenerate``; return the operations of the new revision."""
    script = command.revision(config, message=message, autogenerate=True)
    assert script is not None
    text = Path(script.path).read_text()
    upgrade = text.split("def upgrade() -> None:", 1)[1].split("def downgrade() -> None:", 1)[0]
    lines = [line.strip() for line in upgrade.splitlines()]
    return "\n".join(line for line in lines if line.startswith("op.") or line.startswith("sa."))


def versions(url: str, schema: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        app = conn.execute("SELECT version_num FROM public.alembic_version").fetchone()[0]
        log = conn.execute(f'SELECT version_num FROM "{schema}".eventlog_alembic_version').fetchone()[0]
    return {"app": app, "log": log}


def eventlog_head() -> str:
    return ScriptDirectory.from_config(eventlog.migrate.alembic_config("postgresql://unused/x")).get_current_head()


def test_documented_env(app_folder, app_url, monkeypatch):
    monkeypatch.delenv("EVENTLOG_SCHEMA", raising=False)
    language, env_py = doc_examples()["alembic-env"]
    assert language == "python"
    config = app_config(app_folder, app_url, env_py)

    first = autogenerate(config, "create carts")
    assert "op.create_table('carts'" in first
    assert "op.create_table('cart_items'" in first
    assert "event" not in first.lower()

    command.upgrade(config, "head")

    # Both histories applied, each in its own version table.
    assert versions(app_url, "eventlog") == {"app": ScriptDirectory.from_config(config).get_current_head(),
                                             "log": eventlog_head()}
    with eventlog.EventLog(app_url, schema="eventlog") as log:
        event = log.publish("shop:carts", "cart_created", {"id": 1})
        assert log.read() == [event]
    # With everything applied, the next autogenerate finds nothing to do.
    assert autogenerate(config, "nothing") == ""


@pytest.mark.parametrize(
    "log_schema, include_schemas",
    [
        pytest.param("eventlog", True, id="own-schema"),
        pytest.param("public", False, id="default-schema"),
    ],
)
def test_autogenerate_leaves_log_out(app_folder, app_url, monkeypatch, log_schema, include_schemas):
    monkeypatch.setenv("EVENTLOG_SCHEMA", log_schema)
    env_py = ENV_VARIANT.format(include_schemas=include_schemas, include_name="eventlog.migrate.exclude_log()")
    config = app_config(app_folder, app_url, env_py)
    autogenerate(config, "create carts")
    command.upgrade(config, "head")
    assert versions(app_url, log_schema)["log"] == eventlog_head()

    assert autogenerate(config, "nothing") == ""


@pytest.mark.parametrize(
    "log_schema, include_schemas",
    [
        pytest.param("eventlog", True, id="own-schema"),
        pytest.param("public", False, id="default-schema"),
    ],
)
def test_without_hook_log_shows_up(app_folder, app_url, monkeypatch, log_schema, include_schemas):
    """The control: without exclude_log(), autogenerate would drop the log's tables."""
    monkeypatch.setenv("EVENTLOG_SCHEMA", log_schema)
    env_py = ENV_VARIANT.format(include_schemas=include_schemas, include_name=None)
    config = app_config(app_folder, app_url, env_py)

    # env.py created the log in the same transaction, right before the comparison.
    operations = autogenerate(config, "create carts")
    assert "op.create_table('carts'" in operations
    assert "op.drop_table('events'" in operations
    assert "op.drop_table('eventlog_alembic_version'" in operations


def test_exclude_log_keeps_own_hook():
    seen = []

    def own(name, type_, parent_names):
        seen.append(name)
        return name != "legacy"

    include = eventlog.migrate.exclude_log("audit", include_name=own)

    assert include("audit", "schema", {}) is False
    assert include("events", "table", {"schema_name": "audit"}) is False
    assert include("events", "table", {"schema_name": "shop"}) is True
    assert include("legacy", "table", {"schema_name": None}) is False
    assert seen == ["events", "legacy"]
