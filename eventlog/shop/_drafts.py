"""Drafts: the event each broadcast writes (topics, type, data), built without I/O.

`Shop` and `AsyncShop` share these, so the two cannot route an event differently.
Arguments are validated here, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from .._encoding import MAX_TOPICS_PER_EVENT
from .._models import Event
from .events import (
    CategoriesBulkDeleted,
    CategoriesBulkParentChanged,
    CategoriesBulkStatusChanged,
    CategoryDeleted,
    InventoryUpdated,
    ItemRemoved,
    ProductDeleted,
    ProductsBulkStatusChanged,
    ShopEvent,
)
from .models import Cart, CartItem, Category, Product, check_id
from .topics import CATEGORIES, INVENTORY, PRODUCTS, cart_topics, product_topic

# A bulk product event carries shop:products plus one topic per product, and an
# event has at most MAX_TOPICS_PER_EVENT topics.
MAX_PRODUCTS_PER_EVENT = MAX_TOPICS_PER_EVENT - 1


E = TypeVar("E", bound=ShopEvent)


@dataclass(frozen=True)
class Draft(Generic[E]):
    """One event a broadcast is about to publish, and the class it reads back as."""

    cls: type[E]
    topics: tuple[str, ...]
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return self.cls.event_type

    def payload(self) -> dict[str, Any]:
        # serialize_as_any keeps the fields of an application's subclass (and of
        # subclassed items inside a cart), which plain model_dump would drop.
        return {
            key: value.model_dump(mode="json", serialize_as_any=True)
            if isinstance(value, BaseModel) else value
            for key, value in self.data.items()
        }

    def read_back(self, event: Event) -> E:
        """Return the stored `event` as this draft's class, as subscribers will see it."""
        return self.cls.model_validate(
            {**event.data, "id": event.id, "topics": event.topics,
             "occurred_at": event.occurred_at, "metadata": event.metadata}
        )


def _cart(value: Cart | Mapping[str, Any]) -> Cart:
    return value if isinstance(value, Cart) else Cart.model_validate(value)


def _item(value: CartItem | Mapping[str, Any]) -> CartItem:
    return value if isinstance(value, CartItem) else CartItem.model_validate(value)


def _product(value: Product | Mapping[str, Any]) -> Product:
    return value if isinstance(value, Product) else Product.model_validate(value)


def _category(value: Category | Mapping[str, Any]) -> Category:
    return value if isinstance(value, Category) else Category.model_validate(value)


def _ids(values: Iterable[Any], field_name: str) -> list[int | str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"invalid {field_name}s {values!r}: expected a list of ids")
    ids = list(dict.fromkeys(check_id(v, field_name) for v in values))
    if not ids:
        raise ValueError(f"no {field_name}s given: a bulk event needs at least one")
    return ids


def _status(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"invalid status {value!r}: expected a non-empty string such as 'active'")
    return value


def cart_draft(cls: type[E], cart: Cart | Mapping[str, Any], **fields: Any) -> Draft[E]:
    """Route a cart event to every topic of its cart: user, session, or both."""
    cart = _cart(cart)
    return Draft(cls, tuple(cart_topics(cart)), {"cart": cart, **fields})


def item_draft(
    cls: type[E], cart: Cart | Mapping[str, Any], item: CartItem | Mapping[str, Any]
) -> Draft[E]:
    return cart_draft(cls, cart, item=_item(item))


def item_removed_draft(cart: Cart | Mapping[str, Any], item_id: Any) -> Draft[ItemRemoved]:
    return cart_draft(ItemRemoved, cart, item_id=check_id(item_id, "item_id"))


def product_draft(cls: type[E], product: Product | Mapping[str, Any]) -> Draft[E]:
    """Route a product event to shop:products and to the product's own topic."""
    product = _product(product)
    return Draft(cls, (PRODUCTS, product_topic(product.id)), {"product": product})


def product_deleted_draft(product_id: Any) -> Draft[ProductDeleted]:
    product_id = check_id(product_id, "product_id")
    return Draft(ProductDeleted, (PRODUCTS, product_topic(product_id)), {"product_id": product_id})


def products_bulk_drafts(
    product_ids: Iterable[Any], status: Any
) -> list[Draft[ProductsBulkStatusChanged]]:
    """Split a bulk change into events of `MAX_PRODUCTS_PER_EVENT` products each.

    Each event goes to shop:products and to its products' topics. An event has at
    most `MAX_TOPICS_PER_EVENT` topics, so the caller publishes the parts in one
    transaction.
    """
    ids = _ids(product_ids, "product_id")
    status = _status(status)
    drafts: list[Draft[ProductsBulkStatusChanged]] = []
    for start in range(0, len(ids), MAX_PRODUCTS_PER_EVENT):
        part = ids[start:start + MAX_PRODUCTS_PER_EVENT]
        topics = (PRODUCTS, *(product_topic(i) for i in part))
        drafts.append(Draft(ProductsBulkStatusChanged, topics, {"product_ids": part, "status": status}))
    return drafts


def category_draft(cls: type[E], category: Category | Mapping[str, Any]) -> Draft[E]:
    """Route a category event to shop:categories only."""
    return Draft(cls, (CATEGORIES,), {"category": _category(category)})


def category_deleted_draft(category_id: Any) -> Draft[CategoryDeleted]:
    return Draft(CategoryDeleted, (CATEGORIES,), {"category_id": check_id(category_id, "category_id")})


def categories_bulk_deleted_draft(category_ids: Iterable[Any]) -> Draft[CategoriesBulkDeleted]:
    return Draft(CategoriesBulkDeleted, (CATEGORIES,), {"category_ids": _ids(category_ids, "category_id")})


def categories_bulk_parent_draft(
    category_ids: Iterable[Any], parent_id: Any
) -> Draft[CategoriesBulkParentChanged]:
    parent = None if parent_id is None else check_id(parent_id, "parent_id")
    data = {"category_ids": _ids(category_ids, "category_id"), "parent_id": parent}
    return Draft(CategoriesBulkParentChanged, (CATEGORIES,), data)


def categories_bulk_status_draft(
    category_ids: Iterable[Any], status: Any
) -> Draft[CategoriesBulkStatusChanged]:
    data = {"category_ids": _ids(category_ids, "category_id"), "status": _status(status)}
    return Draft(CategoriesBulkStatusChanged, (CATEGORIES,), data)


def inventory_draft(product_id: Any, stock_change: Any) -> Draft[InventoryUpdated]:
    """Route a stock change to shop:inventory and to the product's own topic."""
    product_id = check_id(product_id, "product_id")
    if isinstance(stock_change, bool) or not isinstance(stock_change, int):
        raise ValueError(
            f"invalid stock_change {stock_change!r}: expected an integer delta such as -2 or 10"
        )
    data = {"product_id": product_id, "stock_change": stock_change}
    return Draft(InventoryUpdated, (INVENTORY, product_topic(product_id)), data)
