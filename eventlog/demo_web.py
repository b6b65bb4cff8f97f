"""``eventlog demo --serve``: the demo shop in a browser, kept in sync by the log.

Two pages, plain HTML and one small script (``demo_static/``, no build step and
nothing fetched from elsewhere):

* ``/`` the shop: products with stock, add to cart, a cart panel, sign in;
* ``/admin`` the back office: products, prices, stock and categories.

Every change is a shop event published to the log (`AsyncShop`); no page
applies its own change. Each page follows its topics through one `EventSource`
on ``/events`` (`eventlog.web.EventStream`) and applies the events it receives.
So two tabs of one shopper show the same cart within the delivery latency, and a
tab that lost its connection catches up from its last event id.

State
-----
The server keeps no state but the log. `ShopState` folds the events into the
catalogue and the carts, reading from its cursor before every request, so a
restarted server (or a second one) rebuilds the same shop, and events published
by other processes count too. ``GET /api/state`` returns the shop as of one
event id, which the page passes as ``last_event_id`` when it opens its stream:
the snapshot and the stream meet exactly.

A page keeps its view and the id it was built at in ``localStorage``. A reload
shows that view at once and resumes the stream from its id, fetching a new
snapshot only when the stored view belongs to another log or another shopper.

Shoppers
--------
A cookie holds the guest's session id; signing in (a name, no password: this is
a demo) adds a user cookie. A guest's cart is on ``shop:cart:session:{id}``;
when the guest signs in, the cart gets the user id and its events reach
``shop:cart:user:{id}`` as well: the cart follows the shopper. The stream
allows a request the catalogue topics and the carts of its own cookies, and
responds with 403 for anyone else's cart. The admin page is open to anyone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import secrets
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the demo shop needs Starlette and uvicorn; install them with: pip install 'eventlog[web]'"
    ) from exc

from . import migrate
from .demo import CATEGORIES, PRODUCTS, CatalogueView, _server
from .errors import ConnectionFailed, EventLogError
from ._settings import redact_url
from .log import AsyncEventLog
from .shop import (
    EVENT_CLASSES,
    AsyncShop,
    Cart,
    CartItem,
    Category,
    Product,
    ShopEvent,
    categories_topic,
    decode_event,
    inventory_topic,
    products_topic,
    session_cart_topic,
    user_cart_topic,
)
from .web import EventStream

__all__ = ["ShopState", "create_app", "run_serve", "serve"]

logger = logging.getLogger(__name__)

SESSION_COOKIE = "eventlog_demo_session"
USER_COOKIE = "eventlog_demo_user"
CATALOGUE_TOPICS = (products_topic(), categories_topic(), inventory_topic())
STATIC = resources.files("eventlog") / "demo_static"
RETRY_SECONDS = 1.0  # the reconnection delay suggested to browsers

_USER_ID = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class DemoInputError(ValueError):
    """A request that the shop cannot carry out; the API responds with 400 and the message."""


@dataclass(frozen=True)
class Shopper:
    session_id: str
    user_id: str | None = None

    @property
    def cart_topics(self) -> tuple[str, ...]:
        topics = (session_cart_topic(self.session_id),)
        return topics + ((user_cart_topic(self.user_id),) if self.user_id else ())

    @property
    def topics(self) -> tuple[str, ...]:
        return CATALOGUE_TOPICS + self.cart_topics

    def as_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "user_id": self.user_id}


# ===========================================================================
# The shop, folded from the log
# ===========================================================================


class ShopState:
    """The catalogue and the carts as of event `cursor`, and the changes to them.

    Every change runs under one lock: catch up, check and compute, publish,
    catch up again. So a change is judged against every event before it, and
    the caller's next snapshot includes it.
    """

    def __init__(self, log: AsyncEventLog) -> None:
        self.log = log
        self.shop = AsyncShop(log)
        self.cursor = 0
        self.log_id = ""
        self.catalogue = CatalogueView()
        self.carts: dict[str, Cart] = {}
        self._user_carts: dict[str, str] = {}
        self._session_carts: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # -- reading ---------------------------------------------------------------------

    async def catch_up(self) -> None:
        """Apply every event after the cursor."""
        while True:
            events = await self._read(self.cursor)
            for event in events:
                self._apply(decode_event(event))
                self.cursor = event.id
            if len(events) < self.log.settings.batch_size:
                return

    async def _read(self, after: int) -> list:
        # Reads are safe to repeat: after pg_terminate_backend, each dead pooled
        # connection fails once before the pool replaces it. Clearing them here
        # also spares the publish that follows.
        attempts = self.log.settings.pool_max_size + 1
        for attempt in range(attempts):
            try:
                return await self.log.read(after=after)
            except ConnectionFailed:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")

    def _apply(self, event: ShopEvent) -> None:
        cart = getattr(event, "cart", None)
        if isinstance(cart, Cart):
            self._apply_cart(cart)
        else:
            self.catalogue.apply(event)

    def _apply_cart(self, cart: Cart) -> None:
        self.carts[str(cart.id)] = cart
        if cart.user_id is not None:
            self._user_carts[str(cart.user_id)] = str(cart.id)
        if cart.session_id is not None and cart.user_id is None:
            self._session_carts[str(cart.session_id)] = str(cart.id)

    def cart_of(self, shopper: Shopper) -> Cart | None:
        """Return the shopper's cart: the user's once signed in, else the guest session's."""
        if shopper.user_id is not None:
            key = self._user_carts.get(shopper.user_id)
        else:
            key = self._session_carts.get(shopper.session_id)
        return None if key is None else self.carts[key]

    async def snapshot(self, shopper: Shopper) -> dict[str, Any]:
        async with self._lock:
            await self.catch_up()
            cart = self.cart_of(shopper)
            return {
                **self.identity(shopper),
                "last_event_id": self.cursor,
                "cart": None if cart is None else _json(cart),
                "products": {k: _json(p) for k, p in self.catalogue.products.items()},
                "categories": {k: _json(c) for k, c in self.catalogue.categories.items()},
            }

    def identity(self, shopper: Shopper) -> dict[str, Any]:
        """Return what a page needs to tell whether a view it stored still fits, and what to follow."""
        return {
            "log_id": self.log_id,
            "shopper": shopper.as_json(),
            "topics": list(shopper.topics),
            "event_types": list(EVENT_CLASSES),
        }

    async def change(self, action: Callable[[], Awaitable[Any]]) -> int:
        """Run `action` (which publishes) against the current shop; return the new cursor."""
        async with self._lock:
            await self.catch_up()
            await action()
            await self.catch_up()
            return self.cursor

    async def open(self) -> None:
        """Catch up with the log; fill an empty log with the demo's catalogue."""
        await self.catch_up()
        if self.cursor == 0:
            await self._seed()
            await self.catch_up()
        first = (await self.log.read(after=0, limit=1))[0]
        # Tells a page whether the view it stored was built from this log.
        self.log_id = f"{self.log.schema}/{first.id}/{first.occurred_at.isoformat()}"

    async def _seed(self) -> None:
        for category in CATEGORIES:
            await self.shop.broadcast_category_created(category)
        for product in PRODUCTS:
            await self.shop.broadcast_product_created(product)

    # -- the shopper's changes -------------------------------------------------------------

    async def add_to_cart(self, shopper: Shopper, product_id: str, quantity: int) -> int:
        async def action() -> None:
            product = self._product(product_id)
            cart = self.cart_of(shopper) or Cart(
                id=f"cart-{secrets.token_hex(6)}", user_id=shopper.user_id, session_id=shopper.session_id
            )
            line = next((i for i in cart.items if str(i.product_id) == str(product.id)), None)
            if line is not None:
                item = _with_quantity(line, line.quantity + quantity)
                await self.shop.broadcast_quantity_updated(_replace_item(cart, item), item)
                return
            item = CartItem(
                id=f"line-{secrets.token_hex(4)}", product_id=product.id, sku=product.sku,
                name=product.name, quantity=quantity, unit_price=product.price,
                total=product.price * quantity,
            )
            await self.shop.broadcast_item_added(_totals(cart, [*cart.items, item]), item)

        return await self.change(action)

    async def set_quantity(self, shopper: Shopper, item_id: str, quantity: int) -> int:
        async def action() -> None:
            cart, line = self._line(shopper, item_id)
            if quantity == 0:
                items = [i for i in cart.items if str(i.id) != item_id]
                await self.shop.broadcast_item_removed(_totals(cart, items), line.id)
                return
            item = _with_quantity(line, quantity)
            await self.shop.broadcast_quantity_updated(_replace_item(cart, item), item)

        return await self.change(action)

    async def clear_cart(self, shopper: Shopper) -> int:
        async def action() -> None:
            cart = self._cart(shopper)
            await self.shop.broadcast_cart_cleared(_totals(cart, []))

        return await self.change(action)

    async def check_out(self, shopper: Shopper) -> int:
        """Take the items out of stock and empty the cart."""
        async def action() -> None:
            cart = self._cart(shopper)
            if not cart.items:
                raise DemoInputError("the cart is empty")
            for item in cart.items:
                if str(item.product_id) in self.catalogue.products:
                    await self.shop.broadcast_inventory_updated(item.product_id, -item.quantity)
            await self.shop.broadcast_cart_cleared(_totals(cart, []))

        return await self.change(action)

    async def sign_in(self, shopper: Shopper, user_id: str) -> int:
        """Give the guest's cart to the user, or merge it into the user's cart."""
        async def action() -> None:
            guest = self._session_carts.get(shopper.session_id)
            guest_cart = None if guest is None else self.carts[guest]
            if guest_cart is None or not guest_cart.items:
                return
            own = self._user_carts.get(user_id)
            if own is None:
                await self.shop.broadcast_cart_updated(guest_cart.model_copy(update={"user_id": user_id}))
                return
            merged = self.carts[own]
            for item in guest_cart.items:
                line = next((i for i in merged.items if str(i.product_id) == str(item.product_id)), None)
                merged = (
                    _replace_item(merged, _with_quantity(line, line.quantity + item.quantity))
                    if line is not None else _totals(merged, [*merged.items, item])
                )
            await self.shop.broadcast_cart_updated(merged)
            await self.shop.broadcast_cart_cleared(_totals(guest_cart, []))

        return await self.change(action)

    # -- the back office's changes ---------------------------------------------------------

    async def create_product(self, fields: dict[str, Any]) -> int:
        async def action() -> None:
            name = _text(fields.get("name"), "name")
            product = Product(
                id=_slug(name, self.catalogue.products),
                sku=_text(fields.get("sku") or name[:2].upper() + "-NEW", "sku"),
                name=name, price=_money(fields.get("price")), stock=_int(fields.get("stock", 0), "stock"),
                category_id=self._category_id(fields.get("category_id")),
            )
            await self.shop.broadcast_product_created(product)

        return await self.change(action)

    async def update_product(self, product_id: str, fields: dict[str, Any]) -> int:
        async def action() -> None:
            product = self._product(product_id)
            changes: dict[str, Any] = {}
            if "name" in fields:
                changes["name"] = _text(fields["name"], "name")
            if "price" in fields:
                changes["price"] = _money(fields["price"])
            if "category_id" in fields:
                changes["category_id"] = self._category_id(fields["category_id"])
            if "status" in fields:
                changes["status"] = _text(fields["status"], "status")
            if changes:
                await self.shop.broadcast_product_updated(product.model_copy(update=changes))

        return await self.change(action)

    async def delete_product(self, product_id: str) -> int:
        async def action() -> None:
            await self.shop.broadcast_product_deleted(self._product(product_id).id)

        return await self.change(action)

    async def change_stock(self, product_id: str, change: int) -> int:
        async def action() -> None:
            product = self._product(product_id)
            if product.stock + change < 0:
                raise DemoInputError(f"only {product.stock} of {product.name!r} in stock")
            await self.shop.broadcast_inventory_updated(product.id, change)

        return await self.change(action)

    async def create_category(self, fields: dict[str, Any]) -> int:
        async def action() -> None:
            name = _text(fields.get("name"), "name")
            key = _slug(name, self.catalogue.categories)
            category = Category(
                id=key, name=name, slug=key, parent_id=self._category_id(fields.get("parent_id")),
            )
            await self.shop.broadcast_category_created(category)

        return await self.change(action)

    async def update_category(self, category_id: str, fields: dict[str, Any]) -> int:
        async def action() -> None:
            category = self._category(category_id)
            changes = {key: _text(fields[key], key) for key in ("name", "status") if key in fields}
            if changes:
                await self.shop.broadcast_category_updated(category.model_copy(update=changes))

        return await self.change(action)

    async def delete_category(self, category_id: str) -> int:
        async def action() -> None:
            await self.shop.broadcast_category_deleted(self._category(category_id).id)

        return await self.change(action)

    # -- lookups that raise DemoInputError ----------------------------------------------------

    def _product(self, product_id: Any) -> Product:
        product = self.catalogue.products.get(str(product_id))
        if product is None:
            raise DemoInputError(f"no product {product_id!r}; it may have been deleted meanwhile")
        return product

    def _category(self, category_id: Any) -> Category:
        category = self.catalogue.categories.get(str(category_id))
        if category is None:
            raise DemoInputError(f"no category {category_id!r}; it may have been deleted meanwhile")
        return category

    def _category_id(self, value: Any) -> str | None:
        return None if value in (None, "") else str(self._category(value).id)

    def _cart(self, shopper: Shopper) -> Cart:
        cart = self.cart_of(shopper)
        if cart is None:
            raise DemoInputError("the cart is empty")
        return cart

    def _line(self, shopper: Shopper, item_id: str) -> tuple[Cart, CartItem]:
        cart = self._cart(shopper)
        line = next((i for i in cart.items if str(i.id) == item_id), None)
        if line is None:
            raise DemoInputError(f"no line {item_id!r} in the cart; it may have been removed meanwhile")
        return cart, line


def _json(model: Any) -> Any:
    return model.model_dump(mode="json")


def _totals(cart: Cart, items: list[CartItem]) -> Cart:
    subtotal = sum((i.total for i in items), Decimal("0.00"))
    return cart.model_copy(update={"items": items, "subtotal": subtotal, "total": subtotal})


def _with_quantity(item: CartItem, quantity: int) -> CartItem:
    return item.model_copy(update={"quantity": quantity, "total": item.unit_price * quantity})


def _replace_item(cart: Cart, item: CartItem) -> Cart:
    return _totals(cart, [item if i.id == item.id else i for i in cart.items])


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 80:
        raise DemoInputError(f"invalid {what} {value!r}: expected 1 to 80 characters")
    return value.strip()


def _money(value: Any) -> Decimal:
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0 or amount != amount.quantize(Decimal("0.01")):
        raise DemoInputError(f"invalid price {value!r}: expected an amount such as 12.90")
    return amount.quantize(Decimal("0.01"))


def _int(value: Any, what: str, low: int = 0, high: int = 1_000_000) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise DemoInputError(f"invalid {what} {value!r}: expected a whole number from {low} to {high}")
    return number


def _slug(name: str, taken: dict[str, Any]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "item"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    return key


# ===========================================================================
# The web application
# ===========================================================================


def shopper_of(request: Request) -> Shopper | None:
    session_id = request.cookies.get(SESSION_COOKIE, "")
    if not _SESSION_ID.fullmatch(session_id):
        return None
    user_id = request.cookies.get(USER_COOKIE)
    return Shopper(session_id, user_id if user_id and _USER_ID.fullmatch(user_id) else None)


def create_app(log: AsyncEventLog, *, heartbeat: float = 15.0) -> Starlette:
    """The demo shop as a Starlette application; `log` is opened by its lifespan."""
    state = ShopState(log)

    def may_follow(request: Request, topics: tuple[str, ...]) -> bool:
        shopper = shopper_of(request)
        allowed = set(CATALOGUE_TOPICS) | set(shopper.cart_topics if shopper else ())
        return bool(topics) and all(t in allowed or t.startswith(products_topic() + ":") for t in topics)

    events = EventStream(log, authorize=may_follow, heartbeat=heartbeat, retry=RETRY_SECONDS)

    async def page(request: Request) -> Response:
        name = "admin.html" if request.url.path.startswith("/admin") else "shop.html"
        response = FileResponse(str(STATIC / name), headers={"cache-control": "no-store"})
        if shopper_of(request) is None:
            response.set_cookie(SESSION_COOKIE, secrets.token_hex(16), httponly=True, samesite="strict")
        return response

    async def api(request: Request) -> Response:
        shopper = shopper_of(request)
        if shopper is None:
            return JSONResponse({"error": "no shopper session: load the page first"}, status_code=401)
        body = await request.json() if request.method == "POST" else {}
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        try:
            return await _dispatch(state, request, shopper, body)
        except (DemoInputError, EventLogError, ValueError) as exc:
            status = 503 if isinstance(exc, ConnectionFailed) else 400
            logger.log(
                logging.WARNING if status == 503 else logging.INFO,
                "%s %s failed with %d: %s", request.method, request.url.path, status, exc,
            )
            return JSONResponse({"error": str(exc)}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with log:
            await state.open()
            app.state.shop = state
            app.state.events = events
            yield
            await events.close()

    routes = [
        Route("/", page),
        Route("/admin", page),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/events", events),
        Route("/api/{path:path}", api, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _dispatch(state: ShopState, request: Request, shopper: Shopper, body: dict[str, Any]) -> Response:
    path, method = request.path_params["path"].strip("/"), request.method
    parts = path.split("/")
    if method == "GET" and path == "state":
        return JSONResponse(await state.snapshot(shopper))
    if method == "GET" and path == "whoami":
        return JSONResponse(state.identity(shopper))
    if method != "POST":
        return JSONResponse({"error": f"no such endpoint: {method} /api/{path}"}, status_code=404)

    if path == "sign-in":
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
            raise DemoInputError(f"invalid user name {user_id!r}: use 1 to 40 letters, digits, '.', '_' or '-'")
        cursor = await state.sign_in(shopper, user_id)
        response = JSONResponse({"last_event_id": cursor})
        response.set_cookie(USER_COOKIE, user_id, httponly=True, samesite="strict")
        return response
    if path == "sign-out":
        response = JSONResponse({"last_event_id": state.cursor})
        response.delete_cookie(USER_COOKIE)
        response.set_cookie(SESSION_COOKIE, secrets.token_hex(16), httponly=True, samesite="strict")
        return response

    actions: dict[tuple[str, ...], Callable[[], Awaitable[int]]] = {
        ("cart", "add"): lambda: state.add_to_cart(
            shopper, str(body.get("product_id")), _int(body.get("quantity", 1), "quantity", 1, 99)
        ),
        ("cart", "quantity"): lambda: state.set_quantity(
            shopper, str(body.get("item_id")), _int(body.get("quantity"), "quantity", 0, 99)
        ),
        ("cart", "clear"): lambda: state.clear_cart(shopper),
        ("cart", "checkout"): lambda: state.check_out(shopper),
        ("admin", "products"): lambda: state.create_product(body),
        ("admin", "categories"): lambda: state.create_category(body),
    }
    if len(parts) == 4 and parts[:2] == ["admin", "products"]:
        product_id, verb = parts[2], parts[3]
        actions[tuple(parts)] = {
            "update": lambda: state.update_product(product_id, body),
            "delete": lambda: state.delete_product(product_id),
            "stock": lambda: state.change_stock(product_id, _int(body.get("change"), "change", -10_000, 10_000)),
        }.get(verb, _missing)
    if len(parts) == 4 and parts[:2] == ["admin", "categories"]:
        category_id, verb = parts[2], parts[3]
        actions[tuple(parts)] = {
            "update": lambda: state.update_category(category_id, body),
            "delete": lambda: state.delete_category(category_id),
        }.get(verb, _missing)

    action = actions.get(tuple(parts))
    if action is None or action is _missing:
        return JSONResponse({"error": f"no such endpoint: POST /api/{path}"}, status_code=404)
    return JSONResponse({"last_event_id": await action()})


async def _missing() -> int:
    raise AssertionError("not called")


# ===========================================================================
# Serving
# ===========================================================================


DEFAULT_SCHEMA = "demo_shop"


def run_serve(args: argparse.Namespace) -> int:
    """Run ``eventlog demo --serve``: on `--database-url`, or on a throwaway server."""
    from .cli import write_line

    schema = args.schema or DEFAULT_SCHEMA
    with _server(args.database_url, args.keep, schema, write_line) as url:
        # A shop keeps its log: an existing schema is reused (and upgraded), never dropped.
        migrate.upgrade(url, schema=schema)
        write_line(f"log in schema {schema!r} of {redact_url(url)}")
        serve(url, schema, host=args.host, port=args.port, connect_timeout=args.connect_timeout, write=write_line)
    return 0


def serve(
    database_url: str,
    schema: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    connect_timeout: float | None = None,
    write: Callable[[str], None] = print,
) -> None:
    """Serve the demo shop until SIGINT or SIGTERM; the log must be migrated."""
    options: dict[str, Any] = {"connect_timeout": connect_timeout} if connect_timeout else {}
    app = create_app(AsyncEventLog(database_url, schema=schema, **options))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    shown = f"[{host}]" if ":" in host else host
    write(f"demo shop at http://{shown}:{sock.getsockname()[1]}/ (back office: /admin); Ctrl-C stops it")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    _DemoServer(config, app).run(sockets=[sock])


class _DemoServer(uvicorn.Server):
    """uvicorn's server, which ends the event streams first when told to stop.

    uvicorn waits for open responses before it exits, and an event stream never
    ends by itself; ended cleanly, it makes browsers reconnect to the next server.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version raises the signal again once the server is down,
        # for programs that embed it; here the signal only means "stop", and
        # the caller still has a database server to stop.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        events = getattr(self._app.state, "events", None)
        if self._loop is not None and events is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(events.close()))
        super().handle_exit(sig, frame)
