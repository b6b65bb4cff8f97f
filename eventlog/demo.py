"""``eventlog demo``: a scripted shop whose tabs lose their connections and recover.

The demo plays a shop on a real PostgreSQL server. Without ``--database-url``
it starts a throwaway server in a temporary folder (`LocalPostgres`) and
removes it afterwards. Four subscribers follow the shop, each with its own
`EventLog`, so its own listener connection and its own pool, as separate
browser tabs would:

* ``alice#1`` and ``alice#2``, two tabs of the signed-in shopper alice;
* ``guest#1``, a guest's tab on a product page: it follows its session's cart
  and that product, and after the guest signs in, the user's cart as well;
* ``dashboard``, an admin dashboard that follows products, categories and
  inventory.

The script fills carts, changes quantities, selects shipping and payment,
signs the guest in, edits the catalogue in bulk and changes stock. Midway it
cuts ``alice#2`` off: while the tab is frozen, pg_terminate_backend ends its
listener's connection and its only read connection, so its next read fails and
it has to recover. Then it closes ``guest#1`` and reopens it from the last
event id it saw. At the end every tab must have received each event of its
topics exactly once, and every tab's view must equal the shop's own state.

`play` runs the demo and returns a `DemoReport`; `register` and `run` are the
``eventlog demo`` subcommand. ``--fault resume-from-now`` (hidden, for tests)
reopens the guest tab from the head of the log instead of its last-seen id, which
is how a tab loses events, and makes the demo fail.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
import psycopg.conninfo
from psycopg import sql

from . import migrate
from ._pgserver import LocalPostgres, PostgresServerError
from ._settings import Settings, normalize_url, redact_url
from .errors import ConfigurationError, ConnectionFailed, EventLogError
from .log import EventLog
from .shop import (
    Cart,
    CartCleared,
    CartItem,
    CartUpdated,
    CategoriesBulkDeleted,
    CategoriesBulkParentChanged,
    CategoriesBulkStatusChanged,
    Category,
    CategoryCreated,
    CategoryDeleted,
    CategoryUpdated,
    InventoryUpdated,
    ItemAdded,
    ItemRemoved,
    PaymentSelected,
    Product,
    ProductCreated,
    ProductDeleted,
    ProductsBulkStatusChanged,
    ProductUpdated,
    QuantityUpdated,
    ShippingSelected,
    Shop,
    ShopEvent,
    ShopSubscriber,
    user_cart_topic,
)

if TYPE_CHECKING:
    from .cli import Commands

__all__ = ["FAULTS", "DemoReport", "play", "register", "run"]

logger = logging.getLogger(__name__)

# Test-only ways to break the demo's recovery, to show that its checks can fail.
FAULTS = ("resume-from-now",)

DEFAULT_TIMEOUT = 30.0  # seconds for the tabs to catch up at the end
STEP_TIMEOUT = 15.0  # seconds for one tab to open, freeze or reconnect
TAB_WAKEUP = 0.1  # seconds; how often an idle tab looks at its controls

# Short intervals, so that a tab with a broken listener still catches up by polling.
TAB_OPTIONS: dict[str, Any] = {
    "poll_interval": 2.0,
    "heartbeat_interval": 2.0,
    "heartbeat_timeout": 2.0,
    # One pooled connection per tab: every read of the tab goes through the
    # connection that the demo cuts.
    "pool_min_size": 1,
    "pool_max_size": 1,
}

CENT = Decimal("0.01")
TAX_RATE = Decimal("0.08")
SHIPPING = {"standard": Decimal("4.90"), "express": Decimal("12.50")}


# ===========================================================================
# The shop: the truth that every view is compared with
# ===========================================================================


class ShopFloor:
    """The shop's own state; every change is applied here, then broadcast."""

    def __init__(self, shop: Shop) -> None:
        self.shop = shop
        self.products: dict[str, Product] = {}
        self.categories: dict[str, Category] = {}
        self.carts: dict[str, Cart] = {}
        self.published: dict[int, float] = {}  # event id -> monotonic time of the broadcast call
        self._items = 0

    @contextlib.contextmanager
    def _broadcast(self) -> Iterator[list[ShopEvent]]:
        """Record when the broadcasts in the block started, by event id, for latencies.

        The time is taken before the call because a tab may handle the event
        before the call returns.
        """
        events: list[ShopEvent] = []
        started = time.monotonic()
        yield events
        for event in events:
            self.published[event.id] = started

    # -- carts ---------------------------------------------------------------------

    def open_cart(self, cart_id: str, *, user_id: str | None = None, session_id: str | None = None) -> Cart:
        self.carts[cart_id] = Cart(id=cart_id, user_id=user_id, session_id=session_id)
        return self.carts[cart_id]

    def add_item(self, cart_id: str, product_id: str, quantity: int) -> CartItem:
        product = self.products[product_id]
        self._items += 1
        item = CartItem(
            id=f"line-{self._items}", product_id=product.id, sku=product.sku, name=product.name,
            quantity=quantity, unit_price=product.price, total=product.price * quantity,
        )
        cart = self._recalculate(self.carts[cart_id], items=[*self.carts[cart_id].items, item])
        with self._broadcast() as events:
            events.append(self.shop.broadcast_item_added(cart, item))
        return item

    def remove_item(self, cart_id: str, item_id: int | str) -> None:
        cart = self.carts[cart_id]
        cart = self._recalculate(cart, items=[i for i in cart.items if i.id != item_id])
        with self._broadcast() as events:
            events.append(self.shop.broadcast_item_removed(cart, item_id))

    def set_quantity(self, cart_id: str, item_id: int | str, quantity: int) -> None:
        cart = self.carts[cart_id]
        items = [
            i.model_copy(update={"quantity": quantity, "total": i.unit_price * quantity})
            if i.id == item_id else i
            for i in cart.items
        ]
        cart = self._recalculate(cart, items=items)
        with self._broadcast() as events:
            events.append(self.shop.broadcast_quantity_updated(cart, cart.item(item_id)))  # type: ignore[arg-type]

    def select_shipping(self, cart_id: str, method: str) -> None:
        cart = self._recalculate(self.carts[cart_id], shipping_method=method)
        with self._broadcast() as events:
            events.append(self.shop.broadcast_shipping_selected(cart))

    def select_payment(self, cart_id: str, option: str) -> None:
        cart = self._recalculate(self.carts[cart_id], payment_option=option)
        with self._broadcast() as events:
            events.append(self.shop.broadcast_payment_selected(cart))

    def clear(self, cart_id: str) -> None:
        cart = self._recalculate(self.carts[cart_id], items=[], shipping_method=None, payment_option=None)
        with self._broadcast() as events:
            events.append(self.shop.broadcast_cart_cleared(cart))

    def sign_in(self, cart_id: str, user_id: str) -> None:
        """Sign the guest in: the cart keeps its session and gets a user."""
        cart = self._recalculate(self.carts[cart_id], user_id=user_id)
        with self._broadcast() as events:
            events.append(self.shop.broadcast_cart_updated(cart))

    def _recalculate(self, cart: Cart, **changes: Any) -> Cart:
        cart = cart.model_copy(update=changes)
        subtotal = sum((i.total for i in cart.items), Decimal("0.00"))
        shipping = SHIPPING.get(cart.shipping_method or "", Decimal("0.00")) if cart.items else Decimal("0.00")
        tax = (subtotal * TAX_RATE).quantize(CENT, ROUND_HALF_EVEN)
        cart = Cart.model_validate(
            {**cart.model_dump(), "subtotal": subtotal, "shipping_total": shipping,
             "tax_total": tax, "total": subtotal + shipping + tax}
        )
        self.carts[str(cart.id)] = cart
        return cart

    # -- catalogue -----------------------------------------------------------------

    def create_category(self, category: Category) -> None:
        self.categories[str(category.id)] = category
        with self._broadcast() as events:
            events.append(self.shop.broadcast_category_created(category))

    def update_category(self, category_id: str, **changes: Any) -> None:
        category = self.categories[category_id].model_copy(update=changes)
        self.categories[category_id] = category
        with self._broadcast() as events:
            events.append(self.shop.broadcast_category_updated(category))

    def delete_category(self, category_id: str) -> None:
        del self.categories[category_id]
        with self._broadcast() as events:
            events.append(self.shop.broadcast_category_deleted(category_id))

    def move_categories(self, category_ids: list[str], parent_id: str | None) -> None:
        for i in category_ids:
            self.categories[i] = self.categories[i].model_copy(update={"parent_id": parent_id})
        with self._broadcast() as events:
            events.append(self.shop.broadcast_categories_bulk_parent_changed(category_ids, parent_id))

    def set_categories_status(self, category_ids: list[str], status: str) -> None:
        for i in category_ids:
            self.categories[i] = self.categories[i].model_copy(update={"status": status})
        with self._broadcast() as events:
            events.append(self.shop.broadcast_categories_bulk_status_changed(category_ids, status))

    def delete_categories(self, category_ids: list[str]) -> None:
        for i in category_ids:
            del self.categories[i]
        with self._broadcast() as events:
            events.append(self.shop.broadcast_categories_bulk_deleted(category_ids))

    def create_product(self, product: Product) -> None:
        self.products[str(product.id)] = product
        with self._broadcast() as events:
            events.append(self.shop.broadcast_product_created(product))

    def update_product(self, product_id: str, **changes: Any) -> None:
        product = self.products[product_id].model_copy(update=changes)
        self.products[product_id] = product
        with self._broadcast() as events:
            events.append(self.shop.broadcast_product_updated(product))

    def delete_product(self, product_id: str) -> None:
        del self.products[product_id]
        with self._broadcast() as events:
            events.append(self.shop.broadcast_product_deleted(product_id))

    def set_products_status(self, product_ids: list[str], status: str) -> None:
        for i in product_ids:
            self.products[i] = self.products[i].model_copy(update={"status": status})
        with self._broadcast() as events:
            events.extend(self.shop.broadcast_products_bulk_status_changed(product_ids, status))

    def change_stock(self, product_id: str, change: int) -> None:
        product = self.products[product_id]
        self.products[product_id] = product.model_copy(update={"stock": product.stock + change})
        with self._broadcast() as events:
            events.append(self.shop.broadcast_inventory_updated(product_id, change))


# ===========================================================================
# Views: what a tab shows, built only from the events it receives
# ===========================================================================


class View(Protocol):
    def apply(self, event: ShopEvent) -> None: ...


class CartView:
    """The cart as a tab shows it."""

    def __init__(self, cart: Cart) -> None:
        self.cart = cart

    def apply(self, event: ShopEvent) -> None:
        match event:
            case (
                CartUpdated(cart) | ItemAdded(cart, _) | ItemRemoved(cart, _)
                | QuantityUpdated(cart, _) | ShippingSelected(cart) | PaymentSelected(cart)
                | CartCleared(cart)
            ):
                self.cart = cart


class ProductView:
    """One product's page: price, status and stock."""

    def __init__(self, product: Product) -> None:
        self.product_id = product.id
        self.product: Product | None = product

    def apply(self, event: ShopEvent) -> None:
        match event:
            case ProductCreated(product) | ProductUpdated(product) if product.id == self.product_id:
                self.product = product
            case ProductDeleted(product_id) if product_id == self.product_id:
                self.product = None
            case InventoryUpdated(product_id, change) if product_id == self.product_id and self.product:
                self.product = self.product.model_copy(update={"stock": self.product.stock + change})
            case ProductsBulkStatusChanged(ids, status) if self.product_id in ids and self.product:
                self.product = self.product.model_copy(update={"status": status})


class CatalogueView:
    """The whole catalogue: products and categories.

    The dashboard tab shows it, and ``demo --serve`` keeps the catalogue part of
    its server state in one (`eventlog.demo_web.ShopState`), so both apply
    catalogue events the same way. Cart events leave it unchanged.
    """

    def __init__(self) -> None:
        self.products: dict[str, Product] = {}
        self.categories: dict[str, Category] = {}

    def apply(self, event: ShopEvent) -> None:
        products, categories = self.products, self.categories
        match event:
            case ProductCreated(product) | ProductUpdated(product):
                products[str(product.id)] = product
            case ProductDeleted(product_id):
                products.pop(str(product_id), None)
            case ProductsBulkStatusChanged(ids, status):
                for i in map(str, ids):
                    if i in products:
                        products[i] = products[i].model_copy(update={"status": status})
            case InventoryUpdated(product_id, change) if str(product_id) in products:
                product = products[str(product_id)]
                products[str(product_id)] = product.model_copy(update={"stock": product.stock + change})
            case CategoryCreated(category) | CategoryUpdated(category):
                categories[str(category.id)] = category
            case CategoryDeleted(category_id):
                categories.pop(str(category_id), None)
            case CategoriesBulkDeleted(ids):
                for i in map(str, ids):
                    categories.pop(i, None)
            case CategoriesBulkParentChanged(ids, parent_id):
                for i in map(str, ids):
                    if i in categories:
                        categories[i] = categories[i].model_copy(update={"parent_id": parent_id})
            case CategoriesBulkStatusChanged(ids, status):
                for i in map(str, ids):
                    if i in categories:
                        categories[i] = categories[i].model_copy(update={"status": status})


# ===========================================================================
# Tabs: one thread, one EventLog and one ShopSubscriber each
# ===========================================================================


@dataclass
class Delivery:
    id: int
    received: float  # monotonic time
    replayed: bool


class Tab:
    """A browser tab: follows topics in its own thread, with its own connections.

    `follow(subscriber)` subscribes the tab's topics each time the tab opens;
    `react(tab, subscriber, event)` may subscribe more while it runs. The demo
    controls the tab from the main thread: `open`, `freeze`, `thaw`, `close`.
    """

    def __init__(
        self,
        name: str,
        demo: _Demo,
        view: View,
        follow: Callable[[ShopSubscriber], None],
        react: Callable[[Tab, ShopSubscriber, ShopEvent], None] | None = None,
    ) -> None:
        self.name = name
        self.view = view
        self._demo = demo
        self._follow = follow
        self._react = react
        self.deliveries: list[Delivery] = []
        self.starts: dict[str, int] = {}  # topic -> id after which the tab must see its events
        self.position = 0  # the subscriber's cursor, for "caught up" and for reopening
        self.replay_until = 0  # deliveries up to this id come after a reconnect
        self.error: BaseException | None = None
        self.log: EventLog | None = None
        self.pool_pid: int | None = None  # backend of the tab's one pooled connection
        self.note = ""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._freeze = threading.Event()
        self._frozen = threading.Event()
        self._thaw = threading.Event()

    # -- control, from the main thread ---------------------------------------------

    def open(self, after: int | None = None) -> None:
        """Open the tab; it resumes after event id `after` (None: from now)."""
        for flag in (self._ready, self._stop, self._freeze, self._frozen, self._thaw):
            flag.clear()
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(after,), name=f"tab {self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(STEP_TIMEOUT):
            raise DemoError(f"tab {self.name} did not open within {STEP_TIMEOUT:g} s")
        if self.error is not None:
            raise DemoError(f"tab {self.name} failed to open: {self.error}") from self.error

    def close(self) -> None:
        self._stop.set()
        self._thaw.set()
        if self._thread is not None:
            self._thread.join(STEP_TIMEOUT)
            if self._thread.is_alive():
                raise DemoError(f"tab {self.name} did not close within {STEP_TIMEOUT:g} s")
            self._thread = None

    def freeze(self) -> None:
        """Stop reading (a laptop lid closing) and wait until the tab is idle."""
        self._thaw.clear()
        self._freeze.set()
        if not self._frozen.wait(STEP_TIMEOUT):
            raise DemoError(f"tab {self.name} did not freeze within {STEP_TIMEOUT:g} s")

    def thaw(self, replay_until: int) -> None:
        """Read again; deliveries up to `replay_until` count as replayed."""
        self.replay_until = replay_until
        self._freeze.clear()
        self._frozen.clear()
        self._thaw.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the tab's own thread --------------------------------------------------------

    def _run(self, after: int | None) -> None:
        try:
            with EventLog(settings=self._demo.tab_settings(self.name)) as log:
                self.log = log
                with log.connection() as conn:
                    self.pool_pid = conn.info.backend_pid
                with Shop(log).subscriber(after=after) as subscriber:
                    self._follow(subscriber)
                    self.note_starts(subscriber)
                    self._loop(subscriber)
                with log.connection() as conn:
                    self.pool_pid = conn.info.backend_pid
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            logger.debug("tab %s failed", self.name, exc_info=True)
        finally:
            self._ready.set()
            self._demo.changed()

    def _loop(self, subscriber: ShopSubscriber) -> None:
        # The first read opens the subscription (LISTEN included) and catches up.
        event = subscriber.next_event(timeout=0)
        self._ready.set()
        while True:
            if event is not None:
                self._deliver(subscriber, event)
                event = None
            if self._stop.is_set():
                return
            if self._freeze.is_set():
                self._frozen.set()
                self._thaw.wait()
                continue
            event = subscriber.next_event(timeout=TAB_WAKEUP)

    def _deliver(self, subscriber: ShopSubscriber, event: ShopEvent) -> None:
        received = time.monotonic()
        self.deliveries.append(Delivery(event.id, received, event.id <= self.replay_until))
        self.view.apply(event)
        if self._react is not None:
            self._react(self, subscriber, event)
        self.position = subscriber.cursor or self.position
        self._demo.changed()

    def say(self, text: str) -> None:
        self._demo.say(f"{self.name}: {text}")

    def note_starts(self, subscriber: ShopSubscriber) -> None:
        # Only the first start of a topic counts: a tab that reopens must still
        # receive everything since the tab first followed it.
        for topic, start in subscriber.topics.items():
            self.starts.setdefault(topic, start)
        self.position = subscriber.cursor or self.position


def _follow_signed_in_user(tab: Tab, subscriber: ShopSubscriber, event: ShopEvent) -> None:
    """After the guest signs in, the tab follows the user's cart as well."""
    cart = getattr(event, "cart", None)
    if cart is None or cart.user_id is None:
        return
    if user_cart_topic(cart.user_id) in subscriber.topics:
        return
    subscriber.subscribe_to_user_cart(cart.user_id)
    tab.note_starts(subscriber)
    tab.say(f"signed in as {cart.user_id}; now also follows {user_cart_topic(cart.user_id)}")


# ===========================================================================
# The report
# ===========================================================================


@dataclass
class TabResult:
    name: str
    expected: int
    delivered: int
    live: int
    replayed: int
    lost: int
    duplicated: int
    unexpected: int
    out_of_order: int
    view_matches: bool
    note: str = ""


@dataclass
class DemoReport:
    """The demo's measurements; `passed` is the verdict."""

    published: int = 0
    tabs: list[TabResult] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, live deliveries only
    problems: list[str] = field(default_factory=list)

    @property
    def delivered_live(self) -> int:
        return sum(t.live for t in self.tabs)

    @property
    def replayed(self) -> int:
        return sum(t.replayed for t in self.tabs)

    @property
    def lost(self) -> int:
        return sum(t.lost for t in self.tabs)

    @property
    def duplicated(self) -> int:
        return sum(t.duplicated for t in self.tabs)

    @property
    def passed(self) -> bool:
        return bool(self.tabs) and not self.problems

    def percentile(self, fraction: float) -> float | None:
        """Return the latency below which `fraction` of live deliveries fall (nearest rank)."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(1, math.ceil(len(ordered) * fraction)) - 1]

    def lines(self) -> list[str]:
        rows = [("tab", "expected", "live", "replayed", "lost", "duplicated", "view")]
        for t in self.tabs:
            view = "matches" if t.view_matches else "DIFFERS"
            rows.append((t.name, str(t.expected), str(t.live), str(t.replayed), str(t.lost), str(t.duplicated), view))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = [
            "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows
        ]
        notes = [f"  {t.name}: {t.note}" for t in self.tabs if t.note]
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        latency = "n/a" if p50 is None or p99 is None else f"{p50 * 1000:.1f} ms / {p99 * 1000:.1f} ms"
        summary = [
            f"events published          {self.published}",
            f"delivered live            {self.delivered_live}",
            f"replayed after reconnect  {self.replayed}",
            f"lost                      {self.lost}",
            f"duplicated                {self.duplicated}",
            f"latency p50 / p99         {latency}",
        ]
        verdict = (
            "PASS: every tab received each event of its topics once, and every view matches the shop"
            if self.passed
            else "FAIL: " + "; ".join(self.problems or ["no tab ran"])
        )
        return [*table, *notes, "", *summary, "", verdict]


class DemoError(EventLogError):
    """The demo could not run (as opposed to running and finding a problem)."""


# ===========================================================================
# The script
# ===========================================================================


class _Demo:
    def __init__(self, url: str, schema: str, connect_timeout: float | None, write: Callable[[str], None],
                 faults: frozenset[str]) -> None:
        self.url = url
        self.schema = schema
        self.connect_timeout = connect_timeout
        self.faults = faults
        self._write = write
        self._write_lock = threading.Lock()
        self._started = time.monotonic()
        self._changed = threading.Condition()

    def say(self, text: str) -> None:
        with self._write_lock:
            self._write(f"[{time.monotonic() - self._started:5.2f} s] {text}")

    def changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def tab_settings(self, name: str) -> Settings:
        # The listener is shared per process, database and schema. A connection
        # parameter without effect (eventlog always sets the application name)
        # gives each tab a listener of its own, as separate browsers would have.
        conninfo = psycopg.conninfo.make_conninfo(self.url, fallback_application_name=f"eventlog-demo {name}")
        options = {**TAB_OPTIONS, "database_url": conninfo, "schema_name": self.schema}
        if self.connect_timeout is not None:
            options["connect_timeout"] = self.connect_timeout
        return Settings.model_validate(options)


def play(
    database_url: str | None = None,
    *,
    schema: str | None = None,
    keep: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float | None = None,
    write: Callable[[str], None] = print,
    faults: frozenset[str] | set[str] = frozenset(),
) -> DemoReport:
    """Run the demo and return its report.

    Without `database_url` it starts a throwaway PostgreSQL server (removed
    afterwards unless `keep`). With one, it creates the log in a new schema
    (`schema`, default ``eventlog_demo_<random>``), which must not exist yet, and
    drops it afterwards unless `keep`.
    """
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown demo fault {sorted(unknown)!r}: expected one of {FAULTS!r}")
    schema = schema or f"eventlog_demo_{uuid.uuid4().hex[:8]}"
    with _server(database_url, keep, schema, write) as url:
        _create_schema(url, schema, connect_timeout)
        write(f"log in schema {schema!r} of {redact_url(url)}")
        demo = _Demo(url, schema, connect_timeout, write, frozenset(faults))
        try:
            return _play(demo, timeout)
        finally:
            if database_url is None:
                pass  # the whole server goes, or stays with --keep
            elif keep:
                write(f"kept schema {schema!r}; list its events with: "
                      f"eventlog events --database-url URL --schema {schema}")
            else:
                _drop_schema(url, schema)


@contextlib.contextmanager
def _server(database_url: str | None, keep: bool, schema: str, write: Callable[[str], None]) -> Iterator[str]:
    """Yield the URL to play on: `database_url`, or that of a throwaway server."""
    if database_url is not None:
        yield normalize_url(database_url)
        return
    try:
        server = LocalPostgres("auto", settings={"fsync": "off"}, keep=keep)
        write(f"starting PostgreSQL {server.version} ({server.binaries.source}) in a temporary folder ...")
        server.start()
    except PostgresServerError as exc:
        raise DemoError(f"could not start a PostgreSQL server for the demo: {exc}; "
                        "or pass --database-url of a server to use") from exc
    write(f"PostgreSQL ready at {server.url}, data in {server.data_dir}")
    try:
        yield server.url
    finally:
        folder, url = server.root_dir, server.url
        pg_ctl = server.bindir / "pg_ctl"
        server.stop()
        if keep:
            as_user = f" as user {server.run_as}" if server.run_as else ""
            write(f"kept the stopped server's folder {folder}; start it{as_user} with: "
                  f"{pg_ctl} start -D {folder}/data -l {folder}/server.log")
            write(f"then list the demo's events with: eventlog events --database-url {url} --schema {schema}")


def _create_schema(url: str, schema: str, connect_timeout: float | None) -> None:
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(2, math.ceil(connect_timeout or 10)))
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionFailed(f"could not connect to {redact_url(url)}: {reason}") from exc
    with conn:
        row = conn.execute("SELECT to_regnamespace(%s)", [schema]).fetchone()
    if row is not None and row[0] is not None:
        raise ConfigurationError(
            f"schema {schema!r} already exists; the demo writes only to a schema of its own: "
            "pass another --schema, or none for a fresh one"
        )
    migrate.upgrade(url, schema=schema)


def _drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _play(demo: _Demo, timeout: float) -> DemoReport:
    publisher = EventLog(demo.url, schema=demo.schema, connect_timeout=demo.connect_timeout)
    report = DemoReport()
    with publisher, psycopg.connect(demo.url, autocommit=True) as admin:
        script = _Script(demo, ShopFloor(Shop(publisher)), admin, report)
        try:
            script.play()
            _wait_for_tabs(demo, publisher, script.tabs, timeout)
        finally:
            for tab in script.tabs:
                if tab.alive:
                    tab.close()
        script.check_cut_connection()
        report.published = len(script.floor.published)
        _judge(publisher, script.floor, script.tabs, report)
    return report


class _Script:
    """The scripted shop, one method per scene, in the order `play` runs them."""

    def __init__(self, demo: _Demo, floor: ShopFloor, admin: psycopg.Connection, report: DemoReport) -> None:
        self.demo = demo
        self.floor = floor
        self.admin = admin
        self.report = report
        self.say = demo.say
        self.publisher = floor.shop.log
        self.tabs: list[Tab] = []
        self.items: dict[str, int | str] = {}  # name in the script -> cart item id
        self.cut_tab: Tab | None = None
        self.cut_pool_pid: int | None = None  # the backend the cut tab read through

    def play(self) -> None:
        self.open_dashboard()
        self.open_tabs()
        self.shop()
        self.cut_off(self._tab("alice#2"))
        self.close_and_reopen(self._tab("guest#1"))
        self.sign_in_guest()
        self.edit_catalogue()
        self.rush()
        self.check_out()

    def open_dashboard(self) -> None:
        floor = self.floor
        self._open(Tab("dashboard", self.demo, CatalogueView(), _follow_catalogue))
        self.say("dashboard open: follows shop:products, shop:categories and shop:inventory")

        for category in CATEGORIES:
            floor.create_category(category)
        for product in PRODUCTS:
            floor.create_product(product)
        self.say(f"admin created {len(CATEGORIES)} categories and {len(PRODUCTS)} products")

    def open_tabs(self) -> None:
        floor, demo = self.floor, self.demo
        alice = floor.open_cart("cart-alice", user_id="alice")
        guest = floor.open_cart("cart-guest", session_id="sess-7f3a")
        self._open(Tab("alice#1", demo, CartView(alice), lambda s: s.subscribe_to_user_cart("alice")))
        self._open(Tab("alice#2", demo, CartView(alice), lambda s: s.subscribe_to_cart(alice)))
        view = _GuestView(guest, floor.products["teapot"])
        self._open(Tab("guest#1", demo, view, _follow_guest, _follow_signed_in_user))
        self.say("tabs open: alice#1 and alice#2 follow alice's cart; guest#1 follows its session's cart and the teapot")

    def shop(self) -> None:
        floor, items = self.floor, self.items
        items["alice mug"] = floor.add_item("cart-alice", "mug", 2).id
        tea = floor.add_item("cart-alice", "tea", 1).id
        floor.add_item("cart-alice", "teapot", 1)
        floor.set_quantity("cart-alice", items["alice mug"], 3)
        floor.remove_item("cart-alice", tea)
        floor.select_shipping("cart-alice", "standard")
        floor.select_payment("cart-alice", "card")
        self.say("alice added a mug, tea and a teapot, changed the mugs to 3, removed the tea, chose shipping and payment")

        floor.add_item("cart-guest", "teapot", 1)
        items["guest mug"] = floor.add_item("cart-guest", "mug", 1).id
        floor.update_product("teapot", price=Decimal("34.90"))
        floor.change_stock("teapot", -2)
        self.say("the guest added a teapot and a mug; admin repriced the teapot to 34.90 and sold 2 from stock")

    def cut_off(self, tab: Tab) -> None:
        """Terminate the tab's listener and read connection while it is frozen, then thaw it."""
        floor = self.floor
        tab.freeze()
        assert tab.log is not None and tab.log.listener is not None
        listener = tab.log.listener
        old_listener_pid, connects = listener.backend_pid, listener.connections
        self.cut_pool_pid = tab.pool_pid
        for pid in (old_listener_pid, tab.pool_pid):
            self.admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        self.say(f"cut {tab.name} off: terminated its listener (backend {old_listener_pid}) "
                 f"and its read connection (backend {tab.pool_pid})")

        cake = floor.add_item("cart-alice", "cake-stand", 1)
        floor.set_quantity("cart-alice", cake.id, 2)
        floor.select_shipping("cart-alice", "express")
        self.say(f"while {tab.name} is cut off, alice added 2 cake stands and switched to express shipping")

        if not _wait_for(lambda: listener.connected and listener.connections > connects, STEP_TIMEOUT):
            self.report.problems.append(f"the listener of {tab.name} did not reconnect within {STEP_TIMEOUT:g} s")
        tab.thaw(replay_until=self.publisher.head())
        tab.note = f"cut off while frozen: listener backend {old_listener_pid} -> {listener.backend_pid}"
        self.say(f"{tab.name} is back: its listener reconnected (backend {listener.backend_pid}); "
                 "its read connection is dead, so its next read fails and is retried")
        self.cut_tab = tab

    def check_cut_connection(self) -> None:
        """Check that the cut tab read through a new connection (recorded when it closed)."""
        tab = self.cut_tab
        if tab is None:
            return
        if tab.pool_pid == self.cut_pool_pid:
            self.report.problems.append(
                f"{tab.name} still reads through its cut connection (backend {self.cut_pool_pid})"
            )
        tab.note += f"; read connection backend {self.cut_pool_pid} -> {tab.pool_pid}"

    def close_and_reopen(self, tab: Tab) -> None:
        """Close the tab, publish what it misses, and reopen it from its last-seen id."""
        floor = self.floor
        tab.close()
        last_seen = tab.position
        self.say(f"{tab.name} closed; the last event it saw is {last_seen}")

        floor.set_quantity("cart-guest", self.items["guest mug"], 4)
        floor.add_item("cart-guest", "tea", 2)
        floor.change_stock("teapot", 10)
        floor.set_products_status(["teapot", "tea"], "featured")
        self.say(f"while {tab.name} is closed, the guest took 4 mugs and added tea; "
                 "the teapot got 10 in stock and was featured")

        tab.replay_until = self.publisher.head()
        if "resume-from-now" in self.demo.faults:
            tab.note = f"closed after event {last_seen}, reopened from the head (fault)"
            tab.open(after=None)
            self.say(f"{tab.name} reopened from NOW (fault resume-from-now): what it missed is gone")
        else:
            tab.note = f"closed after event {last_seen}, reopened from it"
            tab.open(after=last_seen)
            self.say(f"{tab.name} reopened from event {last_seen}")

    def sign_in_guest(self) -> None:
        floor = self.floor
        floor.sign_in("cart-guest", "bob")
        self.say("the guest signed in as bob: the cart keeps its session and its events now reach both topics")
        floor.select_shipping("cart-guest", "standard")
        floor.select_payment("cart-guest", "paypal")

    def edit_catalogue(self) -> None:
        floor = self.floor
        floor.update_category("kitchen", name="Kitchen & Dining")
        floor.move_categories(["mugs", "teapots"], "tableware")
        floor.set_categories_status(["seasonal", "tableware"], "hidden")
        floor.create_category(Category(id="clearance", name="Clearance", slug="clearance"))
        floor.delete_categories(["seasonal", "clearance"])
        floor.delete_category("gifts")
        floor.create_product(
            Product(id="spoon", sku="SP-01", name="Tea spoon", price=Decimal("2.40"), stock=200, category_id="kitchen")
        )
        floor.delete_product("candle")
        floor.set_products_status(["spoon", "mug"], "sale")
        self.say("admin renamed, moved, hid and deleted categories; "
                 "added spoons, removed candles, put spoons and mugs on sale")

    def rush(self) -> None:
        floor = self.floor
        for round_ in range(6):
            floor.change_stock("mug", -1)
            floor.change_stock("teapot", -1)
            floor.set_quantity("cart-alice", self.items["alice mug"], 3 + round_)
            floor.set_quantity("cart-guest", self.items["guest mug"], 5 + round_)
        floor.update_product("mug", price=Decimal("9.95"))
        self.say("a rush: 12 stock changes and 12 quantity changes; the mug repriced to 9.95")

    def check_out(self) -> None:
        floor = self.floor
        floor.clear("cart-alice")
        floor.add_item("cart-alice", "spoon", 6)
        floor.select_payment("cart-alice", "invoice")
        self.say("alice cleared her cart, took 6 spoons and chose invoice")

    def _open(self, tab: Tab) -> None:
        tab.open()
        self.tabs.append(tab)

    def _tab(self, name: str) -> Tab:
        return next(tab for tab in self.tabs if tab.name == name)


class _GuestView:
    """A view of the guest's tab: its cart and the product page it is on."""

    def __init__(self, cart: Cart, product: Product) -> None:
        self.cart = CartView(cart)
        self.page = ProductView(product)

    def apply(self, event: ShopEvent) -> None:
        self.cart.apply(event)
        self.page.apply(event)


def _follow_catalogue(subscriber: ShopSubscriber) -> None:
    subscriber.subscribe_products()
    subscriber.subscribe_categories()
    subscriber.subscribe_inventory()


def _follow_guest(subscriber: ShopSubscriber) -> None:
    subscriber.subscribe_to_session_cart("sess-7f3a")
    subscriber.subscribe_product("teapot")


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    # Only for state that no one signals (the listener's reconnect); the tabs
    # themselves notify the demo's condition.
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _expected(tab: Tab, stored: list[tuple[int, tuple[str, ...]]]) -> set[int]:
    return {
        event_id for event_id, topics in stored
        if any(t in tab.starts and event_id > tab.starts[t] for t in topics)
    }


def _wait_for_tabs(demo: _Demo, publisher: EventLog, tabs: list[Tab], timeout: float) -> None:
    stored = [(e.id, e.topics) for e in publisher.replay()]
    last = {tab.name: max(_expected(tab, stored), default=0) for tab in tabs}
    demo.say(f"script done: {len(stored)} events in the log; waiting for the tabs to catch up")

    def caught_up() -> bool:
        return all(tab.position >= last[tab.name] or not tab.alive for tab in tabs)

    if not demo.wait_until(caught_up, timeout):
        behind = [t.name for t in tabs if t.alive and t.position < last[t.name]]
        demo.say(f"gave up waiting after {timeout:g} s for: {', '.join(behind)}")


def _judge(publisher: EventLog, floor: ShopFloor, tabs: list[Tab], report: DemoReport) -> None:
    stored = [(e.id, e.topics) for e in publisher.replay()]
    for tab in tabs:
        if tab.error is not None:
            report.problems.append(f"tab {tab.name} failed: {tab.error}")
        expected = _expected(tab, stored)
        ids = [d.id for d in tab.deliveries]
        received = set(ids)
        out_of_order = sum(1 for a, b in zip(ids, ids[1:]) if b < a)
        live = [d for d in tab.deliveries if not d.replayed]
        report.latencies.extend(d.received - floor.published[d.id] for d in live if d.id in floor.published)
        report.tabs.append(TabResult(
            name=tab.name,
            expected=len(expected),
            delivered=len(ids),
            live=len(live),
            replayed=len(ids) - len(live),
            lost=len(expected - received),
            duplicated=len(ids) - len(received),
            unexpected=len(received - expected),
            out_of_order=out_of_order,
            view_matches=_view_matches(tab.view, floor),
            note=tab.note,
        ))
    for result in report.tabs:
        report.problems.extend(_failures(result))


def _failures(result: TabResult) -> list[str]:
    counts = [
        (result.lost, "lost"),
        (result.duplicated, "received twice"),
        (result.unexpected, "received without following their topics"),
        (result.out_of_order, "received out of id order"),
    ]
    failures = [f"{result.name}: {n} events {what}" for n, what in counts if n]
    if not result.view_matches:
        failures.append(f"{result.name}: its view differs from the shop")
    return failures


def _dump(model: Any) -> Any:
    return None if model is None else model.model_dump(mode="json")


def _view_matches(view: Any, floor: ShopFloor) -> bool:
    if isinstance(view, CatalogueView):
        return (
            {k: _dump(v) for k, v in view.products.items()} == {k: _dump(v) for k, v in floor.products.items()}
            and {k: _dump(v) for k, v in view.categories.items()}
            == {k: _dump(v) for k, v in floor.categories.items()}
        )
    if isinstance(view, _GuestView):
        product = floor.products.get(str(view.page.product_id))
        return _dump(view.cart.cart) == _dump(floor.carts["cart-guest"]) and _dump(view.page.product) == _dump(product)
    if isinstance(view, CartView):
        return _dump(view.cart) == _dump(floor.carts[str(view.cart.id)])
    return False


CATEGORIES = [
    Category(id="kitchen", name="Kitchen", slug="kitchen"),
    Category(id="tableware", name="Tableware", slug="tableware", parent_id="kitchen"),
    Category(id="mugs", name="Mugs", slug="mugs", parent_id="kitchen"),
    Category(id="teapots", name="Teapots", slug="teapots", parent_id="kitchen"),
    Category(id="seasonal", name="Seasonal", slug="seasonal"),
    Category(id="gifts", name="Gifts", slug="gifts"),
]

PRODUCTS = [
    Product(id="mug", sku="MG-01", name="Stoneware mug", price=Decimal("12.90"), stock=40, category_id="mugs"),
    Product(id="tea", sku="TE-07", name="Sencha, 100 g", price=Decimal("7.45"), stock=120, category_id="kitchen"),
    Product(id="teapot", sku="TP-02", name="Cast iron teapot", price=Decimal("39.00"), stock=8,
            category_id="teapots"),
    Product(id="cake-stand", sku="CS-11", name="Cake stand", price=Decimal("24.99"), stock=5,
            category_id="tableware"),
    Product(id="candle", sku="CD-03", name="Beeswax candle", price=Decimal("0.10"), stock=500,
            category_id="gifts"),
]


# ===========================================================================
# The subcommand
# ===========================================================================

DEMO_EPILOG = """\
examples:
  eventlog demo                                     on a throwaway server
  eventlog demo --keep                              keep that server's folder
  eventlog demo --database-url postgresql://localhost/scratch
  eventlog demo --serve                             the shop in a browser, on port 8000

The demo ignores EVENTLOG_DATABASE_URL: it uses a server only when given
--database-url, and then writes only to a new schema that it drops afterwards
(unless --keep). Exit status 0 means nothing was lost or duplicated and every
view matched the shop; 1 means a check failed or the demo could not run.
"""


def register(commands: Commands) -> None:
    """Add the ``demo`` subcommand to the ``eventlog`` command line."""
    parser = commands.add(
        "demo",
        run=run,
        help="play a scripted shop whose tabs lose their connections, and check that nothing is lost",
        description=(
            "Play a scripted shop on PostgreSQL: tabs of a signed-in shopper and of a guest\n"
            "follow their carts, an admin dashboard follows the catalogue. One tab's\n"
            "connections are cut and another tab is closed and reopened; at the end every\n"
            "tab must have every event of its topics once, and every view must match the shop."
        ),
        epilog=DEMO_EPILOG,
        database_url_help=(
            "PostgreSQL URL of a server to run the demo on, in a schema of its own "
            "(default: a throwaway local server; $EVENTLOG_DATABASE_URL is not read)"
        ),
        schema_help=(
            "schema for the demo's log, which must not exist yet "
            "(default: eventlog_demo_<random>; $EVENTLOG_SCHEMA is not read)"
        ),
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the throwaway server's folder, or with --database-url the demo's schema",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, default=DEFAULT_TIMEOUT,
        help=f"how long the tabs may take to catch up at the end (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--fault", choices=FAULTS, action="append", default=[], help=argparse.SUPPRESS)
    serving = parser.add_argument_group("the demo shop in a browser (needs eventlog[web])")
    serving.add_argument("--serve", action="store_true", help="serve the demo shop until Ctrl-C instead")
    serving.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    serving.add_argument("--port", type=int, default=8000, help="port to serve on (default: 8000)")


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: expected a number of seconds above 0")
    return seconds


def run(args: argparse.Namespace) -> int:
    """Run ``eventlog demo``; exit status 0 only if every check passed."""
    from .cli import write_line

    if args.serve:
        try:
            from .demo_web import run_serve
        except ImportError as exc:
            raise ConfigurationError(
                f"eventlog demo --serve needs the web extra ({exc.name or exc} is missing): "
                "pip install 'eventlog[web]'"
            ) from None

        return run_serve(args)

    report = play(
        args.database_url,
        schema=args.schema,
        keep=args.keep,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        write=write_line,
        faults=frozenset(args.fault),
    )
    write_line("")
    for line in report.lines():
        write_line(line)
    return 0 if report.passed else 1
