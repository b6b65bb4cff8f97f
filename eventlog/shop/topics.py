"""The shop's topics, one function per topic as in the original module.

==================================  ============================================
topic                               events
==================================  ============================================
``shop:cart:user:{user_id}``        cart events of a signed-in user
``shop:cart:session:{session_id}``  cart events of a guest session
``shop:products``                   every product event
``shop:products:{product_id}``      the events of one product, stock included
``shop:categories``                 every category event
``shop:inventory``                  stock changes
==================================  ============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidTopic
from .models import Cart, check_id

__all__ = [
    "cart_topics",
    "categories_topic",
    "inventory_topic",
    "product_topic",
    "products_topic",
    "session_cart_topic",
    "user_cart_topic",
]

PRODUCTS = "shop:products"
CATEGORIES = "shop:categories"
INVENTORY = "shop:inventory"


def user_cart_topic(user_id: Any) -> str:
    """Topic of the cart of a signed-in user."""
    return f"shop:cart:user:{_id(user_id, 'user_id')}"


def session_cart_topic(session_id: Any) -> str:
    """Topic of the cart of a guest session."""
    return f"shop:cart:session:{_id(session_id, 'session_id')}"


def cart_topics(cart: Cart | Mapping[str, Any]) -> list[str]:
    """Topics of a cart: its user's, its session's, or both (user first).

    Raises `InvalidTopic` for a cart with neither a user nor a session, which no
    one could follow.
    """
    if not isinstance(cart, Cart):
        cart = Cart.model_validate(cart)
    topics = []
    if cart.user_id is not None:
        topics.append(user_cart_topic(cart.user_id))
    if cart.session_id is not None:
        topics.append(session_cart_topic(cart.session_id))
    if not topics:
        raise InvalidTopic(
            f"cart {cart.id!r} has neither user_id nor session_id, so it has no topic; "
            "set one of them before broadcasting or subscribing",
            cart.id,
        )
    return topics


def products_topic() -> str:
    """Topic of every product event."""
    return PRODUCTS


def product_topic(product_id: Any) -> str:
    """Topic of the events of one product, including its stock changes."""
    return f"{PRODUCTS}:{_id(product_id, 'product_id')}"


def categories_topic() -> str:
    """Topic of every category event."""
    return CATEGORIES


def inventory_topic() -> str:
    """Topic of every stock change."""
    return INVENTORY


def _id(value: Any, field_name: str) -> str:
    try:
        return str(check_id(value, field_name))
    except ValueError as exc:
        raise InvalidTopic(str(exc), value) from None
