"""Payload models of the shop: cart, cart item, product and category.

They carry the fields every shop has. Applications usually have richer models,
so extra fields are kept (``extra="allow"``): a subclass, or a model built with
more keyword arguments, still round-trips through the log. Fields declared here
come back with their types; extra fields come back as the log stores them
(``Decimal`` and ``datetime`` as strings): validate ``model_dump()`` into the
application's own model to restore them.

Money is ``Decimal`` and round-trips exactly: the log stores ``Decimal("19.90")``
as the string ``"19.90"``, digits and trailing zeros included.

Ids (`Id`) are integers or non-empty strings; a ``UUID`` is accepted and kept as
its string, so the value a subscriber reads equals the value that was published.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["Cart", "CartItem", "Category", "Id", "Money", "Product", "check_id"]


def check_id(value: Any, field_name: str = "id") -> int | str:
    """Return `value` as an id (int or str), or raise ValueError naming it."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"invalid {field_name} {value!r}: expected an integer, a non-empty string or a UUID"
        )
    if isinstance(value, str) and (not value or "\x00" in value):
        raise ValueError(
            f"invalid {field_name} {value!r}: a string id must be non-empty and free of NUL characters"
        )
    return value


Id = Annotated[int | str, BeforeValidator(check_id)]
"""An id of a user, session, cart, item, product or category."""

Money = Annotated[Decimal, Field(allow_inf_nan=False)]
"""An amount of money; kept as ``Decimal`` so that no cent is ever rounded away."""


class _ShopModel(BaseModel):
    # validate_assignment so that `cart.total = "x"` fails where the bug is, not
    # later in a subscriber.
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class CartItem(_ShopModel):
    """One line of a cart."""

    id: Id
    product_id: Id
    sku: str
    name: str
    quantity: int = Field(ge=1)
    unit_price: Money
    total: Money = Decimal("0")


class Cart(_ShopModel):
    """A cart of a signed-in user (`user_id`), a guest session (`session_id`), or both.

    A guest who signs in keeps the cart: it gets a `user_id` next to its
    `session_id`, and its events reach both topics.
    """

    id: Id
    user_id: Id | None = None
    session_id: Id | None = None
    items: list[CartItem] = Field(default_factory=list)
    currency: str = "USD"
    subtotal: Money = Decimal("0")
    shipping_total: Money = Decimal("0")
    tax_total: Money = Decimal("0")
    discount_total: Money = Decimal("0")
    total: Money = Decimal("0")
    shipping_method: str | None = None
    payment_option: str | None = None

    def item(self, item_id: int | str) -> CartItem | None:
        """Return the line with id `item_id`, or None."""
        return next((i for i in self.items if i.id == item_id), None)


class Product(_ShopModel):
    """A catalogue product; `stock` is the quantity on hand."""

    id: Id
    sku: str
    name: str
    price: Money
    currency: str = "USD"
    status: str = "active"
    stock: int = 0
    category_id: Id | None = None
    description: str | None = None


class Category(_ShopModel):
    """A catalogue category; `parent_id` is None for a top-level category."""

    id: Id
    name: str
    slug: str | None = None
    parent_id: Id | None = None
    status: str = "active"
    position: int = 0
