"""The examples of docs/integration.md, run as written against a fresh database.

The env.py example runs in test_integration_alembic.py, inside a real Alembic
environment.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from _apps import DOC, app_database, doc_examples

import eventlog
from eventlog import migrate

EXAMPLES = doc_examples()


def test_every_example_is_tested():
    assert set(EXAMPLES) == {"fastapi-core", "fastapi-app", "psycopg-script", "psql", "alembic-env"}


@pytest.fixture
def shop_url(admin: psycopg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A shop's database: its products table, and the log in its default schema."""
    with app_database(admin, database_url) as url:
        migrate.upgrade(url, schema="eventlog")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE products (id int PRIMARY KEY, stock int NOT NULL, reserved int NOT NULL DEFAULT 0)")
            conn.execute("INSERT INTO products (id, stock) VALUES (7, 10)")
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.delenv("EVENTLOG_SCHEMA", raising=False)
        yield url


def run_example(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Run an example as the module its first line names, such as ``# shop/carts.py``."""
    language, code = EXAMPLES[name]
    assert language == "python"
    path = code.splitlines()[0].removeprefix("# ").split()[0]
    module_name = path.removesuffix(".py").replace("/", ".")
    package = module_name.rpartition(".")[0]
    if package and package not in sys.modules:
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
    exec(compile(code, f"{DOC.name}:{name}", "exec"), module.__dict__)
    return module


def read_log(url: str) -> list[eventlog.Event]:
    with eventlog.EventLog(url, schema="eventlog") as log:
        return log.read()


def create_tables(url: str, metadata: sa.MetaData) -> None:
    engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
    metadata.create_all(engine)
    engine.dispose()


async def test_fastapi_core(shop_url, monkeypatch):
    carts = run_example("fastapi-core", monkeypatch)
    create_tables(shop_url, carts.Base.metadata)

    async with carts.Session() as session:
        event_id = await carts.add_cart_item(session, 42, 7, 2)
    await carts.engine.dispose()

    [event] = read_log(shop_url)
    assert (event.id, event.topics, event.type) == (event_id, ("shop:cart:user:42",), "item_added")
    with psycopg.connect(shop_url) as conn:
        rows = conn.execute("SELECT id, user_id, product_id, quantity FROM cart_items").fetchall()
    assert rows == [(event.data["item_id"], 42, 7, 2)]


def test_fastapi_app(shop_url, monkeypatch):
    pytest.importorskip("fastapi", reason="the FastAPI example needs fastapi and httpx")
    pytest.importorskip("httpx", reason="the FastAPI example needs fastapi and httpx")
    from fastapi.testclient import TestClient

    carts = run_example("fastapi-core", monkeypatch)
    api = run_example("fastapi-app", monkeypatch)
    create_tables(shop_url, carts.Base.metadata)

    with TestClient(api.app) as client:
        response = client.post("/carts/42/items", json={"product_id": 7, "quantity": 3})
        invalid = client.post("/carts/42/items", json={"product_id": "seven"})
        client.portal.call(carts.engine.dispose)

    assert response.status_code == 201, response.text
    assert invalid.status_code == 422
    [event] = read_log(shop_url)
    assert response.json() == {"event_id": event.id}
    assert event.data["quantity"] == 3


def test_psycopg_script(shop_url, monkeypatch, capsys):
    run_example("psycopg-script", monkeypatch)

    [event] = read_log(shop_url)
    assert event.topics == ("shop:inventory", "shop:products:7")
    assert event.metadata == {"source": "reserve_stock"}
    assert capsys.readouterr().out == f"published [{event.id}]\n"
    with psycopg.connect(shop_url) as conn:
        assert conn.execute("SELECT stock, reserved FROM products").fetchone() == (8, 2)


def test_psql(shop_url):
    language, script = EXAMPLES["psql"]
    assert language == "sql"
    with psycopg.connect(shop_url, autocommit=True) as conn:
        conn.execute(script)  # BEGIN ... COMMIT, as psql sends it

    [event] = read_log(shop_url)
    assert (event.type, event.data, event.metadata) == (
        "stock_changed",
        {"product_id": 7, "delta": -2},
        {"source": "warehouse-sync"},
    )
    with psycopg.connect(shop_url) as conn:
        assert conn.execute("SELECT stock FROM products").fetchone() == (8,)
