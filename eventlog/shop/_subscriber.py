"""Shop subscribers: what the Elixir process was, with a cursor.

A subscriber follows topics that it subscribes and unsubscribes while it runs,
and yields typed shop events in id order, each once. It reads through one core
subscription (`eventlog.Subscription`), opened at the first read and replaced
when every topic is unsubscribed and another is subscribed later.

When a topic's events start:

* topics subscribed before the first read resume after `after`, the last event
  id the caller saw (``after=None``: from the first subscribe on);
* a topic subscribed after the first read starts at the head of the log, like
  ``Phoenix.PubSub.subscribe``: it does not replay the topic's older events.

The second rule needs a start position per topic, but the core subscription
has one cursor for all its topics. So the subscriber filters: it delivers an
event if one of its topics is followed and its id is above that topic's start.
`_Following` keeps that bookkeeping, without I/O, for both twins.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .._encoding import validate_topics
from .._models import Event
from .._subscription import AsyncSubscription, Subscription, SubscriptionState, wait_event
from ..errors import SubscriptionStateError
from .events import ShopEvent, decode_event
from .models import Cart
from .topics import (
    cart_topics,
    categories_topic,
    inventory_topic,
    product_topic,
    products_topic,
    session_cart_topic,
    user_cart_topic,
)

if TYPE_CHECKING:
    from ..log import AsyncEventLog, EventLog

__all__ = ["AsyncShopSubscriber", "ShopSubscriber"]


class _Following:
    """Followed topics with their start ids, the cursor, and the delivery filter."""

    def __init__(self, after: int | None) -> None:
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise ValueError(
                f"invalid cursor {after!r}: expected the id of the last event seen (>= 0), "
                "or None to start from now"
            )
        self.resume = after  # None until the first subscribe or read resolves "now"
        self.cursor = after
        self.starts: dict[str, int] = {}
        self.reading = False
        self.closed = False

    def require_open(self) -> None:
        if self.closed:
            raise SubscriptionStateError("the shop subscriber is closed; create a new one")

    def new(self, topics: str | Iterable[str]) -> list[str]:
        return [t for t in validate_topics(topics) if t not in self.starts]

    def follow(self, topics: Iterable[str], start: int) -> None:
        for topic in topics:
            self.starts[topic] = start

    def unfollow(self, topics: str | Iterable[str]) -> list[str]:
        removed = [t for t in validate_topics(topics) if t in self.starts]
        for topic in removed:
            del self.starts[topic]
        return removed

    def set_resume(self, head: int) -> int:
        if self.resume is None:
            self.resume = self.cursor = head
        return self.resume

    def admit(self, event: Event) -> ShopEvent | None:
        """Advance the cursor past `event`; return it typed if it is to be delivered."""
        if self.cursor is not None and event.id <= self.cursor:
            return None
        self.cursor = event.id
        if not any(event.id > self.starts.get(t, event.id) for t in event.topics):
            return None  # a topic unsubscribed meanwhile, or one that started later
        return decode_event(event)

    def snapshot(self) -> Mapping[str, int]:
        return MappingProxyType(dict(self.starts))


class _SubscriberBase:
    """State shared by both twins, and the original module's subscribe functions."""

    _state: _Following

    @property
    def cursor(self) -> int | None:
        """The id of the last event handled; store it to resume from there."""
        return self._state.cursor

    @property
    def topics(self) -> Mapping[str, int]:
        """Each followed topic, with the id after which its events are delivered."""
        return self._state.snapshot()

    @property
    def closed(self) -> bool:
        return self._state.closed

    def __repr__(self) -> str:
        if self._state.closed:
            state = "closed"
        elif self._state.reading:
            state = "reading"
        else:
            state = "new"
        return (
            f"<{type(self).__name__} {state} topics={sorted(self._state.starts)!r} "
            f"cursor={self.cursor}>"
        )

    def subscribe(self, topics: str | Iterable[str]) -> Any:
        raise NotImplementedError

    def unsubscribe(self, topics: str | Iterable[str]) -> Any:
        raise NotImplementedError

    def subscribe_to_user_cart(self, user_id: Any) -> Any:
        """Follow the cart of a signed-in user."""
        return self.subscribe(user_cart_topic(user_id))

    def subscribe_to_session_cart(self, session_id: Any) -> Any:
        """Follow the cart of a guest session."""
        return self.subscribe(session_cart_topic(session_id))

    def subscribe_to_cart(self, cart: Cart | Mapping[str, Any]) -> Any:
        """Follow every topic of `cart` (user, session, or both); each event arrives once."""
        return self.subscribe(cart_topics(cart))

    def subscribe_products(self) -> Any:
        """Follow every product event."""
        return self.subscribe(products_topic())

    def subscribe_product(self, product_id: Any) -> Any:
        """Follow the events of one product, stock changes included."""
        return self.subscribe(product_topic(product_id))

    def subscribe_categories(self) -> Any:
        """Follow every category event."""
        return self.subscribe(categories_topic())

    def subscribe_inventory(self) -> Any:
        """Follow every stock change."""
        return self.subscribe(inventory_topic())

    def unsubscribe_from_user_cart(self, user_id: Any) -> Any:
        """Stop following the cart of a signed-in user."""
        return self.unsubscribe(user_cart_topic(user_id))

    def unsubscribe_from_session_cart(self, session_id: Any) -> Any:
        """Stop following the cart of a guest session."""
        return self.unsubscribe(session_cart_topic(session_id))

    def unsubscribe_from_cart(self, cart: Cart | Mapping[str, Any]) -> Any:
        """Stop following every topic of `cart`."""
        return self.unsubscribe(cart_topics(cart))


class ShopSubscriber(_SubscriberBase):
    """A sync subscriber: subscribe topics, then iterate typed events.

    >>> with shop.subscriber(after=last_seen_id) as sub:
    ...     sub.subscribe_to_user_cart(user_id)
    ...     for event in sub:
    ...         match event:
    ...             case ItemAdded(cart, _item): show(cart)

    `close()` may be called from another thread and ends a running iteration.
    The subscribe functions may be called from any thread, also while another
    thread iterates.
    """

    def __init__(self, log: EventLog, *, after: int | None = None) -> None:
        self._log = log
        self._state = _Following(after)
        self._sub: Subscription | None = None
        # Held while topics change and while an event is filtered, so that an
        # event is never judged against a topic whose start is not yet known.
        self._lock = threading.RLock()
        self._changed = threading.Event()

    def subscribe(self, topics: str | Iterable[str]) -> None:
        """Follow `topics`; see the module docstring for where their events start."""
        with self._lock:
            self._state.require_open()
            new = self._state.new(topics)
            if not new:
                return
            if not self._state.reading:
                self._state.follow(new, self._resume_point())
                return
            if self._sub is None:
                head = self._log.head()
                sub = self._log.subscribe(new, after=head)
                sub.open()
                self._sub = sub
            else:
                self._sub.add_topics(new)
                # Read after LISTEN is in effect: every event above `head` is
                # read from the core cursor, which is at most `head`.
                head = self._log.head()
            self._state.follow(new, head)
        self._changed.set()

    def unsubscribe(self, topics: str | Iterable[str]) -> None:
        """Stop following `topics`; their events still in hand are dropped."""
        with self._lock:
            self._state.require_open()
            removed = self._state.unfollow(topics)
            if not removed or self._sub is None:
                return
            if self._state.starts:
                self._sub.remove_topics(removed)
            else:
                # The core subscription cannot have zero topics; the cursor
                # lives on here, and a later subscribe opens a new one.
                self._sub.close()
                self._sub = None
        self._changed.set()

    def next_event(self, timeout: float | None = None) -> ShopEvent | None:
        """Return the next event, or None after `timeout` seconds or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._state.closed:
                    return None
                if not self._state.reading:
                    self._start()
                sub = self._sub
                self._changed.clear()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())

            if sub is None:
                if not self._changed.wait(remaining) and remaining is not None:
                    return None
                continue
            try:
                event = sub.next_event(remaining)
            except SubscriptionStateError:
                continue  # closed by unsubscribe or close() in another thread
            if event is None:
                if sub.state is SubscriptionState.CLOSED:
                    continue
                return None
            with self._lock:
                typed = self._state.admit(event)
            if typed is not None:
                return typed

    def _resume_point(self) -> int:
        if self._state.resume is None:
            return self._state.set_resume(self._log.head())
        return self._state.resume

    def _start(self) -> None:
        resume = self._resume_point()
        self._state.reading = True
        if self._state.starts:
            sub = self._log.subscribe(list(self._state.starts), after=resume)
            sub.open()
            self._sub = sub

    def __iter__(self) -> Iterator[ShopEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def close(self) -> None:
        with self._lock:
            self._state.closed = True
            sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()
        self._changed.set()

    def __enter__(self) -> ShopSubscriber:
        self._state.require_open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncShopSubscriber(_SubscriberBase):
    """The asyncio twin of `ShopSubscriber`; the subscribe functions are coroutines.

    >>> async with shop.subscriber(after=last_seen_id) as sub:
    ...     await sub.subscribe_to_session_cart(session_id)
    ...     async for event in sub:
    ...         ...
    """

    def __init__(self, log: AsyncEventLog, *, after: int | None = None) -> None:
        self._log = log
        self._state = _Following(after)
        self._sub: AsyncSubscription | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    async def subscribe(self, topics: str | Iterable[str]) -> None:
        """Follow `topics`; see the module docstring for where their events start."""
        async with self._lock:
            self._state.require_open()
            new = self._state.new(topics)
            if not new:
                return
            if not self._state.reading:
                self._state.follow(new, await self._resume_point())
                return
            if self._sub is None:
                head = await self._log.head()
                sub = self._log.subscribe(new, after=head)
                await sub.open()
                self._sub = sub
            else:
                await self._sub.add_topics(new)
                head = await self._log.head()
            self._state.follow(new, head)
        self._changed.set()

    async def unsubscribe(self, topics: str | Iterable[str]) -> None:
        """Stop following `topics`; their events still in hand are dropped."""
        async with self._lock:
            self._state.require_open()
            removed = self._state.unfollow(topics)
            if not removed or self._sub is None:
                return
            if self._state.starts:
                await self._sub.remove_topics(removed)
            else:
                await self._sub.close()
                self._sub = None
        self._changed.set()

    async def next_event(self, timeout: float | None = None) -> ShopEvent | None:
        """Return the next event, or None after `timeout` seconds or once closed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            async with self._lock:
                if self._state.closed:
                    return None
                if not self._state.reading:
                    await self._start()
                sub = self._sub
                self._changed.clear()
            remaining = None if deadline is None else max(0.0, deadline - loop.time())

            if sub is None:
                if not await wait_event(self._changed, remaining):
                    return None
                continue
            try:
                event = await sub.next_event(remaining)
            except SubscriptionStateError:
                continue
            if event is None:
                if sub.state is SubscriptionState.CLOSED:
                    continue
                return None
            async with self._lock:
                typed = self._state.admit(event)
            if typed is not None:
                return typed

    async def _resume_point(self) -> int:
        if self._state.resume is None:
            return self._state.set_resume(await self._log.head())
        return self._state.resume

    async def _start(self) -> None:
        resume = await self._resume_point()
        self._state.reading = True
        if self._state.starts:
            sub = self._log.subscribe(list(self._state.starts), after=resume)
            await sub.open()
            self._sub = sub

    def __aiter__(self) -> AsyncIterator[ShopEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ShopEvent]:
        while (event := await self.next_event()) is not None:
            yield event

    async def close(self) -> None:
        self._state.closed = True
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()
        self._changed.set()

    async def __aenter__(self) -> AsyncShopSubscriber:
        self._state.require_open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
