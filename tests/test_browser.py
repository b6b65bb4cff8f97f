"""The demo shop in headless Chromium: tabs stay in sync and survive cut connections.

`eventlog demo --serve` runs as a subprocess on the suite's database; Playwright
drives Debian's Chromium (never a downloaded browser). Each test ends by
comparing what every page shows with the shop's cart: the cart of the last cart
event in the log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's package with `apt-get install chromium`",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed: pip install playwright"
)
pytest.importorskip("starlette", reason="the demo shop needs the 'web' extra (starlette, uvicorn)")

from eventlog import EventLog, migrate  # noqa: E402
from eventlog.shop import Shop, session_cart_topic, user_cart_topic  # noqa: E402

# Flags that keep Chromium from reaching out: this machine has no network, and a
# test must not depend on one.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT = 30.0  # seconds; generous, for a loaded two-core machine
ROOT = Path(__file__).resolve().parent.parent


# -- the demo server -----------------------------------------------------------------------


class DemoServer:
    """`eventlog demo --serve` in a subprocess, restartable on the same port."""

    def __init__(self, database_url: str, schema: str) -> None:
        self.database_url = database_url
        self.schema = schema
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "eventlog", "demo", "--serve", "--database-url", self.database_url,
            "--schema", self.schema, "--port", str(self.port),
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + WAIT
        lines = []
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            lines.append(line)
            if "demo shop at" in line:
                return
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError("the demo server did not start:\n" + "".join(lines))

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the demo server did not stop within 30 s of SIGTERM") from None
        finally:
            self.process = None
        assert status == 0, f"the demo server exited with status {status}"


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 whose connections the test can cut, as a network would.

    Chromium's offline emulation (`set_offline`) fails new requests but leaves an
    open event stream alone, so the proxy cuts the stream itself.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=WAIT)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                self._drop(end)

    def _drop(self, end: socket.socket) -> None:
        with self._lock:
            self._open.discard(end)
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        with self._lock:
            ends = list(self._open)
        for end in ends:
            self._drop(end)
        return len(ends)

    def close(self) -> None:
        self.listener.close()
        self.cut()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_schema(database_url: str) -> Iterator[str]:
    name = f"demo_{uuid.uuid4().hex[:8]}"
    migrate.upgrade(database_url, schema=name)
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(scope="module")
def server(database_url: str, demo_schema: str) -> Iterator[DemoServer]:
    demo = DemoServer(database_url, demo_schema)
    demo.start()
    yield demo
    demo.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def new_context(browser) -> Iterator[Callable[..., Any]]:
    contexts = []

    def make(**options: Any) -> Any:
        context = browser.new_context(viewport={"width": 1200, "height": 720}, **options)
        context.set_default_timeout(WAIT * 1000)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()


# -- helpers -------------------------------------------------------------------------------


def open_page(context: Any, url: str) -> Any:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    page.goto(url)
    wait_live(page)
    return page


def wait_live(page: Any) -> None:
    page.wait_for_function("window.eventlogDemo && window.eventlogDemo.status === 'live'")


def demo_state(page: Any) -> dict:
    return page.evaluate("window.eventlogDemo.state")


def click_action(page: Any, selector: str) -> None:
    """Click a control that posts an action, and wait until the server carried it out."""
    with page.expect_response(lambda r: "/api/" in r.url and r.request.method == "POST") as posted:
        page.click(selector)
    response = posted.value
    assert response.ok, f"{response.url}: {response.status} {response.text()}"


def add(page: Any, product_id: str) -> None:
    click_action(page, f"tr[data-product-id='{product_id}'] [data-testid=add]")


def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` and its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def shop_cart(server: DemoServer, topic: str) -> dict | None:
    """The shop's cart: the cart of the last event on the cart's topic."""
    with EventLog(server.database_url, schema=server.schema) as log:
        events = [e for e in log.replay(topic) if isinstance(e.data, dict) and "cart" in e.data]
    return events[-1].data["cart"] if events else None


def cart_topic(page: Any) -> str:
    shopper = page.evaluate("window.eventlogDemo.shopper")
    if shopper["user_id"]:
        return user_cart_topic(shopper["user_id"])
    return session_cart_topic(shopper["session_id"])


def shown_items(page: Any) -> list[tuple[str, str]]:
    rows = page.locator("[data-testid=cart-item]")
    return [
        (rows.nth(i).locator(".name").inner_text(), rows.nth(i).locator("[data-testid=quantity]").inner_text())
        for i in range(rows.count())
    ]


def assert_pages_show_shop_cart(server: DemoServer, *pages: Any) -> dict:
    """Each page's cart (its state and what it shows) is the shop's cart."""
    topic = cart_topic(pages[0])
    truth = shop_cart(server, topic)
    assert truth is not None, f"no cart event on {topic}"
    for page in pages:
        eventually(lambda: demo_state(page)["cart"] == truth, f"a page to show the shop's cart {truth}")
        expected = [(i["name"], str(i["quantity"])) for i in truth["items"]]
        eventually(lambda: shown_items(page) == expected, f"the cart panel to list {expected}")
        assert page.inner_text("[data-testid=cart-total]") == truth["total"]
        assert not page.errors, page.errors
    return truth


def quantities(cart: dict) -> dict[str, int]:
    return {i["product_id"]: i["quantity"] for i in cart["items"]}


def app_backends(admin: psycopg.Connection) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'eventlog%%' AND pid <> pg_backend_pid()"
    ).fetchall()
    return [row[0] for row in rows]


# -- tests ---------------------------------------------------------------------------------


def test_two_tabs_stay_in_sync(server, new_context):
    context = new_context()
    first = open_page(context, server.url)
    second = open_page(context, server.url)

    add(first, "mug")
    add(second, "teapot")
    eventually(lambda: len(shown_items(first)) == 2, "both items in the first tab")
    click_action(first, "[data-item-id] >> nth=0 >> [data-testid=more]")
    add(second, "tea")
    truth = assert_pages_show_shop_cart(server, first, second)
    assert quantities(truth) == {"mug": 2, "teapot": 1, "tea": 1}

    # The back office changes the catalogue; both shop tabs follow.
    admin_page = open_page(new_context(), server.url + "/admin")
    click_action(admin_page, "tr[data-product-id='teapot'] [data-testid='stock+10']")
    admin_page.fill("tr[data-product-id='tea'] [data-testid=price]", "8.15")
    click_action(admin_page, "tr[data-product-id='tea'] [data-testid=save-price]")
    for page in (first, second):
        row = page.locator("tr[data-product-id='teapot'] [data-testid=stock]")
        eventually(lambda: row.inner_text() == "18", "the teapot's new stock in a shop tab")
        tea = page.locator("tr[data-product-id='tea'] td.num").first
        eventually(lambda: tea.inner_text() == "8.15", "the tea's new price in a shop tab")


def test_cuts_on_the_server_side(server, new_context, admin):
    context = new_context()
    first = open_page(context, server.url)
    second = open_page(context, server.url)
    add(first, "mug")
    assert_pages_show_shop_cart(server, first, second)

    # Every connection of the app server dies: its listener and its pool.
    backends = app_backends(admin)
    assert backends, "the demo server has no database connection to cut"
    admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [backends])
    add(second, "cake-stand")
    add(first, "mug")
    truth = assert_pages_show_shop_cart(server, first, second)
    assert quantities(truth) == {"mug": 2, "cake-stand": 1}

    # The app server restarts; meanwhile another process changes the cart and the stock.
    server.stop()
    with EventLog(server.database_url, schema=server.schema) as log:
        shop = Shop(log)
        cart = shop_cart(server, cart_topic(first))
        mug = next(i for i in cart["items"] if i["product_id"] == "mug")
        mug = {**mug, "quantity": 5, "total": Decimal(mug["unit_price"]) * 5}
        items = [mug if i["id"] == mug["id"] else i for i in cart["items"]]
        total = sum(Decimal(i["total"]) for i in items)
        shop.broadcast_quantity_updated({**cart, "items": items, "subtotal": total, "total": total}, mug)
        shop.broadcast_inventory_updated("cake-stand", -1)
    server.start()

    truth = assert_pages_show_shop_cart(server, first, second)
    assert quantities(truth) == {"mug": 5, "cake-stand": 1}
    stock = eventually(
        lambda: demo_state(first)["products"]["cake-stand"]["stock"] == demo_state(second)["products"]["cake-stand"]["stock"]
        and demo_state(first)["products"]["cake-stand"]["stock"],
        "the tabs to agree on the stock",
    )
    with EventLog(server.database_url, schema=server.schema) as log:
        changes = sum(e.data["stock_change"] for e in log.replay("shop:products:cake-stand") if e.type.endswith("inventory_updated"))
    assert stock == 5 + changes
    # A tab that followed the stream through both cuts went on from where it was.
    assert first.evaluate("window.eventlogDemo.starts") == 1


@pytest.fixture
def proxy(server) -> Iterator[CuttingProxy]:
    opened = CuttingProxy(server.port)
    yield opened
    opened.close()


def test_cuts_on_the_client_side(server, new_context, proxy):
    laptop = new_context()
    page = open_page(laptop, proxy.url)
    add(page, "tea")
    assert_pages_show_shop_cart(server, page)

    # The same shopper on another device (the session cookie copied) goes on shopping.
    phone = new_context()
    phone.add_cookies(laptop.cookies())
    other = open_page(phone, server.url)

    # The laptop's network goes: new requests fail, and the open stream is cut.
    laptop.set_offline(True)
    assert proxy.cut() > 0
    page.wait_for_function("window.eventlogDemo.errors > 0 && window.eventlogDemo.status !== 'live'")
    add(other, "mug")
    add(other, "tea")
    eventually(lambda: quantities(demo_state(other)["cart"]) == {"tea": 2, "mug": 1}, "the phone's cart")
    assert quantities(demo_state(page)["cart"]) == {"tea": 1}, "the laptop got events while offline"
    laptop.set_offline(False)
    truth = assert_pages_show_shop_cart(server, page, other)
    assert quantities(truth) == {"tea": 2, "mug": 1}

    # A reload shows the view kept in localStorage and resumes from its id.
    click_action(other, "[data-item-id] >> nth=0 >> [data-testid=less]")
    eventually(lambda: demo_state(other)["cart"] != truth, "the phone's change")
    stored_at = demo_state(page)["lastEventId"]
    page.reload()
    wait_live(page)
    assert page.evaluate("window.eventlogDemo.resumedFrom") == "storage"
    assert_pages_show_shop_cart(server, page, other)
    assert demo_state(page)["lastEventId"] >= stored_at


def test_guest_signs_in_and_the_cart_follows(server, new_context):
    context = new_context()
    first = open_page(context, server.url)
    second = open_page(context, server.url)
    add(first, "teapot")
    add(second, "candle")
    guest_cart = assert_pages_show_shop_cart(server, first, second)
    assert guest_cart["user_id"] is None

    user = f"user{uuid.uuid4().hex[:6]}"
    first.fill("[data-testid=sign-in] input", user)
    click_action(first, "[data-testid=sign-in] button")
    for page in (first, second):
        name = page.locator("[data-testid=shopper-name]")
        eventually(lambda: name.inner_text() == f"Signed in as {user}", "both tabs to show the user")
    truth = assert_pages_show_shop_cart(server, first, second)
    assert truth["id"] == guest_cart["id"]
    assert truth["user_id"] == user
    assert quantities(truth) == quantities(guest_cart)

    add(second, "mug")
    truth = assert_pages_show_shop_cart(server, first, second)
    assert quantities(truth) == {"teapot": 1, "candle": 1, "mug": 1}
    assert cart_topic(first) == user_cart_topic(user)


def test_other_carts_forbidden(server, new_context):
    page = open_page(new_context(), server.url)
    status = page.evaluate(
        "async (topic) => (await fetch('/events?topic=' + encodeURIComponent(topic))).status",
        session_cart_topic("0" * 32),
    )
    assert status == 403


def test_screenshot(server, new_context, tmp_path):
    """Renders the shop with a cart; EVENTLOG_UPDATE_SCREENSHOT=1 also writes docs/demo.png."""
    page = open_page(new_context(), server.url)
    for product in ("teapot", "tea", "tea", "mug"):
        add(page, product)
    assert_pages_show_shop_cart(server, page)
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("EVENTLOG_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "demo.png")
