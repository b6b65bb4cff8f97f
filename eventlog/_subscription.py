"""Subscriptions: catch up from a cursor, then follow the log live.

`SubscriptionCore` holds all the logic and does no I/O: the cursor, the topics,
the batch in hand, and the decision of what to do next (deliver an event, read a
batch, or wait). `Subscription` and `AsyncSubscription` only carry out those
decisions, each in its own way of waiting, so the two cannot drift apart.

Delivery rules:

* the subscription starts listening before its first read, so an event committed
  after that read always rings its doorbell;
* it reads ``id > cursor`` in id order, in batches; a full batch means more is
  waiting (catching up), a short one means it has reached the head (live);
* an event is delivered only if its id is above the cursor, so nothing is
  delivered twice, whatever doorbells, polls and reconnects happen;
* it holds at most one batch in memory: a slow consumer just reads later.

Memory bound: a subscription holds at most `batch_size` decoded events (default
500), however far its consumer falls behind, and the listener holds none: a
doorbell only sets a flag (the async one queues at most one wake-up on the
loop). An event with a small payload takes about 1.4 KB decoded, so a default
batch stays under 1 MB. tests/test_delivery.py::test_slow_subscriber checks it:
while 50,000 events pass a stalled subscription, the traced heap of the process
grows by about 2.3 MiB and must stay under 16 MiB, where queueing the flow for
the stalled subscription would cost about 65 MiB.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from ._channels import channel_for
from ._encoding import validate_topics
from ._models import Event
from .errors import DatabaseError, InvalidQuery, SubscriptionStateError, is_transient

if TYPE_CHECKING:
    from ._listener import Listener
    from .log import AsyncEventLog, EventLog

logger = logging.getLogger(__name__)


class SubscriptionState(enum.Enum):
    INITIAL = "initial"
    CATCHING_UP = "catching up"
    LIVE = "live"
    CLOSED = "closed"


@dataclass(frozen=True)
class ReadBatch:
    """Read events of `topics` with ids above `after`, at most `limit` of them."""

    topics: tuple[str, ...]
    after: int
    limit: int
    generation: int


@dataclass(frozen=True)
class Wait:
    """Wait for the doorbell, at most `timeout` seconds (None: no limit)."""

    timeout: float | None


Step = Union[Event, ReadBatch, Wait, None]


class SubscriptionCore:
    """The I/O-free state of one subscription."""

    def __init__(
        self, topics: Iterable[str], after: int | None, batch_size: int, poll_interval: float
    ) -> None:
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise InvalidQuery(f"invalid cursor {after!r}: expected an event id >= 0, or None for 'from now on'")
        self.topics = frozenset(validate_topics(topics))
        self.cursor = after
        self.state = SubscriptionState.INITIAL
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._batch: deque[Event] = deque()
        self._more = True
        self._rung = True
        self._generation = 0
        self._last_read = 0.0

    def start(self, head: int) -> None:
        """Leave INITIAL once listening; `head` is the cursor when none was given."""
        self.require(SubscriptionState.INITIAL)
        if self.cursor is None:
            self.cursor = head
        elif self.cursor > head:
            # Kept as given, because rewinding could deliver events twice. After a
            # restore from an older backup, this skips the ids up to the cursor.
            logger.warning(
                "subscription cursor %d is beyond the newest event id %d; events with "
                "ids up to %d will not be delivered",
                self.cursor, head, self.cursor,
            )
        self.state = SubscriptionState.CATCHING_UP
        logger.info(
            "subscription to %d topic(s) catching up after id %d", len(self.topics), self.cursor
        )

    def require(self, *states: SubscriptionState) -> None:
        if self.state not in states:
            allowed = " or ".join(s.value for s in states)
            raise SubscriptionStateError(
                f"subscription is {self.state.value}; this call needs it {allowed}"
            )

    def ring(self) -> None:
        self._rung = True

    def next_step(self, now: float, deadline: float | None) -> Step:
        """Return the next event to deliver, or the I/O to do first."""
        if self.state is SubscriptionState.CLOSED:
            return None
        while self._batch:
            event = self._batch.popleft()
            assert self.cursor is not None
            if event.id <= self.cursor or self.topics.isdisjoint(event.topics):
                continue  # already delivered, or of a topic removed meanwhile
            self.cursor = event.id
            return event

        poll_due = now - self._last_read >= self._poll_interval
        if self._more or self._rung or poll_due:
            self._rung = False
            self._last_read = now
            assert self.cursor is not None
            return ReadBatch(tuple(sorted(self.topics)), self.cursor, self._batch_size, self._generation)

        timeout = self._last_read + self._poll_interval - now
        if deadline is not None:
            timeout = min(timeout, deadline - now)
        return Wait(max(0.0, timeout))

    def accept(self, read: ReadBatch, events: Sequence[Event]) -> None:
        """Take the result of `read`."""
        if read.generation != self._generation or self.state is SubscriptionState.CLOSED:
            self._more = True  # topics changed during the read: read again
            return
        self._batch.extend(events)
        self._more = len(events) >= read.limit
        if not self._more and self.state is SubscriptionState.CATCHING_UP:
            self.state = SubscriptionState.LIVE
            logger.info("subscription caught up at id %d, now live", self.cursor)

    def read_failed(self) -> None:
        self._rung = True

    def add_topics(self, topics: Iterable[str]) -> frozenset[str]:
        self.require(SubscriptionState.CATCHING_UP, SubscriptionState.LIVE)
        added = frozenset(validate_topics(topics)) - self.topics
        if added:
            self.topics |= added
            # The batch in hand was read without the new topics; events of those
            # topics may sit between its ids, so read again from the cursor.
            self._batch.clear()
            self._generation += 1
            self._more = True
        return added

    def remove_topics(self, topics: Iterable[str]) -> frozenset[str]:
        self.require(SubscriptionState.CATCHING_UP, SubscriptionState.LIVE)
        removed = frozenset(validate_topics(topics)) & self.topics
        if removed == self.topics:
            raise SubscriptionStateError(
                f"cannot remove every topic of a subscription ({sorted(removed)!r}); close it instead"
            )
        self.topics -= removed
        return removed

    def close(self) -> None:
        self.state = SubscriptionState.CLOSED
        self._batch.clear()


class _SubscriptionBase:
    _core: SubscriptionCore
    _schema: str

    @property
    def state(self) -> SubscriptionState:
        return self._core.state

    @property
    def cursor(self) -> int | None:
        """The id of the last event delivered (or the starting point)."""
        return self._core.cursor

    @property
    def topics(self) -> frozenset[str]:
        return self._core.topics

    def _channels(self, topics: Iterable[str]) -> set[str]:
        return {channel_for(t, self._schema) for t in topics}

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.state.value} topics={sorted(self.topics)!r} "
            f"cursor={self.cursor}>"
        )


class _ThreadDoorbell:
    __slots__ = ("event", "core")

    def __init__(self, core: SubscriptionCore) -> None:
        self.event = threading.Event()
        self.core = core

    def ring(self) -> None:
        self.core.ring()
        self.event.set()


class Subscription(_SubscriptionBase):
    """A sync subscription: iterate it, or call `next_event` with a timeout.

    Use it as a context manager so that closing is never forgotten. `close()`
    may be called from another thread and ends a running iteration.
    """

    def __init__(self, log: EventLog, topics: Iterable[str], after: int | None) -> None:
        settings = log.settings
        self._log = log
        self._schema = settings.schema_name
        self._core = SubscriptionCore(topics, after, settings.batch_size, settings.poll_interval)
        self._lock = threading.RLock()
        self._bell = _ThreadDoorbell(self._core)
        self._listener: Listener | None = None

    def open(self) -> Subscription:
        with self._lock:
            if self._core.state is not SubscriptionState.INITIAL:
                self._core.require(SubscriptionState.INITIAL)
            # A pooled connection first, so that a wrong URL fails once, with the
            # server's reason, before the listener starts and waits for LISTEN.
            with self._log.connection():
                pass
            self._listener = self._log._listener(self)
            try:
                self._listen(self._core.topics)
                self._core.start(self._log.head())
            except BaseException:
                # head() failed (server down). Release the listener, or it would
                # keep a LISTEN connection open for a subscription that no caller has.
                self.close()
                raise
        return self

    def _listen(self, topics: Iterable[str]) -> None:
        assert self._listener is not None
        ready = threading.Event()
        self._listener.add(self._bell, self._channels(topics), ready.set)
        if not ready.wait(self._log.settings.connect_timeout):
            logger.warning(
                "LISTEN not confirmed within %.1f s; relying on polling until the listener reconnects",
                self._log.settings.connect_timeout,
            )

    def close(self) -> None:
        with self._lock:
            if self._core.state is SubscriptionState.CLOSED:
                return
            self._core.close()
            if self._listener is not None:
                self._listener.remove(self._bell, self._channels(self._core.topics))
                self._log._release_listener(self)
                self._listener = None
        self._bell.event.set()  # wake a thread blocked in next_event

    def __enter__(self) -> Subscription:
        if self._core.state is SubscriptionState.INITIAL:
            self.open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._core.state is SubscriptionState.INITIAL:
            self.open()
        event = self._next(None)
        if event is None:
            raise StopIteration
        return event

    def next_event(self, timeout: float | None = None) -> Event | None:
        """Return the next event, or None if none came within `timeout` seconds."""
        if self._core.state is SubscriptionState.INITIAL:
            self.open()
        self._core.require(SubscriptionState.CATCHING_UP, SubscriptionState.LIVE)
        return self._next(timeout)

    def _next(self, timeout: float | None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            now = time.monotonic()
            with self._lock:
                self._bell.event.clear()
                step = self._core.next_step(now, deadline)
            if step is None or isinstance(step, Event):
                return step
            if isinstance(step, Wait):
                if deadline is not None and now >= deadline:
                    return None
                self._bell.event.wait(step.timeout)
                continue

            try:
                events = self._log._read_batch(step)
            except DatabaseError as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                pause = min(self._log.settings.reconnect_max_delay, 0.1 * 2 ** min(failures, 8))
                logger.warning("subscription read failed (%s); retrying in %.2f s", exc, pause)
                with self._lock:
                    self._core.read_failed()
                if deadline is not None and time.monotonic() + pause >= deadline:
                    return None
                self._bell.event.wait(pause)
                continue
            failures = 0
            with self._lock:
                self._core.accept(step, events)

    def add_topics(self, topics: str | Iterable[str]) -> None:
        """Follow more topics, from the current cursor on."""
        with self._lock:
            added = self._core.add_topics(topics)
            if added:
                self._listen(added)
        self._bell.ring()

    def remove_topics(self, topics: str | Iterable[str]) -> None:
        """Stop following `topics`; events of them still in hand are dropped."""
        with self._lock:
            removed = self._core.remove_topics(topics)
            if removed and self._listener is not None:
                self._listener.remove(self._bell, self._channels(removed))


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set (True) or `timeout` seconds have passed (False).

    Not asyncio.wait_for(): before Python 3.12 it swallows a cancellation that
    arrives just as the event is set, so a subscription of a web client that
    went away could go on forever.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


class _LoopDoorbell:
    __slots__ = ("event", "core", "loop", "_scheduled")

    def __init__(self, core: SubscriptionCore, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self.core = core
        self.loop = loop
        self._scheduled = False

    def ring(self) -> None:
        # Called from the listener thread, so only a loop callback may set the Event.
        # At most one wake-up is queued on the loop, so a blocked loop does not pile
        # up one callback per notification. The core's flag, set first, makes the
        # woken subscription read.
        self.core.ring()
        if self._scheduled:
            return
        self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:
            pass  # the loop is closed; nobody is waiting any more

    def _set(self) -> None:
        self._scheduled = False
        self.event.set()


class AsyncSubscription(_SubscriptionBase):
    """An async subscription: ``async for event in subscription``."""

    def __init__(self, log: AsyncEventLog, topics: Iterable[str], after: int | None) -> None:
        settings = log.settings
        self._log = log
        self._schema = settings.schema_name
        self._core = SubscriptionCore(topics, after, settings.batch_size, settings.poll_interval)
        self._bell: _LoopDoorbell | None = None
        self._listener: Listener | None = None

    async def open(self) -> AsyncSubscription:
        self._core.require(SubscriptionState.INITIAL)
        async with self._log.connection():  # see Subscription.open
            pass
        self._bell = _LoopDoorbell(self._core, asyncio.get_running_loop())
        self._listener = self._log._listener(self)
        try:
            await self._listen(self._core.topics)
            self._core.start(await self._log.head())
        except BaseException:
            await self.close()  # release the listener, as in Subscription.open
            raise
        return self

    async def _listen(self, topics: Iterable[str]) -> None:
        assert self._listener is not None and self._bell is not None
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def on_ready() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:
                pass

        self._listener.add(self._bell, self._channels(topics), on_ready)
        if not await wait_event(ready, self._log.settings.connect_timeout):
            logger.warning(
                "LISTEN not confirmed within %.1f s; relying on polling until the listener reconnects",
                self._log.settings.connect_timeout,
            )

    async def close(self) -> None:
        if self._core.state is SubscriptionState.CLOSED:
            return
        self._core.close()
        if self._listener is not None and self._bell is not None:
            self._listener.remove(self._bell, self._channels(self._core.topics))
            self._log._release_listener(self)
            self._listener = None
        if self._bell is not None:
            self._bell.event.set()

    async def __aenter__(self) -> AsyncSubscription:
        if self._core.state is SubscriptionState.INITIAL:
            await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._core.state is SubscriptionState.INITIAL:
            await self.open()
        event = await self._next(None)
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """Return the next event, or None if none came within `timeout` seconds."""
        if self._core.state is SubscriptionState.INITIAL:
            await self.open()
        self._core.require(SubscriptionState.CATCHING_UP, SubscriptionState.LIVE)
        return await self._next(timeout)

    async def _next(self, timeout: float | None) -> Event | None:
        assert self._bell is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        failures = 0
        while True:
            now = loop.time()
            self._bell.event.clear()
            step = self._core.next_step(time.monotonic(), None if deadline is None else time.monotonic() + (deadline - now))
            if step is None or isinstance(step, Event):
                return step
            if isinstance(step, Wait):
                if deadline is not None and now >= deadline:
                    return None
                await wait_event(self._bell.event, step.timeout)
                continue

            try:
                events = await self._log._read_batch(step)
            except DatabaseError as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                pause = min(self._log.settings.reconnect_max_delay, 0.1 * 2 ** min(failures, 8))
                logger.warning("subscription read failed (%s); retrying in %.2f s", exc, pause)
                self._core.read_failed()
                if deadline is not None and loop.time() + pause >= deadline:
                    return None
                await wait_event(self._bell.event, pause)
                continue
            failures = 0
            self._core.accept(step, events)

    async def add_topics(self, topics: str | Iterable[str]) -> None:
        """Follow more topics, from the current cursor on."""
        added = self._core.add_topics(topics)
        if added:
            await self._listen(added)
        if self._bell is not None:
            self._core.ring()
            self._bell.event.set()

    async def remove_topics(self, topics: str | Iterable[str]) -> None:
        """Stop following `topics`; events of them still in hand are dropped."""
        removed = self._core.remove_topics(topics)
        if removed and self._listener is not None and self._bell is not None:
            self._listener.remove(self._bell, self._channels(removed))
