"""`Shop` and `AsyncShop`: the broadcast functions of the original module.

Each broadcast writes one event that carries all of its topics and returns it
typed, with its id. Routing lives in `_drafts`, shared by both classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ..log import AsyncEventLog, EventLog
from ._drafts import (
    Draft,
    cart_draft,
    categories_bulk_deleted_draft,
    categories_bulk_parent_draft,
    categories_bulk_status_draft,
    category_deleted_draft,
    category_draft,
    inventory_draft,
    item_draft,
    item_removed_draft,
    product_deleted_draft,
    product_draft,
    products_bulk_drafts,
)
from ._subscriber import AsyncShopSubscriber, ShopSubscriber
from .events import (
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
)
from .models import Cart, CartItem, Category, Product

__all__ = ["AsyncShop", "Shop"]

E = TypeVar("E", bound=ShopEvent)

CartLike = Cart | Mapping[str, Any]
ItemLike = CartItem | Mapping[str, Any]
ProductLike = Product | Mapping[str, Any]
CategoryLike = Category | Mapping[str, Any]
Metadata = Mapping[str, Any] | None


class Shop:
    """The shop's events on a sync `EventLog`.

    >>> shop = Shop(log)
    >>> event = shop.broadcast_item_added(cart, item)   # -> ItemAdded, with event.id
    >>> sub = shop.subscriber(after=last_seen_id)

    Every broadcast accepts ``metadata=`` (correlation id, actor, ...), stored
    with the event.
    """

    def __init__(self, log: EventLog) -> None:
        if not isinstance(log, EventLog):
            raise TypeError(
                f"Shop needs an eventlog.EventLog, got {type(log).__name__}; "
                "use AsyncShop for an AsyncEventLog"
            )
        self.log = log

    def subscriber(self, *, after: int | None = None) -> ShopSubscriber:
        """Return a new subscriber that resumes after event id `after` (None: from now)."""
        return ShopSubscriber(self.log, after=after)

    def _send(self, draft: Draft[E], metadata: Metadata) -> E:
        event = self.log.publish(
            draft.topics, draft.type, draft.payload(), metadata=_metadata(metadata)
        )
        return draft.read_back(event)

    # -- cart ------------------------------------------------------------------------

    def broadcast_cart_updated(self, cart: CartLike, *, metadata: Metadata = None) -> CartUpdated:
        """Publish that the cart's totals, or anything else of the cart, changed."""
        return self._send(cart_draft(CartUpdated, cart), metadata)

    def broadcast_item_added(
        self, cart: CartLike, item: ItemLike, *, metadata: Metadata = None
    ) -> ItemAdded:
        return self._send(item_draft(ItemAdded, cart, item), metadata)

    def broadcast_item_removed(
        self, cart: CartLike, item_id: Any, *, metadata: Metadata = None
    ) -> ItemRemoved:
        return self._send(item_removed_draft(cart, item_id), metadata)

    def broadcast_quantity_updated(
        self, cart: CartLike, item: ItemLike, *, metadata: Metadata = None
    ) -> QuantityUpdated:
        return self._send(item_draft(QuantityUpdated, cart, item), metadata)

    def broadcast_shipping_selected(
        self, cart: CartLike, *, metadata: Metadata = None
    ) -> ShippingSelected:
        return self._send(cart_draft(ShippingSelected, cart), metadata)

    def broadcast_payment_selected(
        self, cart: CartLike, *, metadata: Metadata = None
    ) -> PaymentSelected:
        return self._send(cart_draft(PaymentSelected, cart), metadata)

    def broadcast_cart_cleared(self, cart: CartLike, *, metadata: Metadata = None) -> CartCleared:
        return self._send(cart_draft(CartCleared, cart), metadata)

    # -- products --------------------------------------------------------------------

    def broadcast_product_created(
        self, product: ProductLike, *, metadata: Metadata = None
    ) -> ProductCreated:
        return self._send(product_draft(ProductCreated, product), metadata)

    def broadcast_product_updated(
        self, product: ProductLike, *, metadata: Metadata = None
    ) -> ProductUpdated:
        return self._send(product_draft(ProductUpdated, product), metadata)

    def broadcast_product_deleted(
        self, product_id: Any, *, metadata: Metadata = None
    ) -> ProductDeleted:
        return self._send(product_deleted_draft(product_id), metadata)

    def broadcast_products_bulk_status_changed(
        self, product_ids: Iterable[Any], status: str, *, metadata: Metadata = None
    ) -> list[ProductsBulkStatusChanged]:
        """Publish one event per 63 products (an event has at most 64 topics), in one transaction."""
        drafts = products_bulk_drafts(product_ids, status)
        encoded = [(d.topics, d.type, d.payload(), _metadata(metadata)) for d in drafts]
        events = self.log.publish_many(encoded)
        return [d.read_back(e) for d, e in zip(drafts, events)]

    # -- categories ------------------------------------------------------------------

    def broadcast_category_created(
        self, category: CategoryLike, *, metadata: Metadata = None
    ) -> CategoryCreated:
        return self._send(category_draft(CategoryCreated, category), metadata)

    def broadcast_category_updated(
        self, category: CategoryLike, *, metadata: Metadata = None
    ) -> CategoryUpdated:
        return self._send(category_draft(CategoryUpdated, category), metadata)

    def broadcast_category_deleted(
        self, category_id: Any, *, metadata: Metadata = None
    ) -> CategoryDeleted:
        return self._send(category_deleted_draft(category_id), metadata)

    def broadcast_categories_bulk_deleted(
        self, category_ids: Iterable[Any], *, metadata: Metadata = None
    ) -> CategoriesBulkDeleted:
        return self._send(categories_bulk_deleted_draft(category_ids), metadata)

    def broadcast_categories_bulk_parent_changed(
        self, category_ids: Iterable[Any], parent_id: Any, *, metadata: Metadata = None
    ) -> CategoriesBulkParentChanged:
        """Publish the categories' new parent; None moves them to the top level."""
        return self._send(categories_bulk_parent_draft(category_ids, parent_id), metadata)

    def broadcast_categories_bulk_status_changed(
        self, category_ids: Iterable[Any], status: str, *, metadata: Metadata = None
    ) -> CategoriesBulkStatusChanged:
        return self._send(categories_bulk_status_draft(category_ids, status), metadata)

    # -- inventory -------------------------------------------------------------------

    def broadcast_inventory_updated(
        self, product_id: Any, stock_change: int, *, metadata: Metadata = None
    ) -> InventoryUpdated:
        """Publish a change in stock: `stock_change` is a delta, such as -2 for two sold."""
        return self._send(inventory_draft(product_id, stock_change), metadata)


class AsyncShop:
    """The shop's events on an `AsyncEventLog`; the same methods as `Shop`, as coroutines."""

    def __init__(self, log: AsyncEventLog) -> None:
        if not isinstance(log, AsyncEventLog):
            raise TypeError(
                f"AsyncShop needs an eventlog.AsyncEventLog, got {type(log).__name__}; "
                "use Shop for an EventLog"
            )
        self.log = log

    def subscriber(self, *, after: int | None = None) -> AsyncShopSubscriber:
        """Return a new subscriber that resumes after event id `after` (None: from now)."""
        return AsyncShopSubscriber(self.log, after=after)

    async def _send(self, draft: Draft[E], metadata: Metadata) -> E:
        event = await self.log.publish(
            draft.topics, draft.type, draft.payload(), metadata=_metadata(metadata)
        )
        return draft.read_back(event)

    # -- cart ------------------------------------------------------------------------

    async def broadcast_cart_updated(
        self, cart: CartLike, *, metadata: Metadata = None
    ) -> CartUpdated:
        """Publish that the cart's totals, or anything else of the cart, changed."""
        return await self._send(cart_draft(CartUpdated, cart), metadata)

    async def broadcast_item_added(
        self, cart: CartLike, item: ItemLike, *, metadata: Metadata = None
    ) -> ItemAdded:
        return await self._send(item_draft(ItemAdded, cart, item), metadata)

    async def broadcast_item_removed(
        self, cart: CartLike, item_id: Any, *, metadata: Metadata = None
    ) -> ItemRemoved:
        return await self._send(item_removed_draft(cart, item_id), metadata)

    async def broadcast_quantity_updated(
        self, cart: CartLike, item: ItemLike, *, metadata: Metadata = None
    ) -> QuantityUpdated:
        return await self._send(item_draft(QuantityUpdated, cart, item), metadata)

    async def broadcast_shipping_selected(
        self, cart: CartLike, *, metadata: Metadata = None
    ) -> ShippingSelected:
        return await self._send(cart_draft(ShippingSelected, cart), metadata)

    async def broadcast_payment_selected(
        self, cart: CartLike, *, metadata: Metadata = None
    ) -> PaymentSelected:
        return await self._send(cart_draft(PaymentSelected, cart), metadata)

    async def broadcast_cart_cleared(
        self, cart: CartLike, *, metadata: Metadata = None
    ) -> CartCleared:
        return await self._send(cart_draft(CartCleared, cart), metadata)

    # -- products --------------------------------------------------------------------

    async def broadcast_product_created(
        self, product: ProductLike, *, metadata: Metadata = None
    ) -> ProductCreated:
        return await self._send(product_draft(ProductCreated, product), metadata)

    async def broadcast_product_updated(
        self, product: ProductLike, *, metadata: Metadata = None
    ) -> ProductUpdated:
        return await self._send(product_draft(ProductUpdated, product), metadata)

    async def broadcast_product_deleted(
        self, product_id: Any, *, metadata: Metadata = None
    ) -> ProductDeleted:
        return await self._send(product_deleted_draft(product_id), metadata)

    async def broadcast_products_bulk_status_changed(
        self, product_ids: Iterable[Any], status: str, *, metadata: Metadata = None
    ) -> list[ProductsBulkStatusChanged]:
        """Publish one event per 63 products (an event has at most 64 topics), in one transaction."""
        drafts = products_bulk_drafts(product_ids, status)
        encoded = [(d.topics, d.type, d.payload(), _metadata(metadata)) for d in drafts]
        events = await self.log.publish_many(encoded)
        return [d.read_back(e) for d, e in zip(drafts, events)]

    # -- categories ------------------------------------------------------------------

    async def broadcast_category_created(
        self, category: CategoryLike, *, metadata: Metadata = None
    ) -> CategoryCreated:
        return await self._send(category_draft(CategoryCreated, category), metadata)

    async def broadcast_category_updated(
        self, category: CategoryLike, *, metadata: Metadata = None
    ) -> CategoryUpdated:
        return await self._send(category_draft(CategoryUpdated, category), metadata)

    async def broadcast_category_deleted(
        self, category_id: Any, *, metadata: Metadata = None
    ) -> CategoryDeleted:
        return await self._send(category_deleted_draft(category_id), metadata)

    async def broadcast_categories_bulk_deleted(
        self, category_ids: Iterable[Any], *, metadata: Metadata = None
    ) -> CategoriesBulkDeleted:
        return await self._send(categories_bulk_deleted_draft(category_ids), metadata)

    async def broadcast_categories_bulk_parent_changed(
        self, category_ids: Iterable[Any], parent_id: Any, *, metadata: Metadata = None
    ) -> CategoriesBulkParentChanged:
        """Publish the categories' new parent; None moves them to the top level."""
        return await self._send(categories_bulk_parent_draft(category_ids, parent_id), metadata)

    async def broadcast_categories_bulk_status_changed(
        self, category_ids: Iterable[Any], status: str, *, metadata: Metadata = None
    ) -> CategoriesBulkStatusChanged:
        return await self._send(categories_bulk_status_draft(category_ids, status), metadata)

    # -- inventory -------------------------------------------------------------------

    async def broadcast_inventory_updated(
        self, product_id: Any, stock_change: int, *, metadata: Metadata = None
    ) -> InventoryUpdated:
        """Publish a change in stock: `stock_change` is a delta, such as -2 for two sold."""
        return await self._send(inventory_draft(product_id, stock_change), metadata)


def _metadata(metadata: Metadata) -> dict[str, Any] | None:
    return None if metadata is None else dict(metadata)
