"""The shop's events: a typed port of the Elixir module that broadcast them.

The original sent cart, product, category and inventory events through
Phoenix.PubSub and lost every message sent while a subscriber was disconnected.
Here each broadcast is an event in the durable log, and a subscriber resumes
from the last event id it saw. The shape of the original stays:

* topic functions: `user_cart_topic`, `products_topic`, `cart_topics`, ...
  (module functions, no I/O);
* ``broadcast_*`` methods of `Shop` (sync) and `AsyncShop` (asyncio), one per
  event kind, each writing one event with all of its topics and returning it
  typed;
* ``subscribe_*`` and ``unsubscribe_*`` methods of the subscriber, which takes
  the place of the Elixir process (`ShopSubscriber`, `AsyncShopSubscriber`) and
  yields typed events (`ItemAdded`, `ProductUpdated`, ...) for ``match``.

docs/shop.md maps each original function to its counterpart here.
"""

from __future__ import annotations

from ._broadcast import AsyncShop, Shop
from ._subscriber import AsyncShopSubscriber, ShopSubscriber
from .events import (
    EVENT_CLASSES,
    CartCleared,
    CartUpdated,
    CategoriesBulkDeleted,
    CategoriesBulkParentChanged,
    CategoriesBulkStatusChanged,
    CategoryCreated,
    CategoryDeleted,
    CategoryUpdated,
    InventoryUpdated,
    ItemAdded,
    ItemRemoved,
    PaymentSelected,
    ProductCreated,
    ProductDeleted,
    ProductsBulkStatusChanged,
    ProductUpdated,
    QuantityUpdated,
    ShippingSelected,
    ShopEvent,
    UnknownEvent,
    decode_event,
)
from .models import Cart, CartItem, Category, Id, Money, Product
from .topics import (
    cart_topics,
    categories_topic,
    inventory_topic,
    product_topic,
    products_topic,
    session_cart_topic,
    user_cart_topic,
)

__all__ = [
    "EVENT_CLASSES",
    "AsyncShop",
    "AsyncShopSubscriber",
    "Cart",
    "CartCleared",
    "CartItem",
    "CartUpdated",
    "CategoriesBulkDeleted",
    "CategoriesBulkParentChanged",
    "CategoriesBulkStatusChanged",
    "Category",
    "CategoryCreated",
    "CategoryDeleted",
    "CategoryUpdated",
    "Id",
    "InventoryUpdated",
    "ItemAdded",
    "ItemRemoved",
    "Money",
    "PaymentSelected",
    "Product",
    "ProductCreated",
    "ProductDeleted",
    "ProductUpdated",
    "ProductsBulkStatusChanged",
    "QuantityUpdated",
    "ShippingSelected",
    "Shop",
    "ShopEvent",
    "ShopSubscriber",
    "UnknownEvent",
    "cart_topics",
    "categories_topic",
    "decode_event",
    "inventory_topic",
    "product_topic",
    "products_topic",
    "session_cart_topic",
    "user_cart_topic",
]
