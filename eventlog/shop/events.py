"""Typed shop events: one class per event kind of the original module.

Each class stands for one Elixir tuple, with the same fields in the same order,
so a handler reads like the original::

    match event:                                 # {:item_added, cart, item}
        case ItemAdded(cart, item): ...
        case ItemRemoved(cart=cart, item_id=item_id): ...
        case InventoryUpdated(product_id, change): ...

Every event also carries the log's `id` (the cursor to resume from), its
`topics`, `occurred_at` and `metadata`. The stored event type is the Elixir
atom (``"item_added"``, the class's `event_type`); the stored data contains the
tuple's other elements by name (``{"cart": {...}, "item": {...}}``).

`decode_event` turns a stored `eventlog.Event` into its class; an event whose
type is not a shop type, or whose data does not fit it, becomes `UnknownEvent`
rather than an exception, so one odd event cannot stop a subscriber.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._models import Event
from .models import Cart, CartItem, Category, Id, Product

__all__ = [
    "CartCleared",
    "CartUpdated",
    "CategoriesBulkDeleted",
    "CategoriesBulkParentChanged",
    "CategoriesBulkStatusChanged",
    "CategoryCreated",
    "CategoryDeleted",
    "CategoryUpdated",
    "EVENT_CLASSES",
    "InventoryUpdated",
    "ItemAdded",
    "ItemRemoved",
    "PaymentSelected",
    "ProductCreated",
    "ProductDeleted",
    "ProductUpdated",
    "ProductsBulkStatusChanged",
    "QuantityUpdated",
    "ShippingSelected",
    "ShopEvent",
    "UnknownEvent",
    "decode_event",
]

logger = logging.getLogger(__name__)


class ShopEvent(BaseModel):
    """Base of the shop's events: what the log stored, plus typed fields."""

    model_config = ConfigDict(frozen=True)

    event_type: ClassVar[str] = ""
    """The type stored in the log: the Elixir atom, such as ``"item_added"``."""
    __match_args__: ClassVar[tuple[str, ...]] = ()

    id: int
    topics: tuple[str, ...]
    occurred_at: dt.datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


# -- cart ------------------------------------------------------------------------------


class CartUpdated(ShopEvent):
    """``{:cart_updated, cart}``: totals changed, or any other change to the cart."""

    event_type: ClassVar[str] = "cart_updated"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart",)
    cart: Cart


class ItemAdded(ShopEvent):
    """``{:item_added, cart, item}``."""

    event_type: ClassVar[str] = "item_added"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart", "item")
    cart: Cart
    item: CartItem


class ItemRemoved(ShopEvent):
    """``{:item_removed, cart, item_id}``."""

    event_type: ClassVar[str] = "item_removed"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart", "item_id")
    cart: Cart
    item_id: Id


class QuantityUpdated(ShopEvent):
    """``{:quantity_updated, cart, item}``: `item` has the new quantity."""

    event_type: ClassVar[str] = "quantity_updated"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart", "item")
    cart: Cart
    item: CartItem


class ShippingSelected(ShopEvent):
    """``{:shipping_selected, cart}``: see ``cart.shipping_method``."""

    event_type: ClassVar[str] = "shipping_selected"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart",)
    cart: Cart


class PaymentSelected(ShopEvent):
    """``{:payment_selected, cart}``: see ``cart.payment_option``."""

    event_type: ClassVar[str] = "payment_selected"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart",)
    cart: Cart


class CartCleared(ShopEvent):
    """``{:cart_cleared, cart}``."""

    event_type: ClassVar[str] = "cart_cleared"
    __match_args__: ClassVar[tuple[str, ...]] = ("cart",)
    cart: Cart


# -- products --------------------------------------------------------------------------


class ProductCreated(ShopEvent):
    """``{:product_created, product}``."""

    event_type: ClassVar[str] = "product_created"
    __match_args__: ClassVar[tuple[str, ...]] = ("product",)
    product: Product


class ProductUpdated(ShopEvent):
    """``{:product_updated, product}``."""

    event_type: ClassVar[str] = "product_updated"
    __match_args__: ClassVar[tuple[str, ...]] = ("product",)
    product: Product


class ProductDeleted(ShopEvent):
    """``{:product_deleted, product_id}``."""

    event_type: ClassVar[str] = "product_deleted"
    __match_args__: ClassVar[tuple[str, ...]] = ("product_id",)
    product_id: Id


class ProductsBulkStatusChanged(ShopEvent):
    """``{:products_bulk_status_changed, product_ids, status}``."""

    event_type: ClassVar[str] = "products_bulk_status_changed"
    __match_args__: ClassVar[tuple[str, ...]] = ("product_ids", "status")
    product_ids: tuple[Id, ...]
    status: str


# -- categories ------------------------------------------------------------------------


class CategoryCreated(ShopEvent):
    """``{:category_created, category}``."""

    event_type: ClassVar[str] = "category_created"
    __match_args__: ClassVar[tuple[str, ...]] = ("category",)
    category: Category


class CategoryUpdated(ShopEvent):
    """``{:category_updated, category}``."""

    event_type: ClassVar[str] = "category_updated"
    __match_args__: ClassVar[tuple[str, ...]] = ("category",)
    category: Category


class CategoryDeleted(ShopEvent):
    """``{:category_deleted, category_id}``."""

    event_type: ClassVar[str] = "category_deleted"
    __match_args__: ClassVar[tuple[str, ...]] = ("category_id",)
    category_id: Id


class CategoriesBulkDeleted(ShopEvent):
    """``{:categories_bulk_deleted, category_ids}``."""

    event_type: ClassVar[str] = "categories_bulk_deleted"
    __match_args__: ClassVar[tuple[str, ...]] = ("category_ids",)
    category_ids: tuple[Id, ...]


class CategoriesBulkParentChanged(ShopEvent):
    """``{:categories_bulk_parent_changed, category_ids, parent_id}``; None: top level."""

    event_type: ClassVar[str] = "categories_bulk_parent_changed"
    __match_args__: ClassVar[tuple[str, ...]] = ("category_ids", "parent_id")
    category_ids: tuple[Id, ...]
    parent_id: Id | None


class CategoriesBulkStatusChanged(ShopEvent):
    """``{:categories_bulk_status_changed, category_ids, status}``."""

    event_type: ClassVar[str] = "categories_bulk_status_changed"
    __match_args__: ClassVar[tuple[str, ...]] = ("category_ids", "status")
    category_ids: tuple[Id, ...]
    status: str


# -- inventory -------------------------------------------------------------------------


class InventoryUpdated(ShopEvent):
    """``{:inventory_updated, product_id, stock_change}``: `stock_change` is a delta."""

    event_type: ClassVar[str] = "inventory_updated"
    __match_args__: ClassVar[tuple[str, ...]] = ("product_id", "stock_change")
    product_id: Id
    stock_change: int


class UnknownEvent(ShopEvent):
    """An event on a shop topic that is not a shop event, or whose data does not fit.

    `type` and `data` are as stored; `reason` explains why it was not decoded.
    """

    __match_args__: ClassVar[tuple[str, ...]] = ("type", "data")
    type: str
    data: Any = None
    reason: str


EVENT_CLASSES: Mapping[str, type[ShopEvent]] = {
    cls.event_type: cls
    for cls in (
        CartUpdated, ItemAdded, ItemRemoved, QuantityUpdated, ShippingSelected,
        PaymentSelected, CartCleared, ProductCreated, ProductUpdated, ProductDeleted,
        ProductsBulkStatusChanged, CategoryCreated, CategoryUpdated, CategoryDeleted,
        CategoriesBulkDeleted, CategoriesBulkParentChanged, CategoriesBulkStatusChanged,
        InventoryUpdated,
    )
}
"""Stored event type -> event class."""


def decode_event(event: Event) -> ShopEvent:
    """Return the typed shop event for a stored event, or `UnknownEvent` if there is no fitting class."""
    stored: dict[str, Any] = {
        "id": event.id,
        "topics": event.topics,
        "occurred_at": event.occurred_at,
        "metadata": event.metadata,
    }
    cls = EVENT_CLASSES.get(event.type)
    if cls is None:
        # Applications may publish their own types on shop topics; not an error.
        reason = f"event type {event.type!r} is not a shop event type"
        logger.debug("event %d on %s: %s", event.id, list(event.topics), reason)
        return UnknownEvent(type=event.type, data=event.data, reason=reason, **stored)

    if not isinstance(event.data, dict):
        reason = f"{event.type} data is {type(event.data).__name__}, expected an object"
    else:
        try:
            return cls.model_validate({**event.data, **stored})
        except ValidationError as exc:
            reason = f"{event.type} data does not fit {cls.__name__}: {_first_error(exc)}"
    # A shop type with data that does not fit: a publisher with another version
    # of the models, or a bug. The subscriber goes on; the log keeps the event.
    logger.warning("event %d on %s not decoded: %s", event.id, list(event.topics), reason)
    return UnknownEvent(type=event.type, data=event.data, reason=reason, **stored)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "data"
    return f"{where}: {error.get('msg')}"
