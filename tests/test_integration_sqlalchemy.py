"""Publishing in the transaction of a SQLAlchemy session or connection (eventlog.sqlalchemy)."""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa
from helpers import delivery_problems, wait_until
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventlog
from eventlog import migrate
from eventlog._settings import sqlalchemy_url
from eventlog.errors import InvalidData, SchemaNotFound, TransactionStateError
from eventlog.sqlalchemy import publish, publish_many


class Base(DeclarativeBase):
    pass


class Cart(Base):
    __tablename__ = "carts"
    id: Mapped[int] = mapped_column(primary_key=True)
    items: Mapped[int] = mapped_column(default=0)


class CartItem(Base):
    __tablename__ = "cart_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    cart_id: Mapped[int] = mapped_column(sa.ForeignKey("carts.id"))
    product_id: Mapped[int]


def _app_url(database_url: str, schema: str) -> sa.URL:
    # The application's tables live in the test's schema, found through search_path;
    # the log's functions are always called schema-qualified.
    url = sa.make_url(sqlalchemy_url(database_url))
    return url.update_query_dict({"options": f"-csearch_path={schema}"})


@pytest.fixture
def engine(database_url: str, schema: str) -> Iterator[sa.Engine]:
    """The application's own engine and pool, with its tables beside the log."""
    engine = sa.create_engine(_app_url(database_url, schema), pool_size=4, max_overflow=20)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Cart), [{"id": n} for n in range(1, 17)])
        # Checked at COMMIT, so a transaction can fail after its events were written.
        conn.exec_driver_sql(
            "CREATE TABLE orders (id int, CONSTRAINT orders_id_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"
        )
    yield engine
    engine.dispose()


@pytest.fixture
async def aengine(database_url: str, schema: str, engine: sa.Engine) -> AsyncIterator[AsyncEngine]:
    aengine = create_async_engine(_app_url(database_url, schema))
    yield aengine
    await aengine.dispose()


def stored(log: eventlog.EventLog) -> list[tuple[int, str]]:
    return [(e.id, e.type) for e in log.read(limit=1000)]


def item_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(CartItem))


def holds_ordering_lock(admin: psycopg.Connection, pid: int) -> bool:
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s AND granted", (pid,)
    ).fetchone()
    return row[0] > 0


def backend_pid(conn: sa.Connection) -> int:
    return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()


# -- commit and rollback ---------------------------------------------------------------


@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_commit_together(engine, log, schema, admin, expire_on_commit):
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cur, stmt, *a: statements.append(stmt))
    event.listen(engine, "commit", lambda conn: statements.append("COMMIT"))

    with Session(engine, expire_on_commit=expire_on_commit) as session:
        with session.begin():
            flushed = CartItem(cart_id=1, product_id=7)
            session.add(flushed)
            session.flush()
            pending = publish(session, "shop:cart:user:1", "item_added", {"item_id": flushed.id}, schema=schema)
            session.add(CartItem(cart_id=1, product_id=8))  # flushed only at commit
            # Buffered: no lock is held while the business transaction goes on.
            assert not holds_ordering_lock(admin, backend_pid(session.connection()))
            assert pending.event is None
        commit_at = len(statements)
        # Expired or not, the committed row reads back.
        assert pending.event.data == {"item_id": flushed.id}

    assert stored(log) == [(pending.event.id, "item_added")]
    assert log.read()[0] == pending.event
    assert item_count(engine) == 2
    statements = statements[:commit_at]
    # The event is the last statement: after the final flush, right before COMMIT.
    assert statements[-1] == "COMMIT"
    assert "publish_batch_v1" in statements[-2]
    assert "INSERT INTO cart_items" in statements[-3]
    # One transaction wrote the rows and the event.
    xmins = admin.execute(
        f'SELECT xmin::text FROM "{schema}".cart_items UNION SELECT xmin::text FROM "{schema}".events'
    ).fetchall()
    assert len(xmins) == 1


class Abandoned(Exception):
    pass


def test_exception_before_commit(engine, log, schema):
    with pytest.raises(Abandoned), Session(engine) as session, session.begin():
        session.add(CartItem(cart_id=1, product_id=7))
        session.flush()
        pending = publish(session, "shop:cart:user:1", "item_added", schema=schema)
        raise Abandoned

    assert pending.discarded
    assert pending.event is None
    assert stored(log) == []
    assert item_count(engine) == 0


def test_violation_at_flush(engine, log, schema):
    with pytest.raises(exc.IntegrityError), Session(engine) as session, session.begin():
        pending = publish(session, "shop:cart:user:1", "item_added", schema=schema)
        session.add(CartItem(cart_id=99, product_id=7))  # no cart 99: fails at the final flush

    assert pending.discarded
    assert stored(log) == []
    assert item_count(engine) == 0


@pytest.mark.parametrize("target", ["session", "connection"])
def test_failed_commit(engine, log, schema, target):
    # The deferred constraint fails at COMMIT, after the events were written.
    with pytest.raises(exc.IntegrityError):
        if target == "session":
            with Session(engine) as session, session.begin():
                session.execute(text("INSERT INTO orders VALUES (1), (1)"))
                pending = publish(session, "shop:orders", "order_placed", schema=schema)
        else:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO orders VALUES (1), (1)"))
                pending = publish(conn, "shop:orders", "order_placed", schema=schema)

    assert pending.event is not None, "the event was written before the failed COMMIT"
    assert pending.discarded
    assert stored(log) == []
    # The pool's connections are clean: the next transaction publishes.
    with Session(engine) as session, session.begin():
        after = publish(session, "shop:orders", "order_placed", schema=schema)
    assert stored(log) == [(after.event.id, "order_placed")]


def test_missing_log(engine, log, schema):
    with pytest.raises(SchemaNotFound, match="no_such_log"), Session(engine) as session, session.begin():
        session.add(CartItem(cart_id=1, product_id=7))
        pending = publish(session, "shop:cart:user:1", "item_added", schema="no_such_log")

    assert pending.discarded
    assert item_count(engine) == 0


def test_invalid_event(engine, log, schema):
    with Session(engine) as session, session.begin():
        first = publish(session, "t", "kept", schema=schema)
        with pytest.raises(InvalidData, match="time zone"):
            publish(session, "t", "naive", {"at": dt.datetime(2026, 1, 2)}, schema=schema)
        with pytest.raises(InvalidData):
            publish_many(session, [("t", "ok", {}), ("t", "bad", {"x": float("nan")})], schema=schema)
        last = publish_many(session, [("t", "many-1"), {"topics": "t", "type": "many-2"}], schema=schema)

    assert stored(log) == [(first.event.id, "kept"), (last[0].event.id, "many-1"), (last[1].event.id, "many-2")]


def _publish_new_items(schema: str) -> Callable[[Session, object], None]:
    # The outbox pattern: a flush hook publishes one event per new row.
    def after_flush(session: Session, flush_context: object) -> None:
        for item in session.new:
            if isinstance(item, CartItem):
                publish(session, f"shop:cart:{item.cart_id}", "item_added", {"item_id": item.id}, schema=schema)

    return after_flush


def test_publish_from_flush_hook(engine, log, schema):
    with Session(engine) as session:
        event.listen(session, "after_flush", _publish_new_items(schema))
        with session.begin():
            session.add(CartItem(cart_id=1, product_id=1))
            session.flush()
            session.add(CartItem(cart_id=2, product_id=2))  # flushed by the commit itself

    assert [(e.topics, e.type) for e in log.read()] == [
        (("shop:cart:1",), "item_added"),
        (("shop:cart:2",), "item_added"),
    ]


async def test_async_publish_from_flush_hook(aengine, alog, schema):
    async with AsyncSession(aengine) as session:
        event.listen(session.sync_session, "after_flush", _publish_new_items(schema))
        async with session.begin():
            session.add(CartItem(cart_id=3, product_id=1))  # flushed by the commit itself

    assert [e.topics for e in await alog.read()] == [("shop:cart:3",)]


def test_wrong_target(log, schema):
    with pytest.raises(TypeError, match="eventlog.pg.transaction"):
        publish(object(), "t", "x", schema=schema)


# -- savepoints --------------------------------------------------------------------------


def test_session_savepoints(engine, log, schema):
    with Session(engine) as session, session.begin():
        before = publish(session, "t", "before", schema=schema)

        nested = session.begin_nested()
        session.add(CartItem(cart_id=1, product_id=1))
        dropped = publish(session, "t", "dropped", schema=schema)
        nested.rollback()

        with session.begin_nested():
            kept = publish(session, "t", "kept", schema=schema)
            with session.begin_nested():
                inner = publish(session, "t", "inner-kept", schema=schema)

        # A flush that fails inside a savepoint rolls back to that savepoint only.
        with pytest.raises(exc.IntegrityError), session.begin_nested():
            publish(session, "t", "failed-flush", schema=schema)
            session.add(CartItem(cart_id=99, product_id=1))
        session.add(CartItem(cart_id=1, product_id=2))
        after = publish(session, "t", "after", schema=schema)

    assert dropped.discarded
    assert not before.discarded
    assert [t for _, t in stored(log)] == ["before", "kept", "inner-kept", "after"]
    assert [before.event.id, kept.event.id, inner.event.id, after.event.id] == [i for i, _ in stored(log)]
    assert item_count(engine) == 1


def test_connection(engine, log, schema):
    with engine.begin() as conn:
        conn.execute(sa.insert(CartItem), {"cart_id": 1, "product_id": 1})
        first = publish(conn, "t", "first", schema=schema)
        savepoint = conn.begin_nested()
        dropped = publish(conn, "t", "dropped", schema=schema)
        savepoint.rollback()
        with conn.begin_nested():
            kept = publish(conn, "t", "kept", schema=schema)

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # autobegins the transaction
        third = publish(conn, "t", "third", schema=schema)
        conn.commit()
        conn.execute(text("SELECT 1"))
        publish(conn, "t", "rolled-back", schema=schema)
        conn.rollback()

    assert dropped.discarded
    assert stored(log) == [(first.event.id, "first"), (kept.event.id, "kept"), (third.event.id, "third")]


def test_connection_without_transaction(engine, schema):
    with engine.connect() as conn, pytest.raises(TransactionStateError, match="engine.begin"):
        publish(conn, "t", "x", schema=schema)


def test_joined_transaction(engine, log, schema):
    # The usual test-suite pattern: the session joins a transaction that its
    # connection's owner commits (or rolls back) later.
    with engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            kept = publish(session, "t", "joined", schema=schema)
            session.commit()
            dropped = publish(session, "t", "rolled-back", schema=schema)
            session.rollback()
        assert kept.event is None, "written only when the connection commits"
        outer.commit()

    assert dropped.discarded
    assert stored(log) == [(kept.event.id, "joined")]

    with engine.connect() as conn:
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            rolled_back = publish(session, "t", "outer-rolled-back", schema=schema)
            session.commit()
        outer.rollback()
    assert rolled_back.discarded
    assert len(stored(log)) == 1


def test_two_logs(engine, database_url, log, schema):
    # Each log has its own lock, and they are always taken in schema-name order.
    other = f"{schema}_b"
    migrate.upgrade(database_url, schema=other)
    try:
        with Session(engine) as session, session.begin():
            ours = publish(session, "t", "ours", schema=schema)
            theirs = publish(session, "t", "theirs", schema=other)
        with eventlog.EventLog(database_url, schema=other) as other_log:
            assert [e.id for e in other_log.read()] == [theirs.event.id]
        assert [e.id for e in log.read()] == [ours.event.id]
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{other}" CASCADE')


# -- asyncio ---------------------------------------------------------------------------


async def test_async_session(aengine, alog, schema):
    async with AsyncSession(aengine) as session:
        async with session.begin():
            session.add(CartItem(cart_id=2, product_id=5))
            pending = publish(session, "shop:cart:user:2", "item_added", {"product_id": 5}, schema=schema)
            nested = await session.begin_nested()
            dropped = publish(session, "shop:cart:user:2", "dropped", schema=schema)
            await nested.rollback()

        with pytest.raises(Abandoned):
            async with session.begin():
                session.add(CartItem(cart_id=2, product_id=6))
                abandoned = publish(session, "shop:cart:user:2", "abandoned", schema=schema)
                raise Abandoned

    assert dropped.discarded
    assert abandoned.discarded
    assert [(e.id, e.type) for e in await alog.read()] == [(pending.event.id, "item_added")]


async def test_async_connection(aengine, alog, schema):
    async with aengine.begin() as conn:
        await conn.execute(sa.insert(CartItem), {"cart_id": 3, "product_id": 1})
        pending = publish(conn, "t", "async-connection", schema=schema)
        async with conn.begin_nested() as savepoint:
            dropped = publish(conn, "t", "dropped", schema=schema)
            await savepoint.rollback()

    assert dropped.discarded
    assert [(e.id, e.type) for e in await alog.read()] == [(pending.event.id, "async-connection")]


# -- ordering and locking ----------------------------------------------------------------


@pytest.mark.slow
def test_ordering_race(engine, log, schema):
    """16 sessions commit in any order; readers still see ids only in ascending order."""
    writers, rounds, topic = 16, 8, "shop:carts"
    committed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def write(cart_id: int) -> None:
        rng = random.Random(cart_id)
        try:
            start.wait(timeout=60)
            for n in range(rounds):
                with Session(engine) as session, session.begin():
                    cart = session.get(Cart, cart_id, with_for_update=True)
                    cart.items += 1
                    session.add(CartItem(cart_id=cart_id, product_id=n))
                    pending = publish(session, [topic, f"shop:cart:user:{cart_id}"], "item_added",
                                      {"cart_id": cart_id, "n": n}, schema=schema)
                    session.flush()
                    # The transaction stays open after its business writes, as a
                    # request handler's would. Its event waits for the commit.
                    time.sleep(rng.uniform(0, 0.020))
                committed.append(pending.event.id)
        except BaseException as error:
            errors.append(error)

    received: list[int] = []
    with log.subscribe(topic, after=0) as sub:
        threads = [threading.Thread(target=write, args=(n,)) for n in range(1, writers + 1)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(received) < writers * rounds and time.monotonic() < deadline and not errors:
            if (ev := sub.next_event(timeout=1)) is not None:
                received.append(ev.id)
        for thread in threads:
            thread.join(timeout=60)

    assert not errors, errors
    assert len(committed) == writers * rounds
    assert delivery_problems(received, committed) == []
    assert [e.id for e in log.replay(topic)] == sorted(committed)


@pytest.fixture
def lock_engine(database_url: str, schema: str, engine: sa.Engine) -> Iterator[sa.Engine]:
    """Connections that report deadlocks fast and never wait on a lock forever."""
    lock_engine = sa.create_engine(_app_url(database_url, schema), poolclass=sa.NullPool)

    @event.listens_for(lock_engine, "connect")
    def settings(dbapi_connection, record):
        with dbapi_connection.cursor() as cur:
            cur.execute("SET lock_timeout = '30s'")
            try:
                cur.execute("SET deadlock_timeout = '100ms'")  # superusers only
            except psycopg.errors.InsufficientPrivilege:
                pass
        dbapi_connection.commit()

    with lock_engine.begin() as conn:
        conn.execute(sa.update(Cart).values(items=0))
    yield lock_engine
    lock_engine.dispose()


def _lock_mid_transaction(session: Session, schema: str) -> None:
    """Publish the way the library must not: with the ordering lock taken right away."""
    session.execute(text(f"SELECT * FROM \"{schema}\".publish_v1(ARRAY['shop:carts'], 'cart_updated')"))


def _publish_at_commit(session: Session, schema: str) -> None:
    publish(session, "shop:carts", "cart_updated", schema=schema)


def _two_publishers(
    engine: sa.Engine, admin: psycopg.Connection, publish_in: Callable[[Session, str], None], schema: str
) -> dict[str, BaseException | None]:
    """A updates cart 1, publishes, then updates cart 2; B updates cart 2, publishes, commits.

    With the ordering lock taken at publish time, A holds the lock and waits for
    B's row while B waits for the lock: a deadlock. With the write deferred to
    COMMIT, B commits, then A goes on.
    """
    outcome: dict[str, BaseException | None] = {}
    b_published = threading.Event()
    a_waiting = threading.Event()
    pids: dict[str, int] = {}

    def step(name: str, session: Session, *actions: Callable[[], object]) -> None:
        try:
            for action in actions:
                action()
            session.commit()
            outcome[name] = None
        except BaseException as error:
            outcome[name] = error
            session.rollback()

    def update(session: Session, cart_id: int) -> Callable[[], object]:
        return lambda: session.execute(sa.update(Cart).where(Cart.id == cart_id).values(items=Cart.items + 1))

    with Session(engine) as a, Session(engine) as b:
        pids["a"], pids["b"] = backend_pid(a.connection()), backend_pid(b.connection())
        update(a, 1)()
        publish_in(a, schema)

        def waiting(pid: int) -> bool:
            return admin.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (pid,)).fetchone()[0] > 0

        b_thread = threading.Thread(
            target=step,
            args=("b", b, update(b, 2), lambda: publish_in(b, schema), b_published.set, lambda: a_waiting.wait(60)),
        )
        b_thread.start()
        wait_until(lambda: b_published.is_set() or waiting(pids["b"]) or "b" in outcome, what="B published or blocked")

        a_thread = threading.Thread(target=step, args=("a", a, update(a, 2)))
        a_thread.start()
        wait_until(lambda: waiting(pids["a"]) or "a" in outcome, what="A waits for cart 2")
        a_waiting.set()
        a_thread.join(60)
        b_thread.join(60)
    return outcome


def _is_deadlock(error: BaseException | None) -> bool:
    orig = getattr(error, "orig", None)
    return isinstance(orig, (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable))


@pytest.mark.slow
def test_lock_taken_mid_transaction_deadlocks(lock_engine, admin, log, schema):
    """The control: the same two transactions deadlock if publishing locks at once."""
    outcome = _two_publishers(lock_engine, admin, _lock_mid_transaction, schema)

    assert sorted(outcome) == ["a", "b"]
    assert [name for name, error in outcome.items() if _is_deadlock(error)] != [], outcome


@pytest.mark.slow
def test_deferred_write_does_not_deadlock(lock_engine, admin, log, schema):
    outcome = _two_publishers(lock_engine, admin, _publish_at_commit, schema)

    assert outcome == {"a": None, "b": None}
    events = log.read()
    assert len(events) == 2
    assert events[0].id < events[1].id
    with lock_engine.connect() as conn:
        assert conn.execute(sa.select(Cart.items).where(Cart.id.in_([1, 2])).order_by(Cart.id)).scalars().all() == [1, 2]
