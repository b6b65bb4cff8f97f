"""Server-Sent Events: follow topics of the log from a browser.

`EventStream` is an ASGI application that streams the events of the topics a
request may follow, and resumes where the browser left off. Mount it in a
Starlette or FastAPI application that opens an `AsyncEventLog`::

    async def may_follow(request, topics):
        user = request.session.get("user_id")
        return all(t == f"shop:cart:user:{user}" or t == "shop:products" for t in topics)

    events = EventStream(log, authorize=may_follow)
    app = Starlette(routes=[Route("/events", events)])   # FastAPI: app.add_route(...)

In the browser::

    const source = new EventSource("/events?topic=shop:products&last_event_id=41");
    source.addEventListener("product_created", (e) => show(JSON.parse(e.data)));

The request
-----------
``GET /events?topic=A&topic=B`` names the topics to follow (repeat ``topic``).
The position to resume after comes from the ``Last-Event-ID`` header, which
`EventSource` sends by itself when it reconnects. Failing that, it comes from the
``last_event_id`` query parameter, which a page passes on its first connection:
an id restored from local storage, or the id its server-rendered state was read
at. The header wins, because on reconnect EventSource repeats the URL with its
old query parameter and puts the newer id in the header. An empty value counts
as absent.

Without a position the stream starts at the head of the log: only events
published from then on.

Authorization
-------------
`authorize(request, topics)` is required; sync callables run in a worker thread,
as Starlette runs sync endpoints. It receives the Starlette `Request` and the
requested topics (a tuple, maybe empty) and returns:

* ``True``: follow the requested topics;
* ``False`` or ``None``: respond with 403 (so a callback that forgets to return denies);
* a collection of topics: follow exactly those. This narrows a request, or names
  the topics for a request that names none (``GET /events`` for "my cart").
  An empty collection gets 403.

It may also raise Starlette's `HTTPException` (401 for a missing session, say),
whose status and detail become the response.

The response
------------
Errors are plain text: 400 for a malformed ``Last-Event-ID`` / ``last_event_id``
or topic, 403 when `authorize` rejects the request, 405 for methods other than GET.
Otherwise ``200 text/event-stream``, whose messages are:

* ``retry: <ms>`` first: how long the browser waits before reconnecting;
* one message per event: ``id:`` its id, ``event:`` its type, ``data:`` the JSON
  of ``Event.to_json_dict()`` (id, topics, type, data, metadata, occurred_at),
  or of what `serialize` returns. Metadata is sent too: pass a `serialize` that
  drops it if it holds anything a browser must not see. A type that contains a
  line break cannot be an SSE event name: such an event is sent without
  ``event:`` (the browser's "message" event) and its type is in the data;
* ``: heartbeat`` comments when nothing was sent for `heartbeat` seconds, so that
  proxies keep the idle connection open. Comments carry no id;
* a position message, ``id: <n>`` with no data, at the start when the stream
  resumes from a position the browser did not send: the head, when the request
  had no position or a position beyond the head. The browser then resumes from
  there after a disconnect, even if no event came in between. Browsers do not
  fire an event for a message without data.

A position beyond the head
--------------------------
An id above the newest event in the log cannot have come from this log as it
is: the database was restored from a backup (its ids start again below the
browser's), or the id came from another deployment. The stream then starts at
the head and sends the head as a position message. Taking the id as is would
skip every event until the ids grow past it, silently; starting at the head
never skips an event. A page that cares can compare the position with the id it
sent and reload its state, which may include events the restore lost.

Disconnects
-----------
The stream watches the connection: when the client goes away, the subscription
is closed at once, and with it the listener's interest in its channels. A
database outage does not end a stream (the subscription reads again from its
cursor when the server is back); if the log cannot be reached when the stream
starts, the stream ends after the retry hint, and the browser reconnects.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, Union

from ._encoding import validate_topics
from ._models import Event
from ._subscription import AsyncSubscription, SubscriptionState
from .errors import EventLogError, InvalidTopic
from .log import AsyncEventLog

try:
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "eventlog.web needs Starlette; install it with: pip install 'eventlog[web]'"
    ) from exc

__all__ = [
    "Authorize",
    "EventStream",
    "format_comment",
    "format_message",
    "parse_last_event_id",
]

logger = logging.getLogger(__name__)

TOPIC_PARAM = "topic"
LAST_EVENT_ID_PARAM = "last_event_id"
MAX_EVENT_ID = 2**63 - 1  # the id column is a bigint

# Events sent in one write while catching up; bounds the memory of one chunk.
CHUNK_BYTES = 64 * 1024
CANCEL_RETRY = 0.5  # seconds between cancellations of a stream whose client left

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_DIGITS = re.compile(r"[0-9]{1,19}")

AuthorizeResult = Union[bool, None, Iterable[str]]


class Authorize(Protocol):
    """Decides which topics a request may follow; see the module docstring."""

    def __call__(
        self, request: Request, topics: tuple[str, ...]
    ) -> AuthorizeResult | Awaitable[AuthorizeResult]: ...


class _Rejected(Exception):
    """A request rejected with an error status before any stream starts."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- SSE framing ------------------------------------------------------------------------


def format_message(
    *,
    data: str | None = None,
    event: str | None = None,
    id: int | None = None,
    retry: int | None = None,
) -> bytes:
    """Return one SSE message, ending with the blank line that dispatches it.

    Every line break in `data` (CR, LF or CRLF) starts a new ``data:`` line; the
    browser joins them with LF. `event` must not contain a line break.
    """
    lines = []
    if retry is not None:
        lines.append(f"retry: {retry}")
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        if _LINE_BREAK.search(event):
            raise ValueError(f"invalid SSE event name {event!r}: it contains a line break")
        lines.append(f"event: {event}")
    if data is not None:
        lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def format_comment(text: str = "") -> bytes:
    """Return an SSE comment: ignored by browsers, but it keeps the connection busy."""
    return ("".join(f": {line}\n" for line in _LINE_BREAK.split(text)) + "\n").encode("utf-8")


def parse_last_event_id(value: str | None, source: str) -> int | None:
    """Return the event id in `value`, None if absent or empty, or raise `ValueError`."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not _DIGITS.fullmatch(text) or int(text) > MAX_EVENT_ID:
        raise ValueError(
            f"invalid {source} {_shorten(value)!r}: expected the id of an event, "
            f"a whole number from 0 to {MAX_EVENT_ID}"
        )
    return int(text)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _event_json(event: Event) -> Any:
    return event.to_json_dict()


# -- the endpoint -----------------------------------------------------------------------


class EventStream:
    """An ASGI endpoint that streams events of authorized topics as Server-Sent Events.

    `log` must be open (or opened lazily) on the server's event loop. `heartbeat`
    is in seconds; `retry` is the reconnection delay suggested to the browser, in
    seconds (None: leave the browser's default, about 3 s). `serialize` turns an
    event into the JSON value of its ``data:`` lines; a `str` it returns is sent
    as is.
    """

    def __init__(
        self,
        log: AsyncEventLog,
        *,
        authorize: Authorize,
        heartbeat: float = 15.0,
        retry: float | None = 2.0,
        serialize: Callable[[Event], Any] = _event_json,
    ) -> None:
        if not callable(authorize):
            raise TypeError(
                f"invalid authorize {authorize!r}: expected a callable (request, topics) "
                "returning True, False or the topics to follow"
            )
        if heartbeat <= 0:
            raise ValueError(f"invalid heartbeat {heartbeat!r}: expected seconds > 0")
        if retry is not None and retry < 0:
            raise ValueError(f"invalid retry {retry!r}: expected seconds >= 0, or None")
        self.log = log
        self.heartbeat = heartbeat
        self.retry_ms = None if retry is None else round(retry * 1000)
        self._authorize = authorize
        self._serialize = serialize
        self._streams: set[_Stream] = set()
        self._closing = False

    @property
    def active(self) -> int:
        """The number of streams open now."""
        return len(self._streams)

    def __repr__(self) -> str:
        return f"<EventStream {self.log!r} active={self.active}>"

    async def close(self) -> None:
        """End every open stream cleanly, and any stream that starts from now on.

        Call it when the server shuts down: servers wait for open responses to
        finish before they exit, and an event stream never finishes by itself.
        Browsers reconnect after the retry delay, to the next server.
        """
        self._closing = True
        for stream in list(self._streams):
            await stream.end()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            raise TypeError(f"EventStream serves HTTP requests, not {scope['type']!r}")
        try:
            topics, after = await self._accept(Request(scope))
        except _Rejected as rejection:
            logger.info("event stream request rejected with %d: %s", rejection.status, rejection.message)
            await _send_error(send, rejection)
            return

        stream = _Stream(topics, after)
        self._streams.add(stream)
        try:
            await _until_disconnect(receive, self._respond(send, stream), stream)
        finally:
            self._streams.discard(stream)

    # -- before the response starts: every check that can end in an error response

    async def _accept(self, request: Request) -> tuple[tuple[str, ...], int | None]:
        if request.method != "GET":
            raise _Rejected(405, f"method {request.method} not allowed: use GET", {"allow": "GET"})
        try:
            requested = validate_topics(request.query_params.getlist(TOPIC_PARAM)) \
                if TOPIC_PARAM in request.query_params else ()
        except InvalidTopic as exc:
            raise _Rejected(400, str(exc)) from None
        after = self._position(request)
        topics = await self._allowed(request, requested)
        return topics, after

    def _position(self, request: Request) -> int | None:
        try:
            after = parse_last_event_id(request.headers.get("last-event-id"), "Last-Event-ID header")
            if after is None:
                after = parse_last_event_id(
                    request.query_params.get(LAST_EVENT_ID_PARAM),
                    f"{LAST_EVENT_ID_PARAM} query parameter",
                )
        except ValueError as exc:
            raise _Rejected(400, str(exc)) from None
        return after

    async def _allowed(self, request: Request, requested: tuple[str, ...]) -> tuple[str, ...]:
        try:
            if inspect.iscoroutinefunction(self._authorize) or inspect.iscoroutinefunction(
                getattr(self._authorize, "__call__", None)
            ):
                verdict = await self._authorize(request, requested)
            else:
                verdict = await run_in_threadpool(self._authorize, request, requested)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
        except HTTPException as exc:
            raise _Rejected(exc.status_code, str(exc.detail), dict(exc.headers or {})) from None

        if verdict is True:
            if not requested:
                raise _Rejected(400, f"no topic given: name the topics to follow with ?{TOPIC_PARAM}=...")
            return requested
        if verdict is False or verdict is None:
            raise _Rejected(403, f"not allowed to follow {', '.join(requested) or 'these topics'}")
        if isinstance(verdict, str) or not isinstance(verdict, Iterable):
            raise TypeError(
                f"authorize returned {verdict!r}: expected True, False or a collection of topics"
            )
        allowed = tuple(verdict)
        if not allowed:
            raise _Rejected(403, f"not allowed to follow {', '.join(requested) or 'any topic'}")
        return validate_topics(allowed)

    # -- the stream

    async def _respond(self, send: Callable, stream: _Stream) -> None:
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache, no-store"),
                # nginx buffers responses unless told not to.
                (b"x-accel-buffering", b"no"),
            ],
        })
        if self.retry_ms is not None:
            await _send_body(send, format_message(retry=self.retry_ms))
        await self._subscribe(send, stream)
        # Ending the response cleanly makes the browser reconnect after the retry
        # delay; an error status would make EventSource give up for good.
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _subscribe(self, send: Callable, stream: _Stream) -> None:
        topics = ", ".join(stream.topics)
        if self._closing or stream.ended:
            return
        try:
            start = await self._start(stream.after)
        except EventLogError as exc:
            logger.warning("event stream of %s could not start: %s", topics, exc)
            return
        if start != stream.after:
            await _send_body(send, format_message(id=start))

        subscription = stream.subscription = self.log.subscribe(stream.topics, after=start)
        try:
            # Not `async with`: a disconnect may cancel us inside open(), after it
            # registered with the listener, and close() must still run then.
            await subscription.open()
            logger.debug("event stream of %s open after id %d", topics, start)
            await self._follow(send, stream, subscription)
        except EventLogError as exc:
            if not stream.ended:  # else a disconnect closed the subscription while it opened
                logger.warning("event stream of %s ended: %s", topics, exc)
        finally:
            await subscription.close()

    async def _start(self, after: int | None) -> int:
        """Return the cursor the stream starts after: `after`, or the head if it is beyond it."""
        head = await self.log.head()
        if after is None:
            return head
        if after > head:
            logger.warning(
                "Last-Event-ID %d is beyond the head of the log (%d), as after a restore "
                "from a backup; streaming from the head", after, head,
            )
            return head
        return after

    async def _follow(self, send: Callable, stream: _Stream, subscription: AsyncSubscription) -> None:
        while not stream.ended:
            event = await subscription.next_event(timeout=self.heartbeat)
            if event is None:
                if subscription.state is SubscriptionState.CLOSED:
                    return  # ended by close() or a disconnect
                await _send_body(send, format_comment("heartbeat"))
                continue

            # While catching up, events come in batches: write them together.
            chunk = bytearray(self._frame(event))
            while len(chunk) < CHUNK_BYTES:
                event = await subscription.next_event(timeout=0)
                if event is None:
                    break
                chunk += self._frame(event)
            await _send_body(send, bytes(chunk))

    def _frame(self, event: Event) -> bytes:
        value = self._serialize(event)
        data = value if isinstance(value, str) else json.dumps(
            value, ensure_ascii=False, separators=(",", ":")
        )
        name = None if _LINE_BREAK.search(event.type) else event.type
        return format_message(id=event.id, event=name, data=data)


async def _send_body(send: Callable, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _send_error(send: Callable, rejection: _Rejected) -> None:
    body = (rejection.message + "\n").encode("utf-8")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in rejection.headers.items()]
    await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Stream:
    """One client's stream: what it follows, its subscription once open, whether it must end."""

    __slots__ = ("topics", "after", "subscription", "ended")

    def __init__(self, topics: tuple[str, ...], after: int | None) -> None:
        self.topics = topics
        self.after = after
        self.subscription: AsyncSubscription | None = None
        self.ended = False

    async def end(self) -> None:
        """Make the stream finish: its subscription's next_event returns None at once."""
        self.ended = True
        if self.subscription is not None:
            await self.subscription.close()


async def _until_disconnect(receive: Callable, respond: Awaitable[None], stream: _Stream) -> None:
    """Run `respond` until it finishes or the client disconnects, whichever comes first.

    Servers drop writes to a closed connection without an error, so only the
    ``http.disconnect`` message tells that the client went away.
    """
    responding = asyncio.ensure_future(respond)
    watching = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({responding, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        # A cancellation alone is not enough: code that awaits through
        # asyncio.wait_for() before Python 3.12 can swallow it. Ending the
        # stream closes its subscription, and the cancellation is repeated
        # until the task is really gone.
        await stream.end()
        while not responding.done():
            responding.cancel()
            await asyncio.wait({responding}, timeout=CANCEL_RETRY)
        await asyncio.gather(watching, return_exceptions=True)
    if not responding.cancelled() and responding.exception() is not None:
        raise responding.exception()  # type: ignore[misc]


async def _wait_for_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
