"""The shop's event API: routing of every broadcast, subscribers, typed events, money.

Each broadcast must land on exactly its topics: the stored row is checked, and
one subscriber per shop topic must receive exactly the events that carry its
topic. A subscriber proves that an event did not reach it with a sentinel event
published afterwards: events arrive in id order, so the sentinel coming first
means the earlier event was never delivered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from eventlog.errors import InvalidTopic, SubscriptionStateError
from eventlog.shop import (
    EVENT_CLASSES,
    AsyncShop,
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
    UnknownEvent,
    cart_topics,
    categories_topic,
    decode_event,
    inventory_topic,
    product_topic,
    products_topic,
    session_cart_topic,
    user_cart_topic,
)

WAIT = 30.0  # seconds; events arrive in milliseconds, this is slack for a loaded machine

USER = "shop:cart:user:u1"
SESSION = "shop:cart:session:s1"
PRODUCTS = "shop:products"
P1 = "shop:products:p1"
P2 = "shop:products:p2"
CATEGORIES = "shop:categories"
INVENTORY = "shop:inventory"
ALL_TOPICS = (USER, SESSION, PRODUCTS, P1, P2, CATEGORIES, INVENTORY)

ITEM = CartItem(id="i1", product_id="p1", sku="MUG-1", name="Mug", quantity=2,
                unit_price=Decimal("4.95"), total=Decimal("9.90"))
SIGNED_IN = Cart(id="c1", user_id="u1", items=[ITEM], subtotal=Decimal("9.90"), total=Decimal("9.90"))
GUEST = Cart(id="c2", session_id="s1", shipping_method="standard", payment_option="card")
BOTH = Cart(id="c3", user_id="u1", session_id="s1")
PRODUCT = Product(id="p1", sku="MUG-1", name="Mug", price=Decimal("4.95"), stock=3)
CATEGORY = Category(id="k1", name="Kitchen", parent_id=None)

# (function, arguments, event class, topics the stored event must carry)
BROADCASTS: list[tuple[str, tuple[Any, ...], type[ShopEvent], set[str]]] = [
    ("broadcast_cart_updated", (SIGNED_IN,), CartUpdated, {USER}),
    ("broadcast_item_added", (GUEST, ITEM), ItemAdded, {SESSION}),
    ("broadcast_item_removed", (BOTH, "i1"), ItemRemoved, {USER, SESSION}),
    ("broadcast_quantity_updated", (SIGNED_IN, ITEM), QuantityUpdated, {USER}),
    ("broadcast_shipping_selected", (GUEST,), ShippingSelected, {SESSION}),
    ("broadcast_payment_selected", (BOTH,), PaymentSelected, {USER, SESSION}),
    ("broadcast_cart_cleared", (SIGNED_IN,), CartCleared, {USER}),
    ("broadcast_product_created", (PRODUCT,), ProductCreated, {PRODUCTS, P1}),
    ("broadcast_product_updated", (PRODUCT,), ProductUpdated, {PRODUCTS, P1}),
    ("broadcast_product_deleted", ("p2",), ProductDeleted, {PRODUCTS, P2}),
    ("broadcast_products_bulk_status_changed", (["p1", "p2"], "archived"), ProductsBulkStatusChanged,
     {PRODUCTS, P1, P2}),
    ("broadcast_category_created", (CATEGORY,), CategoryCreated, {CATEGORIES}),
    ("broadcast_category_updated", (CATEGORY,), CategoryUpdated, {CATEGORIES}),
    ("broadcast_category_deleted", ("k1",), CategoryDeleted, {CATEGORIES}),
    ("broadcast_categories_bulk_deleted", (["k1", "k2"],), CategoriesBulkDeleted, {CATEGORIES}),
    ("broadcast_categories_bulk_parent_changed", (["k2"], "k1"), CategoriesBulkParentChanged, {CATEGORIES}),
    ("broadcast_categories_bulk_status_changed", (["k1"], "hidden"), CategoriesBulkStatusChanged, {CATEGORIES}),
    ("broadcast_inventory_updated", ("p1", -2), InventoryUpdated, {INVENTORY, P1}),
]

# One subscriber per topic, each through the subscribe function of the original module.
SUBSCRIBE: dict[str, Callable[[Any], Any]] = {
    USER: lambda s: s.subscribe_to_user_cart("u1"),
    SESSION: lambda s: s.subscribe_to_session_cart("s1"),
    PRODUCTS: lambda s: s.subscribe_products(),
    P1: lambda s: s.subscribe_product("p1"),
    P2: lambda s: s.subscribe_product("p2"),
    CATEGORIES: lambda s: s.subscribe_categories(),
    INVENTORY: lambda s: s.subscribe_inventory(),
}


def stored_topics(admin: psycopg.Connection, schema: str, event_id: int) -> set[str]:
    row = admin.execute(f'SELECT topics FROM "{schema}".events WHERE id = %s', [event_id]).fetchone()
    assert row is not None, f"event {event_id} is not stored"
    return set(row[0])


def read_until(sub: ShopSubscriber, last_id: int) -> list[ShopEvent]:
    """Read events until the one with id `last_id` (the sentinel) has arrived."""
    events: list[ShopEvent] = []
    while not events or events[-1].id < last_id:
        event = sub.next_event(WAIT)
        assert event is not None, f"no event within {WAIT:g} s; got {[e.id for e in events]}"
        events.append(event)
    return events


# -- topics ------------------------------------------------------------------------------


def test_topic_functions():
    assert user_cart_topic(42) == "shop:cart:user:42"
    assert session_cart_topic("abc") == "shop:cart:session:abc"
    assert products_topic() == "shop:products"
    assert product_topic("p1") == "shop:products:p1"
    assert categories_topic() == "shop:categories"
    assert inventory_topic() == "shop:inventory"
    assert cart_topics(SIGNED_IN) == [USER]
    assert cart_topics(GUEST) == [SESSION]
    assert cart_topics({"id": 3, "user_id": "u1", "session_id": "s1"}) == [USER, SESSION]


@pytest.mark.parametrize("bad", ["", None, True, 1.5, "a\x00b"])
def test_topic_rejects_bad_id(bad):
    with pytest.raises(InvalidTopic, match="user_id"):
        user_cart_topic(bad)


def test_cart_without_owner_has_no_topic():
    with pytest.raises(InvalidTopic, match="neither user_id nor session_id"):
        cart_topics(Cart(id=9))


# -- every broadcast, on exactly its topics ---------------------------------------------------


def test_broadcast_routing(log, admin, schema):
    shop = Shop(log)
    subscribers = {}
    for topic, subscribe in SUBSCRIBE.items():
        subscribers[topic] = shop.subscriber()
        subscribe(subscribers[topic])
    try:
        published = []
        for name, args, cls, topics in BROADCASTS:
            result = getattr(shop, name)(*args)
            event = result[0] if isinstance(result, list) else result
            assert type(event) is cls, name
            assert event.event_type == cls.event_type
            assert stored_topics(admin, schema, event.id) == topics, name
            published.append((event.id, topics))
        sentinel = log.publish(ALL_TOPICS, "test_sentinel").id

        for topic, sub in subscribers.items():
            received = [e.id for e in read_until(sub, sentinel)]
            expected = [i for i, topics in published if topic in topics] + [sentinel]
            assert received == expected, topic
    finally:
        for sub in subscribers.values():
            sub.close()


async def test_async_broadcast_routing(alog, admin, schema):
    shop = AsyncShop(alog)
    subscribers = {}
    for topic, subscribe in SUBSCRIBE.items():
        subscribers[topic] = shop.subscriber()
        await subscribe(subscribers[topic])
    try:
        published = []
        for name, args, cls, topics in BROADCASTS:
            result = await getattr(shop, name)(*args)
            event = result[0] if isinstance(result, list) else result
            assert type(event) is cls, name
            assert stored_topics(admin, schema, event.id) == topics, name
            published.append((event.id, topics))
        sentinel = (await alog.publish(ALL_TOPICS, "test_sentinel")).id

        for topic, sub in subscribers.items():
            received = []
            while not received or received[-1] < sentinel:
                event = await sub.next_event(WAIT)
                assert event is not None, topic
                received.append(event.id)
            assert received == [i for i, topics in published if topic in topics] + [sentinel], topic
    finally:
        for sub in subscribers.values():
            await sub.close()


def test_broadcast_returns_what_subscribers_get(log):
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_to_cart(BOTH)
        sent = shop.broadcast_item_added(BOTH, ITEM, metadata={"actor": "u1"})
        got = sub.next_event(WAIT)
    assert got == sent
    assert got.metadata == {"actor": "u1"}
    assert got.topics == (USER, SESSION)


def test_bulk_product_change_is_split_at_topic_limit(log, admin, schema):
    ids = [f"p{i}" for i in range(100)]
    events = Shop(log).broadcast_products_bulk_status_changed(ids, "archived")

    assert [len(e.product_ids) for e in events] == [63, 37]
    assert [e.id for e in events] == [events[0].id, events[0].id + 1]  # one transaction, in order
    for event in events:
        assert stored_topics(admin, schema, event.id) == {PRODUCTS, *(product_topic(i) for i in event.product_ids)}
    assert [i for e in events for i in e.product_ids] == ids


# -- typed events ---------------------------------------------------------------------------

ELIXIR_ORDER = {
    "cart_updated": ("cart",),
    "item_added": ("cart", "item"),
    "item_removed": ("cart", "item_id"),
    "quantity_updated": ("cart", "item"),
    "shipping_selected": ("cart",),
    "payment_selected": ("cart",),
    "cart_cleared": ("cart",),
    "product_created": ("product",),
    "product_updated": ("product",),
    "product_deleted": ("product_id",),
    "products_bulk_status_changed": ("product_ids", "status"),
    "category_created": ("category",),
    "category_updated": ("category",),
    "category_deleted": ("category_id",),
    "categories_bulk_deleted": ("category_ids",),
    "categories_bulk_parent_changed": ("category_ids", "parent_id"),
    "categories_bulk_status_changed": ("category_ids", "status"),
    "inventory_updated": ("product_id", "stock_change"),
}


def test_event_classes_mirror_elixir_tuples():
    assert {t: cls.__match_args__ for t, cls in EVENT_CLASSES.items()} == ELIXIR_ORDER


def test_match_positional(log):
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_to_user_cart("u1")
        sub.subscribe_inventory()
        shop.broadcast_item_added(SIGNED_IN, ITEM)
        shop.broadcast_item_removed(SIGNED_IN, "i1")
        shop.broadcast_inventory_updated("p1", 5)
        seen = []
        for _ in range(3):
            match sub.next_event(WAIT):
                case ItemAdded(cart, item):
                    seen.append(("added", cart.id, item.sku))
                case ItemRemoved(cart=cart, item_id=item_id):
                    seen.append(("removed", cart.id, item_id))
                case InventoryUpdated(product_id, change):
                    seen.append(("stock", product_id, change))
    assert seen == [("added", "c1", "MUG-1"), ("removed", "c1", "i1"), ("stock", "p1", 5)]


def test_unknown_and_malformed_events(log):
    with Shop(log).subscriber() as sub:
        sub.subscribe_products()
        log.publish(PRODUCTS, "price_list_imported", {"rows": 3})
        log.publish(PRODUCTS, "product_created", {"product": {"id": "p1"}})  # no sku, name, price
        foreign, malformed = sub.next_event(WAIT), sub.next_event(WAIT)
    assert isinstance(foreign, UnknownEvent) and foreign.type == "price_list_imported"
    assert foreign.data == {"rows": 3}
    assert isinstance(malformed, UnknownEvent) and "ProductCreated" in malformed.reason


def test_decode_replayed_event(log):
    sent = Shop(log).broadcast_category_created(CATEGORY)
    [stored] = log.read(CATEGORIES)
    assert decode_event(stored) == sent


# -- money and extra fields --------------------------------------------------------------------

PRICES = ["19.99", "0.10", "1E+2", "-0.00", "123456789012345678901234567890.123456789", "0.00001230"]


@pytest.mark.parametrize("price", PRICES)
def test_price_round_trips_exactly(log, admin, schema, price):
    value = Decimal(price)
    item = ITEM.model_copy(update={"unit_price": value, "total": value})
    cart = SIGNED_IN.model_copy(update={"items": [item], "total": value})
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_to_user_cart("u1")
        sent = shop.broadcast_item_added(cart, item)
        got = sub.next_event(WAIT)

    assert got.cart.total.as_tuple() == value.as_tuple()  # digits, exponent and sign
    assert got.item.unit_price.as_tuple() == value.as_tuple()
    row = admin.execute(
        f"""SELECT data->'cart'->'total' FROM "{schema}".events WHERE id = %s""", [sent.id]
    ).fetchone()
    assert isinstance(row[0], str), "money must be stored as a JSON string, never a float"
    assert Decimal(row[0]).as_tuple() == value.as_tuple()


def test_extra_fields_are_kept(log):
    class LoyaltyCart(Cart):
        loyalty_points: int

    cart = LoyaltyCart(id="c9", user_id="u1", loyalty_points=120, gift_note="for Ana",
                       items=[CartItem(**ITEM.model_dump(), engraving="A")])
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_to_cart(cart)
        shop.broadcast_cart_updated(cart)
        got = sub.next_event(WAIT)
    assert got.cart.model_extra == {"loyalty_points": 120, "gift_note": "for Ana"}
    assert got.cart.items[0].model_extra == {"engraving": "A"}
    assert LoyaltyCart.model_validate(got.cart.model_dump()) == cart


# -- a guest who signs in ----------------------------------------------------------------------


def test_guest_signs_in(log, admin, schema):
    shop = Shop(log)
    guest_cart = Cart(id="c5", session_id="s1")
    guest_tab, user_tab = shop.subscriber(), shop.subscriber()
    guest_tab.subscribe_to_session_cart("s1")
    user_tab.subscribe_to_user_cart("u1")
    try:
        first = shop.broadcast_item_added(guest_cart, ITEM)
        assert guest_tab.next_event(WAIT).id == first.id

        signed_in = guest_cart.model_copy(update={"user_id": "u1"})
        sign_in = shop.broadcast_cart_updated(signed_in)
        assert stored_topics(admin, schema, sign_in.id) == {USER, SESSION}
        assert guest_tab.next_event(WAIT).id == sign_in.id
        assert user_tab.next_event(WAIT).id == sign_in.id

        # The guest's tab now follows both topics; each event still arrives once.
        guest_tab.subscribe_to_user_cart("u1")
        later = [shop.broadcast_shipping_selected(signed_in), shop.broadcast_payment_selected(signed_in)]
        sentinel = log.publish([USER, SESSION], "test_sentinel").id
        assert [e.id for e in read_until(guest_tab, sentinel)] == [e.id for e in later] + [sentinel]
        assert [e.id for e in read_until(user_tab, sentinel)] == [e.id for e in later] + [sentinel]
    finally:
        guest_tab.close()
        user_tab.close()


# -- subscriber: resume, subscribe and unsubscribe while reading ---------------------------------


def test_resume_from_last_seen_id(log):
    shop = Shop(log)
    with shop.subscriber() as tab:
        tab.subscribe_to_cart(GUEST)
        shop.broadcast_item_added(GUEST, ITEM)
        assert tab.next_event(WAIT) is not None
        last_seen = tab.cursor

    missed = [shop.broadcast_quantity_updated(GUEST, ITEM), shop.broadcast_cart_cleared(GUEST)]
    with shop.subscriber(after=last_seen) as reopened:
        reopened.subscribe_to_cart(GUEST)  # before the first read: resumes after last_seen
        assert [reopened.next_event(WAIT).id for _ in missed] == [e.id for e in missed]
        live = shop.broadcast_shipping_selected(GUEST)
        assert reopened.next_event(WAIT).id == live.id


def test_subscribe_while_reading_starts_at_head(log):
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_products()
        assert sub.next_event(0) is None  # reading has begun
        shop.broadcast_cart_updated(SIGNED_IN)  # before subscribing: not for this subscriber
        sub.subscribe_to_user_cart("u1")
        after = shop.broadcast_cart_cleared(SIGNED_IN)
        sentinel = shop.broadcast_product_updated(PRODUCT)
        assert [e.id for e in read_until(sub, sentinel.id)] == [after.id, sentinel.id]


@pytest.mark.parametrize("unsubscribe, cart, kept", [
    (lambda s: s.unsubscribe_from_user_cart("u1"), BOTH, SESSION),
    (lambda s: s.unsubscribe_from_session_cart("s1"), BOTH, USER),
])
def test_unsubscribe_one_cart_topic(log, unsubscribe, cart, kept):
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_to_cart(cart)
        sub.subscribe_products()
        before = shop.broadcast_cart_updated(cart)
        assert sub.next_event(WAIT).id == before.id

        unsubscribe(sub)
        assert set(sub.topics) == {kept, PRODUCTS}
        unfollowed = shop.broadcast_cart_updated(cart.model_copy(update={kept.split(":")[2] + "_id": None}))
        sentinel = shop.broadcast_product_created(PRODUCT)
        assert [e.id for e in read_until(sub, sentinel.id)] == [sentinel.id], f"{unfollowed.id} was delivered"


def test_unsubscribe_from_cart_then_follow_again(log):
    shop = Shop(log)
    with shop.subscriber() as sub:
        sub.subscribe_to_cart(BOTH)
        shop.broadcast_cart_updated(BOTH)
        assert sub.next_event(WAIT) is not None

        sub.unsubscribe_from_cart(BOTH)  # no topic left
        assert dict(sub.topics) == {}
        shop.broadcast_cart_cleared(BOTH)
        assert sub.next_event(0.2) is None

        sub.subscribe_categories()
        created = shop.broadcast_category_created(CATEGORY)
        assert sub.next_event(WAIT).id == created.id


def test_subscribe_from_another_thread(log):
    """A thread that waits with no topic left gets the events of a topic subscribed later."""
    shop = Shop(log)
    sub = shop.subscriber()
    sub.subscribe_inventory()
    got: list[ShopEvent | None] = []
    reader = threading.Thread(target=lambda: got.append(sub.next_event(WAIT)))
    reader.start()
    try:
        sub.unsubscribe("shop:inventory")
        sub.subscribe_product("p1")
        event = shop.broadcast_product_updated(PRODUCT)
        reader.join(WAIT)
        assert [e.id for e in got if e is not None] == [event.id]
    finally:
        sub.close()
        reader.join(WAIT)


def test_close_from_another_thread_ends_iteration(log):
    sub = Shop(log).subscriber()
    sub.subscribe_products()
    done = threading.Event()
    events = []

    def read():
        events.extend(sub)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    sub.close()
    assert done.wait(WAIT)
    assert events == []
    with pytest.raises(SubscriptionStateError):
        sub.subscribe_inventory()


async def test_async_subscriber_functions(alog):
    shop = AsyncShop(alog)
    async with shop.subscriber() as sub:
        await sub.subscribe_to_cart(BOTH)
        await sub.subscribe_categories()
        first = await shop.broadcast_item_added(BOTH, ITEM)
        got = await sub.next_event(WAIT)
        assert got == first

        await sub.unsubscribe_from_session_cart("s1")
        await sub.unsubscribe_from_user_cart("u1")
        await shop.broadcast_cart_cleared(BOTH)
        sentinel = await shop.broadcast_category_deleted("k1")
        assert (await sub.next_event(WAIT)).id == sentinel.id

        await sub.unsubscribe_from_cart(BOTH)  # already gone: no error
        await sub.unsubscribe("shop:categories")
        await sub.subscribe_to_session_cart("s1")
        later = await shop.broadcast_cart_updated(GUEST)
        async for event in sub:
            assert event.id == later.id
            break


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_writes_nothing(log):
    shop = Shop(log)
    head = log.head()
    with pytest.raises(InvalidTopic, match="neither user_id nor session_id"):
        shop.broadcast_cart_updated(Cart(id="orphan"))
    with pytest.raises(ValueError, match="stock_change"):
        shop.broadcast_inventory_updated("p1", 1.5)
    with pytest.raises(ValueError, match="no product_ids given"):
        shop.broadcast_products_bulk_status_changed([], "archived")
    with pytest.raises(ValueError, match="status"):
        shop.broadcast_categories_bulk_status_changed(["k1"], "")
    with pytest.raises(ValueError, match="unit_price"):
        shop.broadcast_item_added(SIGNED_IN, {"id": 1, "product_id": 1, "sku": "x", "name": "x",
                                              "quantity": 1, "unit_price": "NaN"})
    assert log.head() == head


def test_wrong_log_class(log):
    with pytest.raises(TypeError, match="AsyncShop"):
        AsyncShop(log)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid cursor -1"):
        Shop(log).subscriber(after=-1)


def test_names_are_exported():
    import eventlog.shop as shop_module

    assert sorted(shop_module.__all__) == sorted(
        name for name in dir(shop_module)
        if not name.startswith("_") and name not in {"annotations", "events", "models", "topics"}
    )


def test_event_is_frozen():
    event = CartUpdated(id=1, topics=(USER,), occurred_at="2024-01-01T00:00:00Z", cart=SIGNED_IN)
    with pytest.raises(ValueError):
        event.id = 2  # type: ignore[misc]
