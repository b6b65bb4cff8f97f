"""Alembic migrations: what they create, down and up again, beside an application's history."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql

import eventlog
from eventlog import SchemaNotFound, channel_for, migrate
from eventlog._settings import sqlalchemy_url
from eventlog.schema import VERSION_TABLE, build_metadata
from flavors import TEST_OPTIONS, scratch_database, wait_until

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = {"channel_v1", "ordering_lock_v1", "publish_v1", "publish_batch_v1", "reject_change_v1"}
TRIGGERS = {"events_reject_update_delete", "events_reject_truncate"}
INDEXES = {"events_pkey", "events_topics_idx", "events_occurred_at_idx"}


@pytest.fixture
def empty_db(database_url: str) -> Iterator[str]:
    with scratch_database(database_url, "migrations") as url:
        yield url


def head_revision() -> str:
    head = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused/x")).get_current_head()
    assert head is not None
    return head


def catalog(url: str, schema: str) -> dict[str, object]:
    """What exists of the log in `schema`, read from the system catalogs."""
    with psycopg.connect(url, autocommit=True) as conn:
        def names(query: str) -> set[str]:
            return {row[0] for row in conn.execute(query, [schema]).fetchall()}

        versions: list[str] | None = None
        if conn.execute("SELECT to_regclass(%s)", [f'"{schema}".{VERSION_TABLE}']).fetchone() != (None,):
            versions = [
                row[0]
                for row in conn.execute(
                    sql.SQL("SELECT version_num FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(VERSION_TABLE))
                ).fetchall()
            ]
        return {
            "schema": names("SELECT nspname FROM pg_namespace WHERE nspname = %s"),
            "tables": names("SELECT tablename FROM pg_tables WHERE schemaname = %s"),
            "functions": names(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s"
            ),
            "triggers": names(
                "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT t.tgisinternal"
            ),
            "indexes": names("SELECT indexname FROM pg_indexes WHERE schemaname = %s"),
            "versions": versions,
            "public alembic_version": conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()[0],  # type: ignore[index]
        }


def assert_complete(url: str, schema: str) -> None:
    found = catalog(url, schema)
    assert found["schema"] == {schema}
    assert {"events", VERSION_TABLE} <= found["tables"]  # type: ignore[operator]
    assert FUNCTIONS <= found["functions"]  # type: ignore[operator]
    assert found["triggers"] == TRIGGERS
    assert INDEXES <= found["indexes"]  # type: ignore[operator]
    assert found["versions"] == [head_revision()]


def assert_log_works(url: str, schema: str) -> list[eventlog.Event]:
    """Publish through the migrated log; the NOTIFY reaches a plain LISTEN."""
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_for("shop:products", schema))))
        with eventlog.EventLog(url, schema=schema, **TEST_OPTIONS) as log:
            event = log.publish("shop:products", "product_created", {"id": 1})
            rung = [int(n.payload) for n in listener.notifies(timeout=30, stop_after=1)]
            stored = log.read()
    assert rung == [event.id]
    assert stored[-1] == event
    return stored


def test_upgrade_empty_database(empty_db: str) -> None:
    migrate.upgrade(empty_db, schema="audit")

    assert_complete(empty_db, "audit")
    assert catalog(empty_db, "audit")["public alembic_version"] is None
    assert [e.id for e in assert_log_works(empty_db, "audit")] == [1]


def test_upgrade_twice(empty_db: str) -> None:
    migrate.upgrade(empty_db, schema="audit")
    migrate.upgrade(empty_db, schema="audit")

    assert_complete(empty_db, "audit")


def alembic_cli(url: str, cwd: Path, *args: str) -> str:
    env = {**os.environ, "EVENTLOG_DATABASE_URL": url}
    env.pop("EVENTLOG_SCHEMA", None)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_alembic_command(empty_db: str, tmp_path: Path) -> None:
    alembic_cli(empty_db, tmp_path, "-x", "schema=audit", "upgrade", "head")

    assert_complete(empty_db, "audit")
    assert_log_works(empty_db, "audit")
    assert f"{head_revision()} (head)" in alembic_cli(empty_db, tmp_path, "-x", "schema=audit", "current")


@pytest.mark.parametrize("events", [0, 3])
def test_down_and_up(empty_db: str, events: int) -> None:
    migrate.upgrade(empty_db, schema="audit")
    with eventlog.EventLog(empty_db, schema="audit", **TEST_OPTIONS) as log:
        log.publish_many([("t", "before_downgrade", {"n": n}) for n in range(events)])

    migrate.downgrade(empty_db, schema="audit")

    gone = catalog(empty_db, "audit")
    assert gone["tables"] == {VERSION_TABLE}
    assert gone["functions"] == set()
    assert gone["triggers"] == set()
    assert gone["versions"] == []
    migrate.upgrade(empty_db, schema="audit")
    assert_complete(empty_db, "audit")
    assert [e.id for e in assert_log_works(empty_db, "audit")] == [1]  # downgrade dropped the events


APP_ENV = '''
from alembic import context
from sqlalchemy import create_engine, pool

engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
'''

APP_REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = "app0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True), schema="public")


def downgrade():
    op.drop_table("orders", schema="public")
'''


def app_history(folder: Path, url: str) -> Config:
    """An application's own Alembic history, with Alembic's defaults."""
    (folder / "versions").mkdir(parents=True)
    (folder / "env.py").write_text(textwrap.dedent(APP_ENV))
    (folder / "versions" / "app0001_orders.py").write_text(textwrap.dedent(APP_REVISION))
    config = Config()
    config.set_main_option("script_location", str(folder))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def heads(url: str, version_schema: str | None, version_table: str) -> set[str]:
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": version_table, "version_table_schema": version_schema}
            )
            return set(context.get_current_heads())
    finally:
        engine.dispose()


@pytest.mark.parametrize("log_schema", ["eventlog", "public"])
def test_beside_application_history(empty_db: str, tmp_path: Path, log_schema: str) -> None:
    app = app_history(tmp_path / "app", empty_db)
    log_heads = lambda: heads(empty_db, log_schema, VERSION_TABLE)  # noqa: E731
    app_heads = lambda: heads(empty_db, None, "alembic_version")  # noqa: E731

    command.upgrade(app, "head")
    migrate.upgrade(empty_db, schema=log_schema)
    command.upgrade(app, "head")  # finds only its own revision, so it has nothing to do

    assert app_heads() == {"app0001"}
    assert log_heads() == {head_revision()}
    assert_complete(empty_db, log_schema)

    command.downgrade(app, "base")
    assert app_heads() == set()
    assert log_heads() == {head_revision()}
    assert_log_works(empty_db, log_schema)

    command.upgrade(app, "head")
    migrate.downgrade(empty_db, schema=log_schema)
    assert log_heads() == set()
    assert app_heads() == {"app0001"}
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT to_regclass('public.orders')").fetchone() != (None,)


def compare(url: str, schema: str) -> list[object]:
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": lambda name, kind, parents: name == schema if kind == "schema" else True,
                    "version_table": VERSION_TABLE,
                    "version_table_schema": schema,
                    "compare_type": True,
                    "compare_server_default": True,
                },
            )
            return list(compare_metadata(context, build_metadata(schema)))
    finally:
        engine.dispose()


def test_autogenerate_finds_no_difference(database_url: str, schema: str, admin: psycopg.Connection) -> None:
    assert compare(database_url, schema) == []

    # The comparison does look at this schema: a missing index shows.
    admin.execute(sql.SQL("DROP INDEX {}.events_occurred_at_idx").format(sql.Identifier(schema)))
    assert compare(database_url, schema) != []


def waiting_backends(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(DISTINCT pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND a.datname = current_database()"
    ).fetchone()
    return row[0] if row else 0


def test_concurrent_upgrades(empty_db: str) -> None:
    # Two threads of this process and another process migrate the same schema
    # at once. The test holds the migration lock until the thread and the other
    # process both wait in the database, so their statements overlap for sure.
    failures: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(empty_db, schema="audit")
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    script = f"from eventlog import migrate; migrate.upgrade({empty_db!r}, schema='audit')"
    with psycopg.connect(empty_db) as holder, psycopg.connect(empty_db, autocommit=True) as watcher:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", [migrate.migration_lock_key("audit")])
        other = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: waiting_backends(watcher) >= 2, timeout=60, what="a thread and a process waiting")
        holder.commit()
    for thread in threads:
        thread.join(120)
    _, stderr = other.communicate(timeout=120)

    assert failures == []
    assert other.returncode == 0, stderr
    assert_complete(empty_db, "audit")
    assert_log_works(empty_db, "audit")


async def test_schema_not_found(database_url: str) -> None:
    name = "never_migrated"
    with eventlog.EventLog(database_url, schema=name, **TEST_OPTIONS) as log:
        for call in (lambda: log.publish("t", "e"), log.head, log.read, lambda: log.publish_many([("t", "e")])):
            with pytest.raises(SchemaNotFound) as raised:
                call()
            assert "eventlog migrate" in str(raised.value)
            assert repr(name) in str(raised.value)
    async with eventlog.AsyncEventLog(database_url, schema=name, **TEST_OPTIONS) as alog:
        with pytest.raises(SchemaNotFound, match="eventlog migrate"):
            await alog.publish("t", "e")
        with pytest.raises(SchemaNotFound, match="eventlog migrate"):
            await alog.head()


def test_schema_not_found_after_downgrade(database_url: str, schema: str) -> None:
    migrate.downgrade(database_url, schema=schema)

    with eventlog.EventLog(database_url, schema=schema, **TEST_OPTIONS) as log:
        with pytest.raises(SchemaNotFound, match="eventlog migrate"):
            log.publish("t", "e")


# -- the wheel -------------------------------------------------------------------------


def build_wheel(tmp_path: Path) -> Path:
    # Build from a copy, so the build leaves nothing in the working tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("eventlog", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    command_line = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)]
    if _builds_without_isolation():
        command_line.append("--no-build-isolation")
    result = subprocess.run(command_line, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = out.glob("eventlog-*.whl")
    return wheel


def _builds_without_isolation() -> bool:
    # setuptools builds wheels by itself from 70.1 on. Older versions need the
    # wheel package, and pyproject.toml requires 69 or newer.
    try:
        version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1)


@pytest.mark.slow
def test_wheel(tmp_path: Path, empty_db: str) -> None:
    wheel = build_wheel(tmp_path)

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "eventlog/_migrations/env.py" in names
    assert "eventlog/_migrations/script.py.mako" in names
    for version in (ROOT / "migrations" / "versions").glob("[0-9]*.py"):
        assert f"eventlog/_migrations/versions/{version.name}" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=240,
    )
    # The dependencies come from this interpreter's site-packages, after the
    # venv's own, so eventlog itself is the wheel's copy.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "eventlog_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    env = {**os.environ, "EVENTLOG_DATABASE_URL": empty_db}
    env.pop("PYTHONPATH", None)
    env.pop("EVENTLOG_SCHEMA", None)
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    where = subprocess.run([str(python), "-c", "import eventlog; print(eventlog.__file__)"], **run)  # type: ignore[call-overload]
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    result = subprocess.run([str(venv / "bin" / "eventlog"), "migrate", "--schema", "from_wheel"], **run)  # type: ignore[call-overload]

    assert result.returncode == 0, result.stdout + result.stderr
    assert_complete(empty_db, "from_wheel")
    assert_log_works(empty_db, "from_wheel")
